"""Errors of a model on data: the one evaluation loop (:func:`evaluate_batches`) behind validation
during training, test metrics and ``mlip evaluate`` (with the measured rotation-equivariance error
and the predicted/reference values for parity plots)."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlip.data.graph import BoundedBatchSampler, GraphBatch, collate
from mlip.data.split import isolated_indices
from mlip.models.base import PotentialModel
from mlip.models.outputs import predict
from mlip.train.equivariance import equivariance_error
from mlip.train.loss import TERMS, loss_sums
from mlip.train.metrics import Metrics


@dataclass
class Evaluation:
    """What :func:`evaluate_batches` accumulates (this process's share; reduce over ranks yourself).

    Shapes:
        loss_sums, loss_counts: [3] float64, the :data:`~mlip.train.loss.TERMS` energy, forces, stress.
    """

    metrics: Metrics
    loss_sums: torch.Tensor
    loss_counts: torch.Tensor


def evaluate_batches(
    model: PotentialModel,
    batches: Iterable[GraphBatch],
    device: torch.device,
    dtype: torch.dtype,
    stress: bool = True,
    loss_kind: str = "mse",
    huber_delta: float = 0.01,
    collect: dict[str, list] | None = None,
) -> Evaluation:
    """The one evaluation loop (validation during training, ``mlip evaluate``, test metrics).

    Each batch is moved to ``device``/``dtype`` and predicted with forces (and stress when
    ``stress`` is set and the batch has stress labels); metrics and loss sums accumulate.

    Args:
        model: in eval mode (the caller decides; frame-averaged models average all frames then).
        collect: if given, filled with ``energy_per_atom``, ``forces``, ``stress`` as lists of
            ``(reference, predicted)`` numpy arrays for parity plots.
    """
    metrics = Metrics()
    sums_t = torch.zeros(len(TERMS), dtype=torch.float64)
    counts_t = torch.zeros(len(TERMS), dtype=torch.float64)
    for batch in batches:
        batch = batch.to(device, dtype)
        want_s = stress and bool(torch.isfinite(batch.stress).any())
        pred = {k: v.detach() for k, v in predict(model, batch, forces=True, stress=want_s).items()}
        sums, counts = loss_sums(pred, batch, loss_kind, huber_delta)
        sums_t += torch.stack([sums[k] for k in TERMS]).double().cpu()
        counts_t += torch.stack([counts[k] for k in TERMS]).double().cpu()
        metrics.update(pred, batch)
        if collect is not None:
            _collect(collect, batch, pred, want_s)
    return Evaluation(metrics, sums_t, counts_t)


def _collect(collect: dict[str, list], batch: GraphBatch, pred: dict[str, torch.Tensor], stress: bool) -> None:
    na = (batch.ptr[1:] - batch.ptr[:-1]).to(batch.energy.dtype)
    collect.setdefault("energy_per_atom", []).append(
        ((batch.energy / na).cpu().numpy(), (pred["energy"] / na).cpu().numpy()))
    collect.setdefault("forces", []).append((batch.forces.cpu().numpy(), pred["forces"].cpu().numpy()))
    if stress:
        collect.setdefault("stress", []).append((batch.stress.cpu().numpy(), pred["stress"].cpu().numpy()))


def evaluate_split(
    model: PotentialModel,
    split: Any,
    max_atoms: int | None = 512,
    equivariance_structures: int = 8,
    n_rotations: int = 3,
    seed: int = 0,
    collect: dict[str, list] | None = None,
    max_edges: int | None = None,
    max_graphs: int | None = None,
) -> dict:
    """Metrics of ``model`` on every structure of ``split`` (a map-style dataset of AtomGraphs).

    Args:
        max_atoms, max_edges, max_graphs: bounds of an evaluation batch (at least one; edges
            need ``split.n_edges``).
        equivariance_structures: how many structures enter the rotation test (0 = skip).
        collect: see :func:`evaluate_batches`.

    Returns:
        :meth:`Metrics.summary` over every structure but the isolated-atom reference frames,
        ``equivariance_*`` (see :func:`~mlip.train.equivariance.equivariance_error`), and
        ``isolated_atoms`` ({symbol: {reference, predicted}} in eV) for the reference frames.
    """
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float64
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    n_atoms = np.asarray(split.n_atoms) if hasattr(split, "n_atoms") else np.array(
        [split[i].n_atoms for i in range(len(split))])
    # isolated atoms are reference points for E0s, not test data: reported apart from the metrics
    single = isolated_indices(split, n_atoms)
    many = np.setdiff1d(np.arange(len(n_atoms)), single)
    n_edges = np.asarray(split.n_edges)[many] if max_edges is not None else None
    sampler = BoundedBatchSampler(n_atoms[many], n_edges, max_atoms=max_atoms, max_edges=max_edges,
                                  max_graphs=max_graphs)
    batches = (collate([split[i] for i in many[pos].tolist()]) for pos in sampler)
    out = evaluate_batches(model, batches, device, dtype, collect=collect).metrics.summary()
    if len(single):
        from ase.data import chemical_symbols

        batch = collate([split[int(i)] for i in single]).to(device, dtype)
        energy = predict(model, batch, forces=False)["energy"].detach().cpu().tolist()
        out["isolated_atoms"] = {
            chemical_symbols[int(z)]: {"reference": float(r), "predicted": float(p)}
            for z, r, p in zip(batch.numbers.tolist(), batch.energy.tolist(), energy)
        }
    n = min(equivariance_structures, len(many))
    if n > 0:
        batch = collate([split[int(i)] for i in many[:n]]).to(device, dtype)
        eq = equivariance_error(model, batch, n_rotations=n_rotations, seed=seed)
        out.update({f"equivariance_{k}": v for k, v in eq.items()})
    return out


def evaluate_paths(
    model: PotentialModel,
    paths: Sequence[str | os.PathLike],
    keys: Any = None,
    max_atoms: int | None = 512,
    plots_dir: str | os.PathLike | None = None,
    equivariance_structures: int = 8,
) -> dict:
    """Read ``paths`` (any format mlip reads) at the model's cutoff and evaluate; optionally
    write parity plots ``parity_{energy_per_atom,forces,stress}.png`` into ``plots_dir``."""
    from mlip.data.datasets import open_dataset

    dataset = open_dataset([str(p) for p in paths], r_max=model.r_max, keys=keys)
    if len(dataset) == 0:
        raise ValueError(f"no structures in {', '.join(map(str, paths))}")
    collect: dict[str, list] | None = {} if plots_dir is not None else None
    result = evaluate_split(model, dataset, max_atoms=max_atoms, equivariance_structures=equivariance_structures,
                            collect=collect)
    result["data"] = [str(p) for p in paths]
    if collect:
        from mlip.train.plots import parity_plots

        values = {k: (np.concatenate([r.ravel() for r, _ in v]), np.concatenate([p.ravel() for _, p in v]))
                  for k, v in collect.items()}
        result["plots"] = [str(p) for p in parity_plots(values, Path(plots_dir))]
    return result


def format_report(result: dict) -> str:
    """Human-readable table of an evaluation result (meV units)."""
    lines = [f"structures: {result['n_structures']}, atoms: {result['n_atoms']}"]

    def row(label: str, key: str, unit: str) -> None:
        v = result.get(key, float("nan"))
        if v == v:
            lines.append(f"  {label:<28s} {1e3 * v:12.3f} {unit}")

    row("energy MAE", "energy_mae", "meV")
    row("energy RMSE", "energy_rmse", "meV")
    row("energy MAE per atom", "energy_per_atom_mae", "meV/atom")
    row("energy RMSE per atom", "energy_per_atom_rmse", "meV/atom")
    row("force MAE", "forces_mae", "meV/Å")
    row("force RMSE", "forces_rmse", "meV/Å")
    for sym, m in result.get("forces_per_element", {}).items():
        lines.append(f"  force MAE / RMSE {sym:<10s} {1e3 * m['mae']:12.3f} / {1e3 * m['rmse']:.3f} meV/Å "
                     f"({m['n_atoms']} atoms)")
    row("stress MAE", "stress_mae", "meV/Å³")
    for sym, v in result.get("isolated_atoms", {}).items():
        lines.append(f"  isolated {sym:<3s} reference {v['reference']:.4f} eV, predicted {v['predicted']:.4f} eV")
    if "equivariance_energy_max" in result:
        lines.append(f"  rotation equivariance: max |ΔE| {result['equivariance_energy_max']:.3e} eV/atom, "
                     f"max |ΔF| {result['equivariance_forces_max']:.3e} eV/Å, "
                     f"relative F error {result['equivariance_forces_rel']:.3e}")
    return "\n".join(lines)
