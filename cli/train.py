"""``mlip train``: train a potential from a YAML config (a thin layer over :mod:`mlip.train`)."""
from __future__ import annotations

import click


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value; dotted keys for nested values (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in output_dir from its last.pt exactly.")
@click.option("--init-from", type=click.Path(dir_okay=False), default=None,
              help="Fine-tune: start from this model file's config and weights.")
@click.option("--freeze", multiple=True, metavar="PATTERN",
              help="With --init-from: keep parameters matching this glob fixed (repeatable).")
def train(config: str, overrides: tuple[str, ...], resume: bool, init_from: str | None, freeze: tuple[str, ...]) -> None:
    """Train a potential on your own DFT data.

    CONFIG is a YAML file (every key and default: configs/README.md). The run folder
    (output_dir) receives config.yaml, last.pt/best.pt checkpoints, metrics.csv/jsonl,
    learning_curve.png and the deployable model.pt. Multi-GPU or multi-node: launch the
    same command with torchrun.

    Example:

    \b
        mlip train configs/quickstart.yaml --set train.epochs=50 --set output_dir=runs/qs
        mlip train configs/quickstart.yaml --resume
        torchrun --nproc_per_node 4 -m mlip.cli.main train my.yaml
    """
    from mlip.data.formats import DataError
    from mlip.train.config import ConfigError, load_config
    from mlip.train.loop import TrainingDiverged
    from mlip.train.loop import train as run

    extra = list(overrides)
    if init_from:
        extra.append(f"train.init_from={init_from}")
    if freeze:
        extra.append("train.freeze=[" + ", ".join(repr(f) for f in freeze) + "]")
    try:
        cfg = load_config(config, extra)
    except ConfigError as err:
        raise click.UsageError(str(err)) from err
    try:
        path = run(cfg, resume=resume)
    except (ConfigError, DataError, TrainingDiverged, FileExistsError, FileNotFoundError) as err:
        # bad values found while building data and model, bad data files, divergence: one clear line
        raise click.ClickException(str(err)) from err
    click.echo(f"model written to {path}")
