"""ASE calculator for mlip models, with a neighbour list reused across MD/relaxation steps.

:class:`MLIPCalculator` is a drop-in for MACE's and fairchem's calculators: energy, free_energy,
per-atom ``energies``, forces and (for 3D-periodic cells) Voigt stress in eV, eV/Å and eV/Å³,
for molecules and periodic cells. :class:`NeighborCache` keeps edges built with ``r_max + skin``
and rebuilds them only when the structure moved or deformed enough that a pair could have
crossed the cutoff; edges are filtered to ``|edge_vec| < r_max`` on every call, so the graph the
model sees is exactly the one a full rebuild gives (same edges, same order).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mlip import keys as K
from mlip.calculator.inference import (
    evaluate_model,
    inference_batch,
    structure_settings,
    structure_tensors,
    uses_charge_spin,
)
from mlip.calculator.memory import BudgetedPredictor, budget_bytes
from mlip.data.graph import GraphBatch
from mlip.data.neighbors import neighbor_list
from mlip.dtypes import resolve_dtype
from mlip.models.base import PotentialModel

__all__ = ["MLIPCalculator", "NeighborCache", "evaluate_model", "prepare_model", "resolve_device"]

#: CUDA out-of-memory (``torch.OutOfMemoryError`` since torch 2.5)
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def prepare_model(
    model: PotentialModel | str | Sequence[PotentialModel | str], device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
) -> PotentialModel:
    """A model in eval mode on ``device``/``dtype``: loads a path, copies a model that must change.

    A model passed in is never modified: if it lives on another device or dtype, a deep copy is
    converted, so the caller's model (e.g. one still being trained) is left as it was. A list of
    models (or paths) becomes a :class:`~mlip.calculator.committee.Committee`; a ``.pt2`` path an
    :class:`~mlip.export.ExportedModel` (its dtype was fixed when it was exported).
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if isinstance(model, (list, tuple)):
        from mlip.calculator.committee import Committee

        return Committee([prepare_model(m, dev, dt) for m in model])
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".pt2"):
        from mlip.export import ExportedModel

        return ExportedModel(model, device=dev)
    if not isinstance(model, torch.nn.Module) and hasattr(model, "predict_batch"):
        return model  # a Committee or ExportedModel: prepared when it was made
    if not isinstance(model, torch.nn.Module):
        from mlip.models.base import load_model

        return load_model(model, map_location=dev).to(device=dev, dtype=dt).eval()
    params = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    same = all(p.device == dev and p.dtype == dt for p in params)
    if same and not model.training:
        return model
    return _copy_model(model).to(device=dev, dtype=dt).eval()


def _copy_model(model: PotentialModel) -> PotentialModel:
    """An independent copy: rebuilt from its family and config with the same weights (models may
    hold unpicklable references, e.g. a kernel backend module, so ``deepcopy`` is not enough)."""
    from mlip.models.base import MODELS, build_model, config_to_dict

    if getattr(model, "family", "") in MODELS:
        try:
            clone = build_model(model.family, config_to_dict(model.config))
        except Exception:  # noqa: BLE001 - e.g. a config that is not a dataclass: fall back to deepcopy
            clone = None
        if clone is not None:
            clone.load_state_dict(model.state_dict(), strict=True)  # copies (and casts) every tensor
            return clone
    return copy.deepcopy(model)


