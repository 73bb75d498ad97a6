"""The ``mlip`` console script: a click group; each command lives in its own module here."""
from __future__ import annotations

import importlib

import click

from mlip import __version__

#: (module under mlip.cli, attribute) of every command; modules stay thin layers over mlip
COMMANDS = [
    ("data", "data"),
    ("train", "train"),
    ("evaluate", "evaluate"),
    ("md", "md"),
    ("relax", "relax"),
    ("predict", "predict"),
    ("export", "export"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlip")
def main() -> None:
    """mlip: train, evaluate and run machine-learned interatomic potentials.

    Units everywhere: eV, Å, eV/Å, eV/Å³ (ASE stress sign).
    """


for _module, _attr in COMMANDS:
    try:
        _mod = importlib.import_module(f"mlip.cli.{_module}")
    except ModuleNotFoundError as _err:
        if _err.name != f"mlip.cli.{_module}":
            raise
        continue
    main.add_command(getattr(_mod, _attr))


if __name__ == "__main__":  # pragma: no cover
    main()
