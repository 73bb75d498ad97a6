"""``mlip predict``: a model's energy, forces and stress for every frame of data files, written as extxyz."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click


def read_frames(path: str) -> list[Any]:
    """Every frame of ``path`` as ``ase.Atoms``, in file order.

    Extended XYZ goes through ASE as it is, so every key of the file (labels under any name, a
    calculator's energy/forces, custom info and arrays) is written back unchanged; other formats go
    through :func:`mlip.data.formats.read` (canonical label names, see ``data/README.md``).
    """
    from ase.io import read

    from mlip.data.formats import detect_format
    from mlip.data.formats import read as read_data

    if detect_format(path) == "extxyz":
        return read(path, index=":", format="extxyz")
    return read_data(path, validate=False)


def batches(frames: Sequence[Any], max_atoms: int) -> Iterator[list[int]]:
    """Indices of consecutive frames, at most ``max_atoms`` atoms per group (a larger frame alone)."""
    from mlip.data.graph import BoundedBatchSampler

    yield from BoundedBatchSampler([len(a) for a in frames], max_atoms=max_atoms)


def predict_frames(net: Any, frames: Sequence[Any], dtype: Any, device: Any, head: str = "default") -> list[dict[str, Any]]:
    """Energy (eV), forces ([n_atoms, 3] eV/Å) and, for 3D-periodic cells, stress ([3, 3] eV/Å³, ASE
    sign) of ``frames`` (one batch), evaluated in one model call.

    Edges come from :func:`mlip.data.neighbors.batch_neighbor_list`, the batch from
    :func:`mlip.calculator.inference.inference_batch` with the calculator's charge/spin/head policy,
    so the values are the calculator's.
    """
    import numpy as np
    import torch

    from mlip.calculator.ase import evaluate_model
    from mlip.calculator.inference import (
        inference_batch,
        structure_settings,
        structure_tensors,
        uses_charge_spin,
    )
    from mlip.data.neighbors import batch_neighbor_list

    tensors = [structure_tensors(a, device) for a in frames]
    positions, numbers = torch.cat([t[0] for t in tensors]), torch.cat([t[1] for t in tensors])
    cell, pbc = torch.stack([t[2] for t in tensors]), torch.stack([t[3] for t in tensors])
    batch = torch.repeat_interleave(torch.arange(len(frames), device=device),
                                    torch.tensor([len(a) for a in frames], device=device))
    edge_index, shifts = batch_neighbor_list(positions, cell, pbc, batch, net.r_max)
    charge, spin, heads = zip(*(structure_settings(a.info, None, None, head) for a in frames))
    graph = inference_batch(positions, numbers, cell, pbc, edge_index, shifts, batch, charge, spin, heads, dtype,
                            needs_charge_spin=uses_charge_spin(net, heads))
    periodic = [bool(np.all(a.pbc)) for a in frames]
    out = {k: v.detach() for k, v in evaluate_model(net, graph, forces=True, stress=any(periodic)).items()}
    ptr = graph.ptr.tolist()
    as_np = lambda t: t.to("cpu", torch.float64).numpy()
    results = []
    for g in range(len(frames)):
        item = {"energy": float(out["energy"][g]), "forces": as_np(out["forces"][ptr[g]:ptr[g + 1]])}
        if periodic[g]:
            s = as_np(out["stress"][g])
            item["stress"] = 0.5 * (s + s.T)
        results.append(item)
    return results


@click.command("predict")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Output extended XYZ file: every input frame, in order, with the predictions added.")
@click.option("--prefix", default="mlip_", show_default=True,
              help="Predictions go to <prefix>energy, <prefix>forces, <prefix>stress.")
@click.option("--head", default="default", show_default=True, help="Model head for frames without info['head'].")
@click.option("--batch-atoms", type=int, default=2048, show_default=True, help="Atoms per model call at most.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def predict(model: str, data: tuple[str, ...], out: str, prefix: str, head: str, batch_atoms: int, device: str,
            dtype: str, progress: bool) -> None:
    """Predict energy, forces and stress with MODEL (model.pt or model.pt2) for every frame of DATA.

    Writes OUT with each input frame unchanged (labels kept) plus <prefix>energy (eV),
    <prefix>forces (eV/Å) and, for cells periodic in all three directions, <prefix>stress
    (3x3, eV/Å³, ASE sign). Frames are evaluated in batches of up to --batch-atoms atoms.

    Example:

    \b
        mlip predict runs/quickstart/model.pt data/emt_crystals.xyz --out runs/quickstart/pred.extxyz
    """
    from ase.io import write
    from tqdm.auto import tqdm

    from mlip.atomic import atomic_path
    from mlip.calculator.ase import prepare_model, resolve_device
    from mlip.dtypes import resolve_dtype

    if batch_atoms < 1:
        raise click.UsageError("--batch-atoms must be at least 1")
    if not prefix:
        raise click.UsageError("--prefix must not be empty: the predictions would overwrite the labels")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    try:
        net = prepare_model(model, dev, dt)
        frames = [a for path in data for a in read_frames(path)]
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise click.ClickException(str(err)) from err
    bar = tqdm(total=len(frames), desc="predict", unit="frame", disable=not progress, dynamic_ncols=True)
    with atomic_path(out) as tmp, open(tmp, "w") as fh:
        for group in batches(frames, batch_atoms):
            chosen = [frames[i] for i in group]
            try:
                results = predict_frames(net, chosen, dt, dev, head)
            except ValueError as err:
                raise click.ClickException(f"frames {group[0]}..{group[-1]}: {err}") from err
            for atoms, result in zip(chosen, results):
                atoms.info[f"{prefix}energy"] = result["energy"]
                atoms.arrays[f"{prefix}forces"] = result["forces"]
                if "stress" in result:
                    atoms.info[f"{prefix}stress"] = result["stress"]
            write(fh, chosen, format="extxyz")
            bar.update(len(chosen))
    bar.close()
    click.echo(f"wrote {len(frames)} frame(s) with {prefix}energy, {prefix}forces, {prefix}stress to {Path(out)}")
