"""Structure relaxation: one structure through ASE optimisers, or many at once with a batched FIRE.

:func:`relax` takes and returns a pymatgen ``Structure`` or an ASE ``Atoms`` and runs an ASE
optimiser (FIRE, BFGS, LBFGS), with ``FrechetCellFilter`` when the cell relaxes too.

:func:`relax_batch` relaxes many structures together: all unconverged structures are evaluated
in one model call per step (the GPU-efficient path, as in TorchSim), and each structure follows
its own FIRE trajectory (its own time step, mixing and velocity), so the result of a structure
does not depend on what it was batched with. Converged structures leave the batch. The FIRE
update follows ASE's ``FIRE`` (Bitzek et al., PRL 97, 170201 (2006)) and the cell degrees of
freedom ASE's ``FrechetCellFilter``, so a batch of one reproduces ``FIRE(FrechetCellFilter(atoms))``
(or plain ``FIRE(atoms)`` without cell relaxation), and ``fmax`` means the same in both functions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from mlip.calculator.ase import MLIPCalculator, NeighborCache, prepare_model, resolve_device
from mlip.calculator.dispersion import D3Dispersion, resolve_dispersion
from mlip.calculator.inference import inference_batch, structure_settings, structure_tensors, uses_charge_spin
from mlip.calculator.memory import BudgetedPredictor, budget_bytes
from mlip.data.graph import GraphBatch
from mlip.dtypes import resolve_dtype
from mlip.models.base import PotentialModel
from mlip.units import GPA

__all__ = ["OPTIMIZERS", "FireParams", "RelaxResult", "from_atoms", "relax", "relax_batch", "to_atoms"]

#: ASE optimisers accepted by :func:`relax` (by lower-case name)
OPTIMIZERS = ("fire", "bfgs", "lbfgs")


def to_atoms(structure: Any) -> tuple[Atoms, str]:
    """An ASE ``Atoms`` copy of ``structure`` and the kind to convert back to (``"ase"``/``"pymatgen"``)."""
    if isinstance(structure, Atoms):
        return structure.copy(), "ase"
    try:
        from pymatgen.core import Structure
    except ImportError:  # pragma: no cover - pymatgen is a core dependency
        Structure = None
    if Structure is not None and isinstance(structure, Structure):
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = None
        return atoms, "pymatgen"
    raise TypeError(f"expected an ase.Atoms or a pymatgen Structure, got {type(structure).__name__}")


def from_atoms(atoms: Atoms, kind: str) -> Any:
    """Convert back to the caller's type; a pymatgen result keeps energy/steps in ``properties``."""
    if kind == "ase":
        return atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    props = {k: atoms.info[k] for k in ("relax_steps", "relax_converged", "relax_fmax") if k in atoms.info}
    if atoms.calc is not None and "energy" in atoms.calc.results:
        props["energy"] = float(atoms.calc.results["energy"])
    structure.properties.update(props)
    return structure


def _check_cells(atoms_list: Sequence[Atoms], relax_cell: bool, name_them: bool) -> None:
    if not relax_cell:
        return
    for i, a in enumerate(atoms_list):
        if not bool(np.all(a.pbc)):
            where = f"structure {i} ({a.get_chemical_formula()}): " if name_them else ""
            raise ValueError(f"{where}relax_cell needs a cell periodic in all three directions")


