"""Error metrics accumulated over batches: energy (total and per atom), forces (overall and per
element) and stress; MAE and RMSE in eV, eV/Å and eV/Å³.

Conventions: energy errors are per structure; force MAE/RMSE run over Cartesian components of
labelled atoms (the MACE/NequIP convention); stress errors run over the 9 tensor components.
Missing (NaN) labels are skipped. Sums are kept in float64 so that data-parallel ranks can add
them (:meth:`Metrics.all_reduce`).
"""
from __future__ import annotations

import math

import torch
from ase.data import chemical_symbols

from mlip.data.graph import GraphBatch

_N_Z = 119
# slot layout of the scalar accumulator
_SLOTS = ("e_n", "e_abs", "e_sq", "epa_abs", "epa_sq", "f_n", "f_abs", "f_sq", "s_n", "s_abs", "s_sq", "n_graphs", "n_atoms")


class Metrics:
    """Running sums of prediction errors.

    Example:
        >>> m = Metrics()
        >>> # m.update(pred, batch) for each batch, then
        >>> m.summary()["n_structures"]
        0
    """

    def __init__(self) -> None:
        self.scalars = torch.zeros(len(_SLOTS), dtype=torch.float64)
        self.per_z = torch.zeros(3, _N_Z, dtype=torch.float64)  # [count of components, abs sum, sq sum]

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        self.scalars[_SLOTS.index(name)] += float(value)

    @torch.no_grad()
    def update(self, pred: dict[str, torch.Tensor], batch: GraphBatch) -> None:
        """Add the errors of one batch (``pred`` from :func:`mlip.models.outputs.predict`)."""
        n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(torch.float64).cpu()
        self._add("n_graphs", batch.n_graphs)
        self._add("n_atoms", batch.n_atoms)
        ref = batch.energy.detach().to(torch.float64).cpu()
        mask = torch.isfinite(ref)
        if "energy" in pred and mask.any():
            d = pred["energy"].detach().to(torch.float64).cpu()[mask] - ref[mask]
            self._add("e_n", mask.sum())
            self._add("e_abs", d.abs().sum())
            self._add("e_sq", d.square().sum())
            dpa = d / n_atoms[mask]
            self._add("epa_abs", dpa.abs().sum())
            self._add("epa_sq", dpa.square().sum())
        ref = batch.forces.detach().to(torch.float64).cpu()
        mask = torch.isfinite(ref)
        if "forces" in pred and mask.any():
            d = torch.where(mask, pred["forces"].detach().to(torch.float64).cpu() - ref, torch.zeros_like(ref))
            self._add("f_n", mask.sum())
            self._add("f_abs", d.abs().sum())
            self._add("f_sq", d.square().sum())
            z = batch.numbers.cpu().long()
            self.per_z[0].index_add_(0, z, mask.sum(1).to(torch.float64))
            self.per_z[1].index_add_(0, z, d.abs().sum(1))
            self.per_z[2].index_add_(0, z, d.square().sum(1))
        ref = batch.stress.detach().to(torch.float64).cpu()
        mask = torch.isfinite(ref)
        if "stress" in pred and mask.any():
            d = pred["stress"].detach().to(torch.float64).cpu()[mask] - ref[mask]
            self._add("s_n", mask.sum())
            self._add("s_abs", d.abs().sum())
            self._add("s_sq", d.square().sum())

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum the accumulators over data-parallel ranks (no-op without torch.distributed).

        ``device``: where the collective runs (a CUDA device under NCCL)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([self.scalars, self.per_z.flatten()]).to(device)
            dist.all_reduce(flat)
            flat = flat.cpu()
            self.scalars = flat[: len(_SLOTS)].clone()
            self.per_z = flat[len(_SLOTS):].view(3, _N_Z).clone()

    def summary(self) -> dict:
        """Metrics as plain floats (NaN where no label of that kind was seen).

        Keys: ``energy_mae``, ``energy_rmse`` (eV), ``energy_per_atom_mae``,
        ``energy_per_atom_rmse`` (eV/atom), ``forces_mae``, ``forces_rmse`` (eV/Å),
        ``forces_per_element`` ({symbol: {mae, rmse, n_atoms}}), ``stress_mae``, ``stress_rmse``
        (eV/Å³), ``n_structures``, ``n_atoms``.
        """
        s = dict(zip(_SLOTS, self.scalars.tolist()))

        def ratio(a: float, n: float) -> float:
            return a / n if n > 0 else math.nan

        out = {
            "energy_mae": ratio(s["e_abs"], s["e_n"]),
            "energy_rmse": math.sqrt(ratio(s["e_sq"], s["e_n"])),
            "energy_per_atom_mae": ratio(s["epa_abs"], s["e_n"]),
            "energy_per_atom_rmse": math.sqrt(ratio(s["epa_sq"], s["e_n"])),
            "forces_mae": ratio(s["f_abs"], s["f_n"]),
            "forces_rmse": math.sqrt(ratio(s["f_sq"], s["f_n"])),
            "stress_mae": ratio(s["s_abs"], s["s_n"]),
            "stress_rmse": math.sqrt(ratio(s["s_sq"], s["s_n"])),
            "n_structures": int(s["n_graphs"]),
            "n_atoms": int(s["n_atoms"]),
        }
        per = {}
        for z in torch.nonzero(self.per_z[0] > 0).flatten().tolist():
            n = float(self.per_z[0, z])
            per[chemical_symbols[z]] = {
                "mae": float(self.per_z[1, z]) / n,
                "rmse": math.sqrt(float(self.per_z[2, z]) / n),
                "n_atoms": int(round(n / 3)),
            }
        out["forces_per_element"] = per
        return out


def format_summary(summary: dict) -> str:
    """One line of the main metrics in meV units, for progress bars and logs."""
    parts = []
    for key, label, scale in (
        ("energy_per_atom_mae", "E/at MAE", 1e3),
        ("forces_mae", "F MAE", 1e3),
        ("forces_rmse", "F RMSE", 1e3),
        ("stress_mae", "S MAE", 1e3),
    ):
        v = summary.get(key, math.nan)
        if v == v:  # not NaN
            parts.append(f"{label} {v * scale:.2f}")
    return ", ".join(parts) + " (meV, meV/Å, meV/Å³)" if parts else "no labelled data"
