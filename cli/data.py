"""``mlip data``: inspect, convert and split data files (any format mlip reads)."""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click
import numpy as np

from mlip import keys as K
from mlip.atomic import atomic_path

#: info keys recomputed on reading, never written back
_DERIVED_INFO = (K.SOURCE, K.ORIGINAL_SOURCE, K.ISOLATED, K.ENERGY, K.STRESS)
#: (option, LabelKeys field) of the label-key options shared by the commands
_KEY_OPTIONS = (
    ("--energy-key", "energy"), ("--forces-key", "forces"), ("--stress-key", "stress"),
    ("--charge-key", "charge"), ("--spin-key", "spin"), ("--weight-key", "weight"), ("--head-key", "head"),
)


def _key_options(fn: Callable) -> Callable:
    """Add ``--energy-key`` ... ``--head-key``: where each label sits in the input file."""
    for option, label in reversed(_KEY_OPTIONS):
        fn = click.option(option, f"{label}_key", default=None, metavar="NAME",
                          help=f"Name of the {label} label in the input (default: {label}).")(fn)
    return fn


def _label_keys(options: dict[str, Any]) -> Any:
    from mlip.data.formats import LabelKeys

    given = {label: options[f"{label}_key"] for _, label in _KEY_OPTIONS if options.get(f"{label}_key")}
    return LabelKeys(**given)


def _required(value: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip()) if value else ()


_REQUIRE_OPTION = click.option(
    "--require", "require", default=None, metavar="LABELS",
    help="Comma-separated labels every structure must carry, e.g. energy,forces.")


@contextlib.contextmanager
def _data_errors() -> Iterator[None]:
    """Turn bad-input errors into a one-line ``Error: ...`` (click.ClickException), no traceback."""
    try:
        yield
    except (ValueError, KeyError, OSError) as err:
        message = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
        raise click.ClickException(" ".join(message.split())) from err


@click.group("data")
def data() -> None:
    """Inspect, convert, split and sample data files.

    Formats (by extension): extended XYZ (.xyz, .extxyz), ASE database (.db, .aselmdb),
    MPTrj JSON (.json, .json.gz) and mlip HDF5 (.h5, .hdf5). Units: eV, Å, eV/Å, eV/Å³.

    Example:

    \b
        mlip data inspect data/emt_crystals.xyz
        mlip data convert data/emt_crystals.xyz emt.h5
        mlip data split emt.h5 --fractions 0.8,0.1,0.1 --seed 0 --out-dir splits
        mlip data sample emt.h5 replay.h5 --fraction 0.1
    """


