"""TorchSim's model interface for mlip potentials, so they run in TorchSim's batched integrators.

Needs the optional package ``torch-sim-atomistic`` (``pip install torch-sim-atomistic``). One call
evaluates every system of a ``SimState`` together: edges come from
:func:`mlip.data.neighbors.batch_neighbor_list`, the batch from
:func:`mlip.calculator.inference.inference_batch` (the ASE calculator's builder and charge/spin/head
policy), energies/forces/stress from :func:`mlip.models.outputs.predict` (stress 3x3, ASE sign, as
TorchSim expects).
"""
from __future__ import annotations

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

from mlip.calculator.ase import prepare_model, resolve_device
from mlip.calculator.inference import check_charge_spin, inference_batch, structure_settings, uses_charge_spin
from mlip.data.neighbors import batch_neighbor_list
from mlip.dtypes import resolve_dtype
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
            carry them); needed only by models built with ``use_charge_spin``, which raise the ASE
            calculator's error here if they are missing.
        neighbor_backend: see :func:`mlip.data.neighbors.neighbor_list` (``"auto"`` as in the calculator).

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
        neighbor_backend: str = "auto",
    ) -> None:
        super().__init__()
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype)
        self._compute_stress = bool(compute_stress)
        self._compute_forces = bool(compute_forces)
        self._memory_scales_with = "n_atoms_x_density"
        self.model = prepare_model(model, self._device, self._dtype)
        self.neighbor_backend = neighbor_backend
        # a state carries no info dict: every system gets the caller's values, else NaN
        self.charge, self.spin, self.head = structure_settings({}, charge, spin, head)
        self.uses_charge_spin = uses_charge_spin(self.model, [self.head])[0]
        if self.uses_charge_spin:  # fail at construction, not at the first step
            check_charge_spin(torch.tensor([self.charge]), torch.tensor([self.spin]), [self.head])

    def forward(self, state: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energies (and forces, stress) of every system in ``state`` (a ``SimState`` or its dict)."""
        if isinstance(state, dict):
            state = ts.SimState(**state, masses=torch.ones_like(state["positions"][:, 0]))
        dev = self._device
        positions = state.positions.detach().to(device=dev)
        cell = state.row_vector_cell.detach().to(device=dev)  # [n_systems, 3, 3], rows = lattice vectors
        system_idx = state.system_idx.to(dev)
        n_systems = int(cell.shape[0])
        pbc = torch.as_tensor(state.pbc, dtype=torch.bool, device=dev)
        pbc = pbc.expand(n_systems, 3) if pbc.ndim <= 1 else pbc
        if pbc.ndim == 2 and pbc.shape[0] == 1 and n_systems > 1:
            pbc = pbc.expand(n_systems, 3)
        edge_index, unit_shifts = batch_neighbor_list(
            positions.to(torch.float64), cell.to(torch.float64), pbc, system_idx, self.model.r_max,
            backend=self.neighbor_backend,
        )
        batch = inference_batch(
            positions, state.atomic_numbers, cell, pbc, edge_index, unit_shifts, batch=system_idx,
            charge=[self.charge] * n_systems, spin=[self.spin] * n_systems, head=[self.head] * n_systems,
            dtype=self._dtype, needs_charge_spin=self.uses_charge_spin,
        )
        out = predict(self.model, batch, forces=self._compute_forces, stress=self._compute_stress)
        result = {"energy": out["energy"].detach()}
        if self._compute_forces:
            result["forces"] = out["forces"].detach()
        if self._compute_stress:
            result["stress"] = out["stress"].detach()
        return result
