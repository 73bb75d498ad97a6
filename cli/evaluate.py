"""``mlip evaluate``: errors of a model on labelled data, equivariance error and parity plots."""
from __future__ import annotations

import json

import click


@click.command("evaluate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(dir_okay=False), default="results.json", show_default=True,
              help="Where to write the metrics as JSON.")
@click.option("--plots", "plots", type=click.Path(file_okay=False), default=None,
              help="Folder for parity plots (PNG); none if omitted.")
@click.option("--max-atoms", type=int, default=512, show_default=True, help="Atoms per evaluation batch.")
@click.option("--equivariance-structures", type=int, default=8, show_default=True,
              help="Structures used to measure the rotation-equivariance error (0 = skip).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--key", "keys", multiple=True, metavar="LABEL=NAME",
              help="Where a label is stored in DATA, e.g. --key energy=REF_energy (repeatable; "
                   "the same fields as the training config's data.keys).")
def evaluate(model: str, data: tuple[str, ...], out: str, plots: str | None, max_atoms: int,
             equivariance_structures: int, device: str, keys: tuple[str, ...]) -> None:
    """Evaluate MODEL on labelled DATA files (any format mlip reads).

    Prints and writes energy MAE/RMSE (total and per atom), force MAE/RMSE (overall and per
    element), stress MAE and the measured rotation-equivariance error of energy and forces.

    Example:

    \b
        mlip evaluate runs/quickstart/model.pt data/emt_crystals.xyz --plots runs/quickstart/parity
    """
    from mlip.models.base import load_model
    from mlip.train.config import ConfigError, check_label_keys
    from mlip.train.evaluate import evaluate_paths, format_report

    label_keys = None
    if keys:
        from mlip.data.formats import LabelKeys

        pairs = dict(k.split("=", 1) for k in keys if "=" in k)
        if len(pairs) != len(keys):
            raise click.UsageError(f"--key takes LABEL=NAME (e.g. energy=REF_energy), got {list(keys)}")
        try:
            check_label_keys(pairs)
        except ConfigError as err:
            raise click.UsageError(str(err).replace("data.keys.", "--key ")) from err
        label_keys = LabelKeys(**pairs)
    try:
        net = load_model(model, map_location=device)
        result = evaluate_paths(net, data, keys=label_keys, max_atoms=max_atoms, plots_dir=plots,
                                equivariance_structures=equivariance_structures)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    result["model"] = model
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    click.echo(format_report(result))
    click.echo(f"metrics written to {out}")
