"""Weighted loss on per-atom energy, forces and stress, with NaN labels masked out.

Each term is a sum of elementwise errors divided by a count of labelled entries. The sums
and the counts are returned separately so that a data-parallel run can divide every rank's
sum by the *global* count and reproduce the single-process loss of the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mlip.data.graph import GraphBatch

TERMS = ("energy", "forces", "stress")


def elementwise(diff: torch.Tensor, kind: str = "mse", delta: float = 0.01) -> torch.Tensor:
    """Elementwise penalty of ``diff``: ``diff**2`` (mse) or Huber with threshold ``delta``.

    >>> elementwise(torch.tensor([0.5, 2.0]), "huber", 1.0).tolist()
    [0.125, 1.5]
    """
    if kind == "mse":
        return diff.square()
    if kind == "huber":
        return torch.nn.functional.huber_loss(diff, torch.zeros_like(diff), reduction="none", delta=delta)
    raise ValueError(f"unknown loss kind {kind!r}; choose mse or huber")


@dataclass
class LossWeights:
    energy: float = 1.0
    forces: float = 10.0
    stress: float = 100.0


def loss_sums(
    pred: dict[str, torch.Tensor],
    batch: GraphBatch,
    kind: str = "mse",
    delta: float = 0.01,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-term sums of weighted errors and the number of labelled entries behind each.

    Energy is compared per atom (``(E_pred - E_ref) / n_atoms``); forces per Cartesian
    component; stress per tensor component (9 per structure). Structure weights
    (``batch.weight``) multiply every term of that structure; NaN labels contribute nothing.

    Shapes:
        pred["energy"] [n_graphs] eV, pred["forces"] [n_atoms, 3] eV/Å, pred["stress"]
        [n_graphs, 3, 3] eV/Å³; returns two dicts of 0-d tensors keyed by term.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(batch.energy.dtype)
    w = batch.weight
    zero = batch.energy.new_zeros(())

    mask = torch.isfinite(batch.energy)
    if "energy" in pred and mask.any():
        diff = (pred["energy"][mask] - batch.energy[mask]) / n_atoms[mask]
        sums["energy"] = (w[mask] * elementwise(diff, kind, delta)).sum()
    else:
        sums["energy"] = zero
    counts["energy"] = mask.sum().to(zero.dtype)

    mask = torch.isfinite(batch.forces)  # [n_atoms, 3]
    if "forces" in pred and mask.any():
        wf = w[batch.batch][:, None].expand_as(batch.forces)
        diff = pred["forces"][mask] - batch.forces[mask]
        sums["forces"] = (wf[mask] * elementwise(diff, kind, delta)).sum()
    else:
        sums["forces"] = zero
    counts["forces"] = mask.sum().to(zero.dtype)

    mask = torch.isfinite(batch.stress)  # [n_graphs, 3, 3]
    if "stress" in pred and mask.any():
        ws = w[:, None, None].expand_as(batch.stress)
        diff = pred["stress"][mask] - batch.stress[mask]
        sums["stress"] = (ws[mask] * elementwise(diff, kind, delta)).sum()
    else:
        sums["stress"] = zero
    counts["stress"] = mask.sum().to(zero.dtype)
    return sums, counts


def combine(
    sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], weights: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_t weight_t * sums_t / max(counts_t, 1)``; also returns each unweighted term."""
    terms = {t: sums[t] / counts[t].clamp(min=1) for t in TERMS}
    total = sum(getattr(weights, t) * terms[t] for t in TERMS)
    return total, terms


def weights_at_epoch(cfg, epoch: int) -> LossWeights:
    """Loss weights of ``epoch`` (0-based) under ``LossConfig`` ``cfg`` (stage two included)."""
    st = cfg.stage_two
    if st.start_epoch is not None and epoch >= st.start_epoch:
        return LossWeights(st.energy_weight, st.forces_weight, st.stress_weight)
    return LossWeights(cfg.energy_weight, cfg.forces_weight, cfg.stress_weight)


def needs(weights: LossWeights, batch: GraphBatch) -> tuple[bool, bool]:
    """Whether forces / stress must be predicted for this batch (weighted and labelled)."""
    want_f = weights.forces > 0 and bool(torch.isfinite(batch.forces).any())
    want_s = weights.stress > 0 and bool(torch.isfinite(batch.stress).any())
    return want_f, want_s
