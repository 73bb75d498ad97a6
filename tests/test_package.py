"""Packaging and command-line surface: one `mlip` script, cli/ installed as mlip.cli."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlip.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _commands(group, prefix=()):
    import click

    for name, cmd in group.commands.items():
        path = prefix + (name,)
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path)


def test_help_lists_every_command_with_a_purpose():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name, cmd in main.commands.items():
        assert name in result.output
        assert cmd.get_short_help_str().strip(), f"command {name} has no one-line purpose"


def test_every_command_help_has_an_example():
    for path, cmd in _commands(main):
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, f"`mlip {' '.join(path)} --help` shows no example"


def test_version_option():
    import mlip

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and mlip.__version__ in result.output


@pytest.mark.slow
def test_wheel_installs_cli_under_mlip_namespace(tmp_path):
    """The wheel holds mlip/ and mlip/cli/ only: no top-level `cli` module."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mlip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top <= {"mlip", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "mlip/cli/main.py" in names
    # every python package under mlip/ in the source tree is in the wheel
    for init in (ROOT / "mlip").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel: add it to [tool.setuptools] packages"
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mlip = mlip.cli.main:main" in entry


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = readme.split("<!-- test-command -->", 2)[1]
    command = [l for l in block.splitlines() if l.strip() and not l.startswith("```")][0].strip()
    assert command in ci.splitlines(), "README's test command and .ci/run differ"
    assert ci.index("torch==2.13.0") <= ci.index(command)