# ---------------------------------------------------------------------------------------------
# one structure: ASE optimisers
# ---------------------------------------------------------------------------------------------
def relax(
    structure: Any,
    model: PotentialModel | str | None = None,
    fmax: float = 0.05,
    relax_cell: bool = False,
    optimizer: str = "FIRE",
    max_steps: int = 500,
    pressure: float = 0.0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    calculator: MLIPCalculator | None = None,
    trajectory: str | None = None,
    logfile: str | None = None,
    charge: float | None = None,
    spin: float | None = None,
    head: str = "default",
    skin: float = 0.5,
    neighbor_backend: str = "auto",
    dispersion: str | D3Dispersion | None = None,
) -> Any:
    """Relax one structure with an ASE optimiser; returns the same type as given (a new object).

    Args:
        structure: ``ase.Atoms`` or ``pymatgen.core.Structure`` (left unmodified).
        model: model or model path (ignored when ``calculator`` is given).
        fmax: stop when every force (and, with ``relax_cell``, every cell force of
            ``FrechetCellFilter``) is below this, eV/Å.
        relax_cell: also relax the cell (``FrechetCellFilter``; needs a 3D-periodic cell).
        optimizer: ``"FIRE"``, ``"BFGS"`` or ``"LBFGS"``.
        max_steps: optimiser steps at most.
        pressure: external hydrostatic pressure in GPa (only with ``relax_cell``).
        device, dtype: see :class:`~mlip.calculator.MLIPCalculator` (float32 by default).
        calculator: reuse an existing calculator (and its model) instead of building one.
        trajectory, logfile: passed to the ASE optimiser (``None``: no file, no log).
        charge, spin, head, skin, neighbor_backend, dispersion: for the calculator built from ``model``
            (see :class:`~mlip.calculator.MLIPCalculator`); ``atoms.info`` values take precedence.

    Returns:
        The relaxed structure. An ``Atoms`` carries its energy, forces and stress in a
        ``SinglePointCalculator`` and ``relax_steps``, ``relax_converged``, ``relax_fmax`` (eV/Å, the
        largest generalised force the optimiser tested against ``fmax``) in ``info``; a ``Structure``
        has all of these (``energy`` in eV) in ``properties``.
    """
    import ase.optimize
    from ase.filters import FrechetCellFilter

    atoms, kind = to_atoms(structure)
    if calculator is None:
        if model is None:
            raise ValueError("relax() needs a model or a calculator")
        calculator = MLIPCalculator(model, device=device, dtype=dtype, skin=skin, head=head, charge=charge,
                                    spin=spin, neighbor_backend=neighbor_backend, dispersion=dispersion)
    name = optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {[o.upper() for o in OPTIMIZERS]}")
    _check_cells([atoms], relax_cell, name_them=False)
    atoms.calc = calculator
    target = FrechetCellFilter(atoms, scalar_pressure=pressure * GPA) if relax_cell else atoms
    cls = {"fire": ase.optimize.FIRE, "bfgs": ase.optimize.BFGS, "lbfgs": ase.optimize.LBFGS}[name]
    opt = cls(target, trajectory=trajectory, logfile=logfile)
    converged = bool(opt.run(fmax=fmax, steps=max_steps))
    f = target.get_forces()  # what the optimiser's fmax test saw (cached: no model call)
    atoms.info.update(
        relax_steps=int(opt.nsteps), relax_converged=converged,
        relax_fmax=float(np.sqrt((f**2).sum(axis=1).max())) if len(f) else 0.0,
    )
    results = {"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces()}
    if bool(np.all(atoms.pbc)):
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return from_atoms(atoms, kind)


# ---------------------------------------------------------------------------------------------
# many structures: batched FIRE
# ---------------------------------------------------------------------------------------------
@dataclass
class RelaxResult:
    """Outcome of one structure in :func:`relax_batch`.

    Attributes:
        atoms: relaxed structure (same type as the input), with energy/forces/stress attached.
        energy: final energy (eV); steps: FIRE steps taken; converged: reached ``fmax``;
        fmax: final largest generalised force (eV/Å; ``FrechetCellFilter``'s with ``relax_cell``, as
        tested against ``fmax``); volume: final cell volume (Å³, 0 without a cell).
    """

    atoms: Any
    energy: float
    steps: int
    converged: bool
    fmax: float
    volume: float


@dataclass
class FireParams:
    """ASE's FIRE parameters (and defaults): time step and its bounds in ASE time units, largest step (Å)."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99


@dataclass
class _Selection:
    """Some structures of the batch, in batch order.

    Shapes: graphs [b] (batch indices); atoms [n] (batch atom indices, structure by structure);
    graph_of_atom [n] (position in ``graphs``); ptr [b + 1] (into ``atoms``).
    """

    graphs: torch.Tensor
    atoms: torch.Tensor
    graph_of_atom: torch.Tensor
    ptr: torch.Tensor

    def per_structure_sum(self, atom_rows: torch.Tensor, cell_rows: torch.Tensor) -> torch.Tensor:
        """Per structure, the sum over its atom rows [n, 3] and cell rows [b, 3, 3] -> [b]."""
        out = torch.zeros(len(self.graphs), dtype=atom_rows.dtype, device=atom_rows.device)
        return out.index_add(0, self.graph_of_atom, atom_rows.sum(1)) + cell_rows.sum((1, 2))

    def largest_row2(self, atom_rows: torch.Tensor, cell_rows: torch.Tensor) -> torch.Tensor:
        """Per structure, the largest squared row norm over atom and cell rows (ASE's fmax test) -> [b]."""
        out = torch.zeros(len(self.graphs), dtype=atom_rows.dtype, device=atom_rows.device)
        atom_max = out.scatter_reduce(0, self.graph_of_atom, (atom_rows**2).sum(1), reduce="amax")
        return torch.maximum(atom_max, (cell_rows**2).sum(2).amax(1))

    def spread(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-structure values [b] broadcast to atom rows [n, 1] and cell rows [b, 1, 1]."""
        return values[self.graph_of_atom, None], values[:, None, None]


def _expm_frechet_adjoint(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``G[m, n] = <d expm(a)/d a[m, n], u>``: the gradient of ``<expm(a), u>`` with respect to ``a``.

    The adjoint of the Fréchet derivative of expm at ``a`` is the Fréchet derivative at ``a^T``,
    and ``L(x)[e]`` is the upper-right block of ``expm([[x, e], [0, x]])`` (Higham, Functions of
    Matrices, 2008, ch. 3). ``FrechetCellFilter`` computes the same matrix entry by entry with
    scipy's ``expm_frechet``; one batched 6x6 exponential does it here.

    Shapes: a, u [b, 3, 3] -> [b, 3, 3].
    """
    block = torch.zeros(a.shape[0], 6, 6, dtype=a.dtype, device=a.device)
    block[:, :3, :3] = block[:, 3:, 3:] = a.transpose(1, 2)
    block[:, :3, 3:] = u
    return torch.linalg.matrix_exp(block)[:, :3, 3:]


class _Structures:
    """The structures of a batched relaxation, stacked, in ``FrechetCellFilter``'s coordinates.

    Each structure has reference positions ``x = r F^{-T}`` and the log of its deformation gradient
    ``F`` (``cell = cell0 F^T``, ``r = x F^T``); the optimiser sees ``x`` and ``n_atoms * log F``, whose
    forces are ``f F`` and the gradient of the energy (with ``p V``) with respect to ``log F`` over
    ``n_atoms``. Without cell relaxation ``F = I`` and ``x = r``. Float64 throughout.

    Shapes: x [N, 3] Å; log_deform, cell0 [G, 3, 3]; numbers [N]; pbc [G, 3]; n_atoms [G]; ptr [G + 1].
    """

    def __init__(
        self, atoms_list: Sequence[Atoms], device: torch.device, relax_cell: bool, pressure: float,
        caches: list[NeighborCache], settings: list[tuple[float, float, str]],
    ) -> None:
        tensors = [structure_tensors(a, device) for a in atoms_list]
        self.n_graphs = len(atoms_list)
        self.relax_cell, self.pressure = relax_cell, pressure * GPA
        self.caches, self.settings = caches, settings
        self.x = torch.cat([t[0] for t in tensors])
        self.numbers = torch.cat([t[1] for t in tensors])
        self.cell0 = torch.stack([t[2] for t in tensors])
        self.pbc = torch.stack([t[3] for t in tensors])
        self.n_atoms = torch.tensor([len(a) for a in atoms_list], device=device)
        self.ptr = torch.zeros(len(atoms_list) + 1, dtype=torch.long, device=device)
        self.ptr[1:] = torch.cumsum(self.n_atoms, 0)
        self.log_deform = torch.zeros_like(self.cell0)

    def select(self, graphs: Sequence[int]) -> _Selection:
        dev = self.x.device
        spans = [torch.arange(int(self.ptr[g]), int(self.ptr[g + 1]), device=dev) for g in graphs]
        graphs_t = torch.tensor(list(graphs), dtype=torch.long, device=dev)
        counts = self.n_atoms[graphs_t]
        ptr = torch.zeros(len(graphs) + 1, dtype=torch.long, device=dev)
        ptr[1:] = torch.cumsum(counts, 0)
        graph_of_atom = torch.repeat_interleave(torch.arange(len(graphs), device=dev), counts)
        return _Selection(graphs_t, torch.cat(spans), graph_of_atom, ptr)

    def cartesian(self, sel: _Selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions [n, 3], cells [b, 3, 3] and deformation gradients F [b, 3, 3] of ``sel``."""
        x, cell0 = self.x[sel.atoms], self.cell0[sel.graphs]
        if not self.relax_cell:
            return x, cell0, torch.eye(3, dtype=x.dtype, device=x.device).expand_as(cell0)
        deform = torch.linalg.matrix_exp(self.log_deform[sel.graphs])
        positions = torch.einsum("ni,nji->nj", x, deform[sel.graph_of_atom])  # x F^T
        return positions, torch.bmm(cell0, deform.transpose(1, 2)), deform

    def graph_batch(
        self, sel: _Selection, positions: torch.Tensor, cell: torch.Tensor, dtype: torch.dtype,
        needs_charge_spin: list[bool],
    ) -> GraphBatch:
        """The model's input for ``sel``: each structure's edges from its own neighbour cache;
        ``needs_charge_spin`` has one flag per structure of the whole set (:func:`uses_charge_spin`)."""
        edges, shifts = [], []
        for k, g in enumerate(sel.graphs.tolist()):
            a0, a1 = int(sel.ptr[k]), int(sel.ptr[k + 1])
            numbers = self.numbers[int(self.ptr[g]):int(self.ptr[g + 1])]
            ei, sh = self.caches[g](positions[a0:a1], cell[k], self.pbc[g], numbers)
            edges.append(ei + a0)
            shifts.append(sh)
        charge, spin, head = zip(*(self.settings[g] for g in sel.graphs.tolist()))
        return inference_batch(
            positions, self.numbers[sel.atoms], cell, self.pbc[sel.graphs], torch.cat(edges, dim=1),
            torch.cat(shifts), batch=sel.graph_of_atom, charge=charge, spin=spin, head=head,
            dtype=dtype, needs_charge_spin=[needs_charge_spin[g] for g in sel.graphs.tolist()],
        )

    def generalised_forces(
        self, sel: _Selection, deform: torch.Tensor, cell: torch.Tensor, out: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``FrechetCellFilter.get_forces()`` of ``sel``: atom rows [n, 3] and cell rows [b, 3, 3] (eV/Å)."""
        forces = out["forces"].detach().to(torch.float64)
        if not self.relax_cell:
            return forces, torch.zeros_like(cell)
        g_x = torch.einsum("ni,nij->nj", forces, deform[sel.graph_of_atom])  # f F
        volume = torch.linalg.det(cell).abs()
        eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
        virial = out["virial"].detach().to(torch.float64) - (volume * self.pressure)[:, None, None] * eye
        ucf_grad = torch.linalg.solve(deform, virial.transpose(1, 2)).transpose(1, 2)  # virial F^{-T}
        g_c = _expm_frechet_adjoint(self.log_deform[sel.graphs], ucf_grad)
        return g_x, g_c / self.n_atoms[sel.graphs].to(g_c.dtype)[:, None, None]

    def move(self, sel: _Selection, dx: torch.Tensor, dc: torch.Tensor) -> None:
        """Step the optimiser's coordinates: ``x += dx``, ``n_atoms log F += dc``."""
        self.x[sel.atoms] = self.x[sel.atoms] + dx
        if self.relax_cell:
            n_atoms = self.n_atoms[sel.graphs][:, None, None]
            self.log_deform[sel.graphs] = self.log_deform[sel.graphs] + dc / n_atoms


class _BatchedFire:
    """ASE's ``FIRE.step`` for every structure at once, each with its own velocity, ``dt``, mixing
    ``a`` and count of downhill steps; norms and dot products are taken per structure.

    Shapes: v_x [N, 3]; v_c [G, 3, 3]; dt, a, n_downhill, started [G].
    """

    def __init__(self, structures: _Structures, params: FireParams) -> None:
        n_graphs = structures.n_graphs
        f64, dev = torch.float64, structures.x.device
        self.p = params
        self.v_x = torch.zeros_like(structures.x)
        self.v_c = torch.zeros_like(structures.cell0)
        self.dt = torch.full((n_graphs,), params.dt, dtype=f64, device=dev)
        self.a = torch.full((n_graphs,), params.astart, dtype=f64, device=dev)
        self.n_downhill = torch.zeros(n_graphs, dtype=torch.long, device=dev)
        self.started = torch.zeros(n_graphs, dtype=torch.bool, device=dev)

    def step(
        self, sel: _Selection, g_x: torch.Tensor, g_c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The displacements (atom rows [n, 3], cell rows [b, 3, 3]) for generalised forces ``g_x``, ``g_c``."""
        p, gr = self.p, sel.graphs
        vx, vc = self.v_x[sel.atoms], self.v_c[gr]
        a, dt, n_down = self.a[gr], self.dt[gr], self.n_downhill[gr]
        # ASE skips the mixing on the first step (no velocity yet); afterwards it mixes when going
        # downhill (v.f > 0) and otherwise stops and shortens the time step
        vf = sel.per_structure_sum(g_x * vx, g_c * vc)
        downhill = self.started[gr] & (vf > 0)
        reset = self.started[gr] & ~(vf > 0)
        g_norm = sel.per_structure_sum(g_x * g_x, g_c * g_c).sqrt().clamp_min(1e-300)  # 0 only where unused
        mix = a * sel.per_structure_sum(vx * vx, vc * vc).sqrt() / g_norm
        (down_x, down_c), (a_x, a_c), (mix_x, mix_c) = sel.spread(downhill), sel.spread(a), sel.spread(mix)
        vx = torch.where(down_x, (1 - a_x) * vx + mix_x * g_x, vx)
        vc = torch.where(down_c, (1 - a_c) * vc + mix_c * g_c, vc)
        grow = downhill & (n_down > p.n_min)
        dt = torch.where(grow, torch.clamp(dt * p.finc, max=p.dtmax), dt)
        a = torch.where(grow, a * p.fa, a)
        n_down = torch.where(downhill, n_down + 1, n_down)
        reset_x, reset_c = sel.spread(reset)
        vx, vc = vx.masked_fill(reset_x, 0.0), vc.masked_fill(reset_c, 0.0)
        a = torch.where(reset, torch.full_like(a, p.astart), a)
        dt = torch.where(reset, dt * p.fdec, dt)
        n_down = torch.where(reset, torch.zeros_like(n_down), n_down)
        dt_x, dt_c = sel.spread(dt)
        vx, vc = vx + dt_x * g_x, vc + dt_c * g_c
        dr_x, dr_c = dt_x * vx, dt_c * vc
        norm = sel.per_structure_sum(dr_x * dr_x, dr_c * dr_c).sqrt()
        scale = torch.where(norm > p.maxstep, p.maxstep / norm.clamp_min(1e-300), torch.ones_like(norm))
        scale_x, scale_c = sel.spread(scale)
        self.v_x[sel.atoms], self.v_c[gr] = vx, vc
        self.a[gr], self.dt[gr], self.n_downhill[gr] = a, dt, n_down
        self.started[gr] = True
        return scale_x * dr_x, scale_c * dr_c


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


@dataclass
class _Final:
    """Where one structure's relaxation ended (float64 numpy arrays in eV, Å, eV/Å, eV/Å³)."""

    energy: float
    forces: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    stress: np.ndarray | None
    fmax: float
    steps: int
    converged: bool

    @classmethod
    def of(
        cls, k: int, sel: _Selection, positions: torch.Tensor, cell: torch.Tensor, out: dict[str, torch.Tensor],
        **kw: Any,
    ) -> _Final:
        """Structure ``k`` of ``sel`` with its model outputs ``out``; ``kw``: fmax, steps, converged."""
        a0, a1 = int(sel.ptr[k]), int(sel.ptr[k + 1])
        stress = _numpy(out["stress"][k]) if "stress" in out else None
        return cls(energy=float(out["energy"][k]), forces=_numpy(out["forces"][a0:a1]),
                   positions=_numpy(positions[a0:a1]), cell=_numpy(cell[k]), stress=stress, **kw)


def _run_fire(
    structures: _Structures, fire: _BatchedFire, model: PotentialModel, dtype: torch.dtype, fmax: float,
    max_steps: int, dispersion: D3Dispersion | None = None, max_memory_gb: float | None = None,
) -> list[_Final]:
    """FIRE steps until every structure converged or took ``max_steps``: one model call per step for
    the structures still relaxing (a finished one leaves the batch), its edge work chunked to fit
    ``max_memory_gb`` (:class:`~mlip.calculator.memory.BudgetedPredictor`)."""
    needs_charge_spin = uses_charge_spin(model, [head for _, _, head in structures.settings])
    predictor = BudgetedPredictor(model, structures.x.device, dtype)
    n_graphs = structures.n_graphs
    steps = [0] * n_graphs
    finals: list[_Final | None] = [None] * n_graphs
    active = list(range(n_graphs))
    while active:
        sel = structures.select(active)
        positions, cell, deform = structures.cartesian(sel)
        # a 3D-periodic batch gets stress even with a fixed cell: it goes into the results
        want_stress = structures.relax_cell or bool(structures.pbc[sel.graphs].all())
        batch = structures.graph_batch(sel, positions, cell, dtype, needs_charge_spin)
        out = predictor(batch, want_stress, max_memory_gb)
        if dispersion is not None:
            out = dispersion.add_to(out, batch)
        out = {key: value.detach() for key, value in out.items()}
        g_x, g_c = structures.generalised_forces(sel, deform, cell, out)
        f2 = sel.largest_row2(g_x, g_c).tolist()  # ASE's test: max squared row < fmax**2
        for k, g in enumerate(active):
            if f2[k] < fmax**2 or steps[g] >= max_steps:
                finals[g] = _Final.of(k, sel, positions, cell, out, fmax=f2[k] ** 0.5, steps=steps[g],
                                      converged=f2[k] < fmax**2)
        keep = torch.tensor([finals[g] is None for g in active], device=sel.graphs.device)
        if not bool(keep.any()):
            break
        moving = structures.select([g for g in active if finals[g] is None])
        dx, dc = fire.step(moving, g_x[keep[sel.graph_of_atom]], g_c[keep])
        structures.move(moving, dx, dc)
        active = moving.graphs.tolist()
        for g in active:
            steps[g] += 1
    return finals


def _relax_result(atoms: Atoms, kind: str, final: _Final) -> RelaxResult:
    out = atoms.copy()
    out.positions = final.positions
    out.cell = final.cell
    results = {"energy": final.energy, "forces": final.forces}
    if final.stress is not None:
        results["stress"] = full_3x3_to_voigt_6_stress(final.stress)
    out.calc = SinglePointCalculator(out, **results)
    out.info.update(relax_steps=final.steps, relax_converged=final.converged, relax_fmax=final.fmax)
    return RelaxResult(
        atoms=from_atoms(out, kind), energy=final.energy, steps=final.steps, converged=final.converged,
        fmax=final.fmax, volume=float(abs(np.linalg.det(final.cell))),
    )


def relax_batch(
    structures: Sequence[Any],
    model: PotentialModel | str,
    fmax: float = 0.05,
    relax_cell: bool = False,
    max_steps: int = 500,
    pressure: float = 0.0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    skin: float = 0.5,
    dt: float = 0.1,
    maxstep: float = 0.2,
    dtmax: float = 1.0,
    n_min: int = 5,
    finc: float = 1.1,
    fdec: float = 0.5,
    astart: float = 0.1,
    fa: float = 0.99,
    charge: float | None = None,
    spin: float | None = None,
    head: str = "default",
    neighbor_backend: str = "auto",
    dispersion: str | D3Dispersion | None = None,
    max_memory_gb: float | None = None,
) -> list[RelaxResult]:
    """Relax many structures together with FIRE, one model call per step for the whole batch.

    Each structure keeps its own FIRE state (velocity, ``dt``, mixing ``a``, step counter); the
    per-structure norms and dot products are reduced per structure, so a structure's trajectory
    does not depend on its batch mates (up to float rounding) and equals a batch of one. With
    ``relax_cell`` the degrees of freedom, their forces and so the meaning of ``fmax`` are those of
    ASE's ``FrechetCellFilter`` (as in :func:`relax`): positions in the reference cell and
    ``n_atoms * log F`` for the deformation gradient ``F`` (``cell = cell0 F^T``). FIRE parameters
    (``dt`` ... ``fa``, see :class:`FireParams`) default to ASE's.

    Args:
        structures: ``ase.Atoms`` or pymatgen ``Structure`` objects (left unmodified).
        model: model or model path (``.pt``, or an exported ``.pt2``), or a list of them (a committee: the mean).
        fmax: convergence threshold on the largest generalised force (eV/Å).
        relax_cell: relax cells too (needs 3D-periodic cells).
        max_steps: FIRE steps at most per structure.
        pressure: external hydrostatic pressure (GPa).
        device, dtype: as for :class:`~mlip.calculator.MLIPCalculator`; the optimiser state is float64.
        skin, neighbor_backend: of each structure's :class:`~mlip.calculator.NeighborCache` (as in the
            calculator: Å, ``"auto"``).
        charge, spin, head: used where a structure's ``info`` lacks them, as in the calculator.
        dispersion: a functional name (``"pbe"``) whose D3(BJ) energy, forces and virial are added
            (see :class:`~mlip.calculator.dispersion.D3Dispersion`).
        max_memory_gb: budget (GiB) of one batched model call, as in the calculator: above it the
            edge work runs in chunks (same results); ``None``: 80 % of the device's free memory.
            A step that cannot fit raises :class:`~mlip.calculator.memory.MemoryBudgetError`.

    Returns:
        One :class:`RelaxResult` per input, in input order.
    """
    if len(structures) == 0:
        return []
    dev, dtype_ = resolve_device(device), resolve_dtype(dtype)
    budget_bytes(max_memory_gb, dev)  # a bad value fails before any work
    net = prepare_model(model, dev, dtype_)
    converted = [to_atoms(s) for s in structures]
    atoms_list = [a for a, _ in converted]
    _check_cells(atoms_list, relax_cell, name_them=True)
    stacked = _Structures(
        atoms_list, dev, relax_cell, pressure,
        caches=[NeighborCache(net.r_max, skin=skin, backend=neighbor_backend) for _ in atoms_list],
        settings=[structure_settings(a.info, charge, spin, head) for a in atoms_list],
    )
    fire = _BatchedFire(stacked, FireParams(dt, maxstep, dtmax, n_min, finc, fdec, astart, fa))
    finals = _run_fire(stacked, fire, net, dtype_, fmax, max_steps, resolve_dispersion(dispersion), max_memory_gb)
    return [_relax_result(atoms, kind, final) for (atoms, kind), final in zip(converted, finals)]