# ----------------------------------------------------------------------------- inspect
@data.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_key_options
@click.option("--e0s", "show_e0s", is_flag=True,
              help="Also print per-element E0s (per head): from isolated atoms and from the least-squares "
                   "fit that training uses (holds the compositions of all structures in memory). Two "
                   "isolated atoms of one element with different energies are an error.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def inspect(file: str, show_e0s: bool, as_json: bool, **key_options: Any) -> None:
    """Summarize FILE: sizes, elements, label coverage, energy/force/stress ranges.

    Streams through the file once, checking every structure (a bad frame stops with an
    error naming the file, the frame and the key).

    Example:

    \b
        mlip data inspect data/emt_crystals.xyz
        mlip data inspect train.xyz --energy-key REF_energy --forces-key REF_forces --e0s
    """
    from mlip.data.formats import iter_read
    from mlip.data.stats import format_summary, summarize

    with _data_errors():
        keys = _label_keys(key_options)
        frames: Iterable = iter_read(file, keys=keys)
        tables: dict = {}
        if show_e0s:
            frames = _keep_light(frames, tables)
        summary = summarize(frames)
        e0s = _e0_tables(tables) if show_e0s else {}
    if as_json:
        out = dict(summary, file=file)
        out["charges"] = {f"{k:g}": v for k, v in summary["charges"].items()}
        out["spins"] = {f"{k:g}": v for k, v in summary["spins"].items()}
        out.update({f"e0s_{k}": v for k, v in e0s.items()})
        click.echo(json.dumps(out, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
        return
    click.echo(format_summary(summary, title=file))
    for how, table in e0s.items():
        click.echo(f"  E0s from {how.replace('_', ' ')} [eV]:")
        if isinstance(table, str):
            click.echo(f"    {table}")
            continue
        from ase.data import chemical_symbols

        for z, value in table.items():
            click.echo(f"    {chemical_symbols[int(z)]:<4s} {value:16.8f}")


def _keep_light(frames: Iterable, tables: dict) -> Iterable:
    """Pass frames through, recording what the E0s need (numbers, energy, isolated flag) per head."""
    from mlip.data.formats import is_isolated_atom
    from mlip.data.stats import E0Table

    for i, atoms in enumerate(frames):
        energy = atoms.info.get(K.ENERGY)
        tables.setdefault(str(atoms.info.get(K.HEAD, "default")), E0Table()).add(
            atoms.numbers, float("nan") if energy is None else float(energy), is_isolated_atom(atoms),
            str(atoms.info.get(K.SOURCE, f"structure {i}")))
        yield atoms


def _e0_tables(tables: dict) -> dict[str, Any]:
    """E0s from isolated atoms and from a fit, per head (the head's name is added when there are
    several); a string explains why one is not available."""
    import warnings

    out: dict[str, Any] = {}
    for head, table in sorted(tables.items()):
        suffix = "" if len(tables) == 1 else f"_{head}"
        try:
            out["isolated_atoms" + suffix] = table.from_isolated()
        except ValueError as err:
            out["isolated_atoms" + suffix] = f"not available: {err}"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out["least_squares_fit" + suffix] = table.fit()
            for w in caught:
                click.echo(f"Warning: {w.message}", err=True)
        except ValueError as err:
            out["least_squares_fit" + suffix] = f"not available: {err}"
    return out


# ----------------------------------------------------------------------------- convert
@data.command("convert")
@click.argument("inputs", metavar="IN...", nargs=-1, required=True)
@click.argument("output", metavar="OUT")
@_key_options
@_REQUIRE_OPTION
@click.option("--shard-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Write OUT as a folder of HDF5 shards of N structures each (plus manifest.json, written "
                   "last); the folder trains as one data set. An interrupted conversion is continued by "
                   "rerunning the same command.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes that parse and check frames; the output does not depend on it.")
@click.option("--skip-bad", is_flag=True,
              help="Skip bad frames (malformed, a required label missing, NaN) and count them in the summary, "
                   "instead of stopping at the first one.")
@click.option("--chunk-size", type=int, default=1024, show_default=True, help="Structures per HDF5 write.")
def convert(inputs: tuple[str, ...], output: str, require: str | None, shard_size: int | None, workers: int,
            skip_bad: bool, chunk_size: int, **key_options: Any) -> None:
    """Convert IN... (files, folders, globs; any format) to mlip's HDF5 OUT, streaming.

    Inputs are read in the order given, a folder's data files (e.g. OMol25's *.aselmdb) in name
    order; MPTrj JSON is parsed as a stream, so memory stays far below the file size. Labels
    are stored under mlip's canonical names; every structure is checked on the way, and a bad
    one stops the conversion with an error naming the file, the frame, its id (mp-id/frame-id
    or database row) and the key, leaving no output that looks complete (OUT is written to a
    temporary file and renamed at the end; a shard folder gets its manifest.json last).

    Example:

    \b
        mlip data convert data/emt_crystals.xyz emt.h5
        mlip data convert mace_train.xyz train.h5 --energy-key REF_energy --forces-key REF_forces
        mlip data convert MPtrj_2022.9_full.json mptrj/ --shard-size 100000 --workers 4 --skip-bad
        mlip data convert omol/train_4M/ omol_h5/ --shard-size 100000 --workers 8
    """
    from tqdm import tqdm

    from mlip.data.formats import detect_format
    from mlip.data.formats.convert import convert as run_convert

    with _data_errors():
        if shard_size is None and detect_format(output) != "hdf5":
            raise click.ClickException(f"{output}: the output must be an HDF5 file (.h5 or .hdf5), or a "
                                       "folder with --shard-size")
        if shard_size is not None and os.path.splitext(output)[1].lower() in (".h5", ".hdf5"):
            raise click.ClickException(f"{output}: with --shard-size the output is a folder (no .h5 extension)")
        with tqdm(unit=" frames", desc="convert", disable=None, dynamic_ncols=True) as bar:
            summary = run_convert(list(inputs), output, keys=_label_keys(key_options), required=_required(require),
                                  shard_size=shard_size, workers=workers, skip_bad=skip_bad,
                                  chunk_size=chunk_size, progress=bar.update)
    where = output if shard_size is None else f"{output} ({len(summary.outputs)} shards)"
    if summary.resumed:
        click.echo(f"{summary.resumed} structures were already converted by an earlier run; continued from there")
    click.echo(f"wrote {summary.n_structures} structures to {where}")
    if summary.n_bad:
        click.echo(f"skipped {summary.n_bad} bad frames:")
        for message in summary.bad[:10]:
            click.echo(f"  {message}")
        if summary.n_bad > 10:
            click.echo(f"  ... {summary.n_bad - 10} more" + (" (listed in manifest.json)" if shard_size else ""))


# ----------------------------------------------------------------------------- split
@data.command("split")
@click.argument("input_file", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.option("--fractions", default="0.8,0.1,0.1", show_default=True,
              help="Comma-separated train,valid[,test] fractions summing to 1.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random assignment.")
@click.option("--out-dir", type=click.Path(file_okay=False), required=True, help="Folder for the split files.")
@click.option("--format", "out_format", type=click.Choice(["auto", "extxyz", "hdf5"]), default="auto",
              show_default=True,
              help="Output format; auto = extxyz for .xyz/.extxyz input, HDF5 for .h5 (and other formats).")
@_key_options
@_REQUIRE_OPTION
def split(input_file: str, fractions: str, seed: int, out_dir: str, out_format: str,
          require: str | None, **key_options: Any) -> None:
    """Split IN randomly into train/valid/test files, reproducibly for a given --seed.

    Structures are assigned by a random permutation drawn from --seed; each part keeps the
    input order. Part sizes are the fractions of the total, rounded so they add up exactly.
    Isolated-atom reference frames always go to train (they set the E0s); the fractions apply
    to the other structures. Training's valid_fraction/test_fraction split the same way.
    Outputs carry mlip's canonical label names (energy, forces, stress, charge, spin, ...).

    Example:

    \b
        mlip data split data/emt_crystals.xyz --fractions 0.8,0.1,0.1 --seed 0 --out-dir splits
        # -> splits/train.xyz, splits/valid.xyz, splits/test.xyz
    """
    from mlip.data.formats import HDF5Reader, detect_format, is_isolated_atom, iter_read, write_hdf5
    from mlip.data.split import isolated_indices, split_indices

    with _data_errors():
        fracs = _parse_fractions(fractions)
        names = ("train", "valid", "test")[: len(fracs)]
        in_format = detect_format(input_file)
        fmt = out_format if out_format != "auto" else ("extxyz" if in_format == "extxyz" else "hdf5")
        ext = ".xyz" if fmt == "extxyz" else ".h5"
        keys, required = _label_keys(key_options), _required(require)

        if in_format == "hdf5":
            reader = HDF5Reader(input_file)
            n = len(reader)
            isolated = isolated_indices(reader, reader.n_atoms)
        else:
            reader = None
            flags = [is_isolated_atom(a) for a in iter_read(input_file, keys=keys, required=required)]
            n, isolated = len(flags), np.flatnonzero(flags)
        parts = split_indices(n, fracs, seed, keep_in_first=isolated)
        os.makedirs(out_dir, exist_ok=True)
        for name, idx in zip(names, parts):
            path = os.path.join(out_dir, name + ext)
            if len(idx) == 0:
                click.echo(f"{name}: 0 structures, {path} not written")
                continue
            chosen = set(idx.tolist())
            if reader is not None:
                frames: Iterable = (reader[int(i)] for i in idx)
            else:
                frames = (a for i, a in enumerate(iter_read(input_file, keys=keys, required=required)) if i in chosen)
            count = write_hdf5(frames, path) if fmt == "hdf5" else write_extxyz(frames, path)
            click.echo(f"{name}: {count} structures -> {path}")


@data.command("sample")
@click.argument("input_file", metavar="IN", type=click.Path(exists=True))
@click.argument("output_file", metavar="OUT")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Fraction of the structures (isolated atoms aside) to keep.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Number of structures to keep instead.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random choice.")
@_key_options
def sample(input_file: str, output_file: str, fraction: float | None, count: int | None, seed: int,
           **key_options: Any) -> None:
    """Write a random subset of IN to OUT (.xyz or .h5), in input order: e.g. the replay part of the
    pretraining data for fine-tuning (docs/training.md). Isolated-atom reference frames are kept.

    Example:

    \b
        mlip data sample pretrain.h5 replay.h5 --fraction 0.1 --seed 0
    """
    from mlip.data.formats import expand_paths, is_isolated_atom, iter_read, write_hdf5
    from mlip.data.split import split_indices

    if (fraction is None) == (count is None):
        raise click.UsageError("give one of --fraction and --count")
    with _data_errors():
        fmt = _output_format(output_file)
        keys, paths = _label_keys(key_options), expand_paths(input_file)

        def frames() -> Iterable:
            return (a for path in paths for a in iter_read(path, keys=keys))

        flags = [is_isolated_atom(a) for a in frames()]
        n, isolated = len(flags), np.flatnonzero(flags)
        n_rest = n - len(isolated)
        share = fraction if fraction is not None else min(count / max(n_rest, 1), 1.0)
        chosen = set(split_indices(n, [share, 1.0 - share], seed, keep_in_first=isolated)[0].tolist())
        kept = (a for i, a in enumerate(frames()) if i in chosen)
        written = write_hdf5(kept, output_file) if fmt == "hdf5" else write_extxyz(kept, output_file)
    click.echo(f"wrote {written} of {n} structures to {output_file}")


def _output_format(path: str) -> str:
    from mlip.data.formats import detect_format

    fmt = detect_format(path)
    if fmt not in ("hdf5", "extxyz"):
        raise click.ClickException(f"{path}: write .h5 or .xyz")
    return fmt


def _parse_fractions(text: str) -> list[float]:
    try:
        fracs = [float(s) for s in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--fractions")
    if not 2 <= len(fracs) <= 3:
        raise click.BadParameter(f"give 2 or 3 fractions (train,valid[,test]), got {len(fracs)}", param_hint="--fractions")
    if any(not math.isfinite(f) or f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
        raise click.BadParameter(f"fractions must be >= 0 and sum to 1, got {text!r} (sum {sum(fracs):g})",
                                 param_hint="--fractions")
    return fracs


def write_extxyz(frames: Iterable, path: str) -> int:
    """Write canonical ``ase.Atoms`` to extended XYZ under mlip's canonical names; returns the count.

    ``energy``/``forces``/``stress`` (3x3, eV/Å³, ASE sign) go through a ``SinglePointCalculator``
    so that ASE and mlip read them back; ``charge``, ``spin``, ``weight``, ``head``,
    ``config_type`` and other scalar info stay in the comment line. Written to a temporary file
    and renamed at the end.
    """
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            for atoms in frames:
                out = atoms.copy()
                out.calc = None
                results = {}
                # ASE's calculator results take the labels under ASE's own names
                if K.ENERGY in atoms.info:
                    results["energy"] = float(atoms.info[K.ENERGY])
                if K.FORCES in atoms.arrays:
                    results["forces"] = np.asarray(atoms.arrays[K.FORCES], dtype=np.float64)
                    del out.arrays[K.FORCES]
                if K.STRESS in atoms.info:
                    results["stress"] = np.asarray(atoms.info[K.STRESS], dtype=np.float64)
                out.info = {k: v for k, v in atoms.info.items()
                            if k not in _DERIVED_INFO and isinstance(v, (str, bool, int, float, np.number))}
                if results:
                    out.calc = SinglePointCalculator(out, **results)
                write(handle, out, format="extxyz")
                n += 1
    return n
