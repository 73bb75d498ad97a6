"""``mlip export``: compile a model into an AOTInductor package (``.pt2``) for deployment."""
from __future__ import annotations

import click


@click.command("export")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="The package to write (.pt2).")
@click.option("--head", default="default", show_default=True, help="The head the package evaluates.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: the package runs only there.")
def export(model: str, out: str, head: str, dtype: str, device: str) -> None:
    """Export MODEL's energy/forces/stress function as an AOTInductor package.

    The package runs without mlip's Python model code (C++, TorchSim, the ASE calculator), for any
    number of atoms and edges, one structure per call. MLIPCalculator("model.pt2"), mlip md and
    mlip relax load it like model.pt. Compiling takes a minute or more (a C++ compiler is needed).
    See docs/md.md for the input layout and the limits.

    Example:

    \b
        mlip export runs/quickstart/model.pt --out runs/quickstart/model.pt2
    """
    from mlip.export import export_model

    click.echo(f"exporting {model} ({dtype}, {device}, head {head!r}): tracing and compiling ...")
    try:
        path = export_model(model, out, head=head, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {path}")
