"""TorchSim's model interface for mlip potentials, so they run in TorchSim's batched integrators.

Needs the optional package ``torch-sim-atomistic`` (``pip install torch-sim-atomistic``). One call
evaluates every system of a ``SimState`` together: edges come from
:func:`mlip.data.neighbors.batch_neighbor_list`, energies/forces/stress from
:func:`mlip.models.outputs.predict` (stress 3x3, ASE sign, as TorchSim expects).
"""
from __future__ import annotations

import math
from typing import Any

import torch

try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as _err:  # pragma: no cover - exercised only without the optional package
    raise ImportError(
        "mlip.calculator.torchsim needs the optional package torch-sim-atomistic: "
        "pip install torch-sim-atomistic"
    ) from _err

from mlip.calculator.ase import prepare_model, resolve_device, resolve_dtype
from mlip.data.graph import GraphBatch
from mlip.data.neighbors import batch_neighbor_list
from mlip.models.base import PotentialModel
from mlip.models.outputs import predict

__all__ = ["MLIPTorchSimModel"]


class MLIPTorchSimModel(ModelInterface):
    """An mlip :class:`~mlip.models.base.PotentialModel` behind TorchSim's ``ModelInterface``.

    Args:
        model: a loaded model or the path of a model file (a model passed in is not modified).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: ``torch.float32`` / ``torch.float64`` (or their names); the state must use the same.
        compute_stress: return ``stress`` [n_systems, 3, 3] (eV/Å³, ASE sign).
        compute_forces: return ``forces`` [n_atoms, 3] (eV/Å).
        head: model head used for every system.
        charge, spin: total charge and spin multiplicity of every system (TorchSim states do not
            carry them); needed only by models built with ``use_charge_spin``.

    ``forward(state)`` returns ``energy`` [n_systems] (eV) and, if enabled, forces and stress.
    """

    def __init__(
        self,
        model: PotentialModel | str,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = torch.float64,
        compute_stress: bool = True,
        compute_forces: bool = True,
        head: str = "default",
        charge: float | None = None,
        spin: float | None = None,
    ) -> None:
        super().__init__()
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype)
        self._compute_stress = bool(compute_stress)
        self._compute_forces = bool(compute_forces)
        self._memory_scales_with = "n_atoms_x_density"
        self.model = prepare_model(model, self._device, self._dtype)
        self.head = head
        self.charge = float("nan") if charge is None else float(charge)
        self.spin = float("nan") if spin is None else float(spin)
        if getattr(self.model.config, "use_charge_spin", False) and not (
            math.isfinite(self.charge) and math.isfinite(self.spin)
        ):
            raise ValueError("this model uses total charge and spin multiplicity: pass charge= and spin=")

    def forward(self, state: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energies (and forces, stress) of every system in ``state`` (a ``SimState`` or its dict)."""
        if isinstance(state, dict):
            state = ts.SimState(**state, masses=torch.ones_like(state["positions"][:, 0]))
        dev, dt = self._device, self._dtype
        positions = state.positions.detach().to(device=dev)
        cell = state.row_vector_cell.detach().to(device=dev)  # [n_systems, 3, 3], rows = lattice vectors
        system_idx = state.system_idx.to(dev)
        n_systems = int(cell.shape[0])
        pbc = torch.as_tensor(state.pbc, dtype=torch.bool, device=dev)
        pbc = pbc.expand(n_systems, 3) if pbc.ndim <= 1 else pbc
        if pbc.ndim == 2 and pbc.shape[0] == 1 and n_systems > 1:
            pbc = pbc.expand(n_systems, 3)
        edge_index, unit_shifts = batch_neighbor_list(
            positions.to(torch.float64), cell.to(torch.float64), pbc, system_idx, self.model.r_max
        )
        n_atoms = int(positions.shape[0])
        counts = torch.bincount(system_idx, minlength=n_systems)
        ptr = torch.zeros(n_systems + 1, dtype=torch.long, device=dev)
        ptr[1:] = torch.cumsum(counts, 0)
        nan = float("nan")
        batch = GraphBatch(
            positions=positions.to(dt), numbers=state.atomic_numbers.to(dev, torch.long), cell=cell.to(dt),
            pbc=pbc, edge_index=edge_index, unit_shifts=unit_shifts, batch=system_idx, ptr=ptr,
            energy=torch.full((n_systems,), nan, dtype=dt, device=dev),
            forces=torch.full((n_atoms, 3), nan, dtype=dt, device=dev),
            stress=torch.full((n_systems, 3, 3), nan, dtype=dt, device=dev),
            charge=torch.full((n_systems,), self.charge, dtype=dt, device=dev),
            spin=torch.full((n_systems,), self.spin, dtype=dt, device=dev),
            weight=torch.ones(n_systems, dtype=dt, device=dev), head=[self.head] * n_systems,
        )
        out = predict(self.model, batch, forces=self._compute_forces, stress=self._compute_stress)
        result = {"energy": out["energy"].detach()}
        if self._compute_forces:
            result["forces"] = out["forces"].detach()
        if self._compute_stress:
            result["stress"] = out["stress"].detach()
        return result