class NeighborCache:
    """Edges within ``r_max`` of one structure, from a list built with ``r_max + skin`` and reused.

    The list is rebuilt when the atomic numbers or pbc change, when a cell change cannot be
    bounded (a singular cell that changed), or when some pair might have crossed ``r_max``. With
    reference positions ``p0`` and cell ``C0`` (rows), write the new cell ``C = C0 M`` and the new
    positions ``p = p0 M + u``; every pair vector becomes ``d = d0 M + (u_s - u_r)``. A pair not
    in the list had ``|d0| >= r_max + skin``, so it is still beyond ``r_max`` while

        (r_max + 2 max|u|) / sigma_min(M) < r_max + skin,

    which for a fixed cell (``M = I``) is the usual "max displacement < skin/2". Since only
    ``u_s - u_r`` enters, ``u`` is measured from its mean (a drift of the whole system costs no
    rebuild). This keeps the list valid under the small cell changes of NPT and cell relaxation.
    Listed edges are filtered to ``|d| < r_max`` on every call, with the same float64 arithmetic
    and strict test as :func:`mlip.data.neighbors.neighbor_list`, so the result equals a full
    rebuild exactly.

    Atoms wrapped back into the cell (``atoms.wrap()``, or positions read back from a wrapped
    trajectory) jump by a lattice vector ``n C`` (integer ``n``, periodic directions only). That
    is not a displacement: ``u`` is measured modulo the lattice, and when some atom wrapped the
    stored list is re-based (reference positions ``p0 + n C0``, edge shifts
    ``S - n_sender + n_receiver``, which keeps the edge order) instead of rebuilt; ``n_rebases``
    counts this.

    Args:
        r_max: model cutoff (Å).
        skin: extra shell (Å); 0 rebuilds on every call.
        backend: neighbour-list backend (see :func:`mlip.data.neighbors.neighbor_list`); ``"auto"``
            is vesin for CPU tensors when installed (measured faster), our torch cell list on GPU.

    Attributes:
        n_builds: how many times the list was (re)built; n_calls: how many times it was queried;
        n_rebases: how many times it was re-based after atoms wrapped across the cell boundary.
    """

    def __init__(self, r_max: float, skin: float = 0.5, backend: str = "auto") -> None:
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.r_max = float(r_max)
        self.skin = float(skin)
        self.backend = backend
        self.n_builds = 0
        self.n_calls = 0
        self.n_rebases = 0
        self.reset()

    def reset(self) -> None:
        """Forget the stored list; the next call rebuilds."""
        self._ref_pos: torch.Tensor | None = None
        self._ref_cell: torch.Tensor | None = None
        self._ref_cell_inv: torch.Tensor | None = None
        self._ref_pbc: torch.Tensor | None = None
        self._ref_numbers: torch.Tensor | None = None
        self._edges: torch.Tensor | None = None
        self._shifts: torch.Tensor | None = None

    def _image_offsets(
        self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, numbers: torch.Tensor
    ) -> torch.Tensor | None:
        """Per-atom lattice offsets ``n`` [n_atoms, 3] (long) for which the stored list is still valid
        with reference positions ``p0 + n C0``; ``None`` when the list must be rebuilt."""
        if self._ref_pos is None or self.skin == 0.0:
            return None
        if pos.shape != self._ref_pos.shape or not torch.equal(numbers, self._ref_numbers):
            return None
        if not torch.equal(pbc, self._ref_pbc):
            return None
        cell_inv = None  # inverse of the present cell, to measure displacements modulo the lattice
        if not bool(pbc.any()) or torch.equal(cell, self._ref_cell):
            u = pos - self._ref_pos  # [n_atoms, 3] displacement
            sigma_min = 1.0
            cell_inv = self._ref_cell_inv
        else:
            if self._ref_cell_inv is None:
                return None  # a singular reference cell changed: no bound, rebuild
            m = self._ref_cell_inv @ cell  # [3, 3]; cell = ref_cell @ m
            u = pos - self._ref_pos @ m
            sigma_min = float(torch.linalg.svdvals(m).min())
            if not sigma_min > 0:
                return None
            cell_inv = torch.linalg.inv(cell)
        n = torch.zeros_like(u, dtype=torch.long)
        if cell_inv is not None and bool(pbc.any()) and u.numel():
            # whole lattice vectors along periodic directions are wraps, not motion
            n = torch.round(u @ cell_inv).to(torch.long) * pbc.to(torch.long)  # [n_atoms, 3]
            if bool(n.any()):
                u = u - n.to(u.dtype) @ cell
        if u.numel():
            u = u - u.mean(dim=0)  # a common translation moves no pair: only u_s - u_r enters d
        max_u = float(torch.linalg.norm(u, dim=1).max()) if u.numel() else 0.0
        if (self.r_max + 2.0 * max_u) / sigma_min < self.r_max + self.skin:
            return n
        return None

    def _rebase(self, n: torch.Tensor) -> None:
        """Shift the reference by whole lattice vectors ``n`` [n_atoms, 3] (atoms that wrapped)."""
        sender, receiver = self._edges
        # same pair vectors from the moved reference; every edge of one (sender, receiver) pair gets
        # the same offset, so the (receiver, sender, shift) order of neighbor_list() is kept
        self._shifts = self._shifts - n[sender] + n[receiver]
        self._ref_pos = self._ref_pos + n.to(self._ref_pos.dtype) @ self._ref_cell
        self.n_rebases += 1

    def _build(self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, numbers: torch.Tensor) -> None:
        self._edges, self._shifts = neighbor_list(pos, cell, pbc, self.r_max + self.skin, backend=self.backend)
        self._ref_pos, self._ref_cell, self._ref_pbc, self._ref_numbers = pos.clone(), cell.clone(), pbc.clone(), numbers.clone()
        self._ref_cell_inv = None
        if abs(float(torch.linalg.det(cell))) > 1e-12:
            self._ref_cell_inv = torch.linalg.inv(cell)
        self.n_builds += 1

    def __call__(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, numbers: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edges closer than ``r_max`` for these positions.

        Shapes:
            positions [n_atoms, 3] float64 Å; cell [3, 3] float64 Å; pbc [3] bool; numbers [n_atoms];
            returns edge_index [2, n_edges] (sender, receiver) and unit_shifts [n_edges, 3] (long).
        """
        self.n_calls += 1
        pos = positions.to(torch.float64)
        cell = cell.to(torch.float64)
        offsets = self._image_offsets(pos, cell, pbc, numbers)
        if offsets is None:
            self._build(pos, cell, pbc, numbers)
            if self.skin == 0.0:
                return self._edges, self._shifts
        elif bool(offsets.any()):
            self._rebase(offsets)
        sender, receiver = self._edges
        vec = pos[sender] - pos[receiver] + self._shifts.to(torch.float64) @ cell  # [n_edges, 3]
        keep = torch.sqrt((vec * vec).sum(dim=1)) < self.r_max
        return self._edges[:, keep], self._shifts[keep]


class MLIPCalculator(Calculator):
    """ASE calculator for any mlip potential (all families share :func:`mlip.models.outputs.predict`).

    Args:
        model: a loaded :class:`~mlip.models.base.PotentialModel` or the path of a model file.
            A model passed in is not modified (a copy is moved if device or dtype differ). An
            exported ``model.pt2`` (:mod:`mlip.export`) loads like ``model.pt``; a list of models or
            paths is a committee (:class:`~mlip.calculator.committee.Committee`).
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"float32"`` (default: fast, and accurate enough for MD and relaxation at the
            force precision of trained models) or ``"float64"`` (use it for finite-difference
            checks, phonons and tight energy conservation tests). Neighbour search and the
            skin test always run in float64.
        skin: neighbour-list skin in Å; the list is rebuilt only when an atom moved by more
            than ``skin/2`` (or the cell deformed by the equivalent amount). 0 rebuilds every call.
        head: model head to use when ``atoms.info["head"]`` is absent.
        charge, spin: total charge (e) and spin multiplicity used when ``atoms.info`` lacks
            ``"charge"``/``"spin"``; only models built with ``use_charge_spin`` read them, and such a
            model raises a clear error if neither is given.
        compute_stress: ``None`` computes stress along with forces for 3D-periodic cells (one
            model call serves ``FrechetCellFilter``/NPT); ``False`` computes it only when asked.
        neighbor_backend: see :func:`mlip.data.neighbors.neighbor_list`; ``"auto"`` (default) is
            vesin on CPU when installed and our torch cell list on GPU (``benchmarks/neighbors.py``).
        max_memory_gb: budget (GiB) for one call's peak memory: when the predicted peak exceeds it,
            the edge work runs in chunks that fit (same results); ``None`` (default): 80 % of the
            device's free memory at each call. A call that cannot fit raises
            :class:`~mlip.calculator.memory.MemoryBudgetError` before computing anything.
        dispersion: ``None``, or a functional name (``"pbe"``) whose D3(BJ) correction is added to
            energy, forces and stress (:class:`~mlip.calculator.dispersion.D3Dispersion`, needs the
            ``d3`` extra), or a configured ``D3Dispersion``.
        compile: run the energy/forces/stress function compiled by ``torch.compile`` (Inductor;
            :class:`~mlip.models.compile.CompiledPotential`): the first call traces and compiles (a few
            minutes on a CPU), later calls of any atom and edge count reuse it. Off by default: on CPU
            the compile time outweighs the gain for short runs (``docs/benchmarks.md``). The edge work is
            then not chunked to ``max_memory_gb``. If compilation fails, one warning names the error and
            the model runs eager.

    Results: ``energy`` and ``free_energy`` (eV, equal: the model has no electronic entropy),
    ``energies`` (per-atom, eV, summing to the energy), ``forces`` (eV/Å), ``stress`` (Voigt
    xx yy zz yz xz xy, eV/Å³, ASE sign) for cells periodic in all three directions; for a
    committee also ``energy_std`` (eV) and ``forces_std`` ([n_atoms], eV/Å), see
    :class:`~mlip.calculator.committee.Committee`. With ``dispersion``, ``energies`` are computed
    only when asked for (D3's per-atom split costs a second D3 evaluation).
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: PotentialModel | str | Sequence[PotentialModel | str],
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        skin: float = 0.5,
        head: str = "default",
        charge: float | None = None,
        spin: float | None = None,
        compute_stress: bool | None = None,
        neighbor_backend: str = "auto",
        max_memory_gb: float | None = None,
        dispersion: str | Any | None = None,
        compile: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = prepare_model(model, self.device, self.dtype)
        if compile:
            from mlip.models.compile import compile_model

            self.model = compile_model(self.model)  # predict_batch: evaluated like a committee
        self.neighbors = NeighborCache(self.model.r_max, skin=skin, backend=neighbor_backend)
        self.head = head
        self.default_charge = charge
        self.default_spin = spin
        self.compute_stress = compute_stress
        self.max_memory_gb = max_memory_gb
        budget_bytes(max_memory_gb, self.device)  # a bad value fails here, not at the first step
        self._predictor = BudgetedPredictor(self.model, self.device, self.dtype)
        from mlip.calculator.dispersion import resolve_dispersion

        self.dispersion = resolve_dispersion(dispersion)

    # -- state ------------------------------------------------------------------------------
    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's checks (positions, numbers, cell, pbc, ...) plus charge, spin and head in ``info``."""
        changes = super().check_state(atoms, tol=tol)
        if self.atoms is not None:
            for key in (K.CHARGE, K.SPIN, K.HEAD):
                old, new = self.atoms.info.get(key), atoms.info.get(key)
                if (old is None) != (new is None) or (old is not None and not np.array_equal(old, new)):
                    changes.append(f"info[{key}]")
                    break
        return changes

    # ``reset()`` (ASE's: forget atoms and results) deliberately keeps the neighbour cache: the
    # cache validates itself against numbers, pbc, cell and positions on every call, and older ASE
    # versions call reset() on every position change, which would defeat the skin.

    # -- evaluation -------------------------------------------------------------------------
    def batch_from_atoms(self, atoms: Atoms) -> GraphBatch:
        """One-structure :class:`GraphBatch` on the calculator's device and dtype (edges from the cache).

        Charge, spin and head come from ``atoms.info``, else from this calculator's defaults
        (:func:`mlip.calculator.inference.structure_settings`).
        """
        positions, numbers, cell, pbc = structure_tensors(atoms, self.device)
        edge_index, unit_shifts = self.neighbors(positions, cell, pbc, numbers)
        charge, spin, head = structure_settings(atoms.info, self.default_charge, self.default_spin, self.head)
        return inference_batch(
            positions, numbers, cell[None], pbc[None], edge_index, unit_shifts,
            batch=torch.zeros(len(atoms), dtype=torch.long, device=self.device),
            charge=[charge], spin=[spin], head=[head], dtype=self.dtype,
            needs_charge_spin=uses_charge_spin(self.model, [head]),
        )

    def _predict(self, batch: GraphBatch, stress: bool) -> dict[str, torch.Tensor]:
        """Energy, forces (and stress) of ``batch``, the edge work chunked when the predicted peak
        memory would exceed ``max_memory_gb`` (:mod:`mlip.calculator.memory`)."""
        return self._predictor(batch, stress, self.max_memory_gb)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        # Clear first: if anything below raises (unknown element, out of memory) no stale
        # result of a previous structure can be returned for this one.
        self.results = {}
        super().calculate(atoms, list(properties), list(system_changes))
        atoms = self.atoms
        periodic3d = bool(np.all(atoms.pbc))
        if "stress" in properties and not periodic3d:
            raise PropertyNotImplementedError(
                f"stress needs a cell periodic in all three directions (pbc={atoms.pbc.tolist()})"
            )
        want_stress = periodic3d and ("stress" in properties or self.compute_stress is not False)
        try:
            batch = self.batch_from_atoms(atoms)
            out = self._predict(batch, want_stress)
            if self.dispersion is not None:
                out = self.dispersion.add_to(out, batch, per_atom="energies" in properties)
        except _OOM as err:
            self.atoms = None  # nothing cached for this structure
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise RuntimeError(
                f"out of memory on {self.device} evaluating {len(atoms)} atoms "
                f"(r_max={self.model.r_max} Å): set a smaller max_memory_gb (the budget the edge work is "
                "chunked to fit; now "
                f"{'the default share of the free memory' if self.max_memory_gb is None else self.max_memory_gb})"
                ", use float32 or a device with more memory; no forces were returned"
            ) from err
        except Exception:
            self.atoms = None
            raise
        energy = float(out["energy"][0].detach())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        if "node_energy" in out:  # dropped by the dispersion unless asked for
            self.results["energies"] = out["node_energy"].detach().to("cpu", torch.float64).numpy()
        self.results["forces"] = out["forces"].detach().to("cpu", torch.float64).numpy()
        if "energy_std" in out:  # a committee's spread
            self.results["energy_std"] = float(out["energy_std"][0])
            self.results["forces_std"] = out["forces_std"].detach().to("cpu", torch.float64).numpy()
        if want_stress:
            s = out["stress"][0].detach().to("cpu", torch.float64).numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(0.5 * (s + s.T))
