"""Structure relaxation: one structure through ASE optimisers, or many at once with a batched FIRE.

:func:`relax` takes and returns a pymatgen ``Structure`` or an ASE ``Atoms`` and runs an ASE
optimiser (FIRE, BFGS, LBFGS), with ``FrechetCellFilter`` when the cell relaxes too.

:func:`relax_batch` relaxes many structures together: all unconverged structures are evaluated
in one model call per step (the GPU-efficient path, as in TorchSim), and each structure follows
its own FIRE trajectory (its own time step, mixing and velocity), so the result of a structure
does not depend on what it was batched with. Converged structures leave the batch. The FIRE
update and the cell degrees of freedom follow ASE's ``FIRE`` (Bitzek et al., PRL 97, 170201
(2006)) and ``UnitCellFilter`` conventions, so a batch of one reproduces
``FIRE(UnitCellFilter(atoms))`` (or plain ``FIRE(atoms)`` without cell relaxation).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from mlip.calculator.ase import MLIPCalculator, NeighborCache, prepare_model, resolve_device, resolve_dtype
from mlip.data.graph import GraphBatch
from mlip.models.base import PotentialModel
from mlip.models.outputs import predict
from mlip.units import GPA

__all__ = ["OPTIMIZERS", "RelaxResult", "from_atoms", "relax", "relax_batch", "to_atoms"]

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


def _max_force(atoms: Atoms, relax_cell: bool, pressure: float) -> float:
    """The largest generalised force (eV/Å) that the optimiser's ``fmax`` test sees."""
    if relax_cell:
        from ase.filters import FrechetCellFilter

        f = FrechetCellFilter(atoms, scalar_pressure=pressure).get_forces()
    else:
        f = atoms.get_forces()
    return float(np.sqrt((f**2).sum(axis=1).max())) if len(f) else 0.0


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

    Returns:
        The relaxed structure. An ``Atoms`` carries its energy, forces and stress in a
        ``SinglePointCalculator`` and ``relax_steps``, ``relax_converged``, ``relax_fmax`` (eV/Å) in
        ``info``; a ``Structure`` has all of these (``energy`` in eV) in ``properties``.
    """
    import ase.optimize
    from ase.filters import FrechetCellFilter

    atoms, kind = to_atoms(structure)
    if calculator is None:
        if model is None:
            raise ValueError("relax() needs a model or a calculator")
        calculator = MLIPCalculator(model, device=device, dtype=dtype)
    name = optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {[o.upper() for o in OPTIMIZERS]}")
    if relax_cell and not bool(np.all(atoms.pbc)):
        raise ValueError("relax_cell needs a cell periodic in all three directions")
    atoms.calc = calculator
    p = pressure * GPA
    target = FrechetCellFilter(atoms, scalar_pressure=p) if relax_cell else atoms
    cls = {"fire": ase.optimize.FIRE, "bfgs": ase.optimize.BFGS, "lbfgs": ase.optimize.LBFGS}[name]
    opt = cls(target, trajectory=trajectory, logfile=logfile)
    converged = bool(opt.run(fmax=fmax, steps=max_steps))
    energy = float(atoms.get_potential_energy())
    atoms.info.update(
        relax_steps=int(opt.nsteps), relax_converged=converged, relax_fmax=_max_force(atoms, relax_cell, p),
    )
    results = {"energy": energy, "forces": atoms.get_forces()}
    if bool(np.all(atoms.pbc)):
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return from_atoms(atoms, kind)


@dataclass
class RelaxResult:
    """Outcome of one structure in :func:`relax_batch`.

    Attributes:
        atoms: relaxed structure (same type as the input), with energy/forces/stress attached.
        energy: final energy (eV); steps: FIRE steps taken; converged: reached ``fmax``;
        fmax: final largest generalised force (eV/Å); volume: final cell volume (Å³, 0 without a cell).
    """

    atoms: Any
    energy: float
    steps: int
    converged: bool
    fmax: float
    volume: float


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
) -> list[RelaxResult]:
    """Relax many structures together with FIRE, one model call per step for the whole batch.

    Each structure keeps its own FIRE state (velocity, ``dt``, mixing ``a``, step counter); the
    per-structure norms and dot products are reduced per structure, so a structure's trajectory
    does not depend on its batch mates (up to float rounding) and equals a batch of one. With
    ``relax_cell`` the degrees of freedom are those of ASE's ``UnitCellFilter``: reference-frame
    positions ``r F^{-T}`` and ``cell_factor * F`` with the deformation gradient ``F``
    (``cell = cell0 F^T``) and ``cell_factor = n_atoms``; their forces are ``f F`` and
    ``(virial - p V I) F^{-T} / cell_factor``. FIRE parameters default to ASE's.

    Args:
        structures: ``ase.Atoms`` or pymatgen ``Structure`` objects (left unmodified).
        model: model or model path.
        fmax: convergence threshold on the largest generalised force (eV/Å).
        relax_cell: relax cells too (needs 3D-periodic cells).
        max_steps: FIRE steps at most per structure.
        pressure: external hydrostatic pressure (GPa).
        device, dtype: as for :class:`~mlip.calculator.MLIPCalculator`; the optimiser state is float64.
        skin: neighbour-list skin (Å) of each structure's :class:`~mlip.calculator.NeighborCache`.

    Returns:
        One :class:`RelaxResult` per input, in input order.

    Shapes (internal): x [n_atoms, 3] reference positions; deform [n_graphs, 3, 3]; v_* alike.
    """
    if len(structures) == 0:
        return []
    dev, dtype_ = resolve_device(device), resolve_dtype(dtype)
    net = prepare_model(model, dev, dtype_)
    converted = [to_atoms(s) for s in structures]
    atoms_list = [a for a, _ in converted]
    if relax_cell:
        for i, a in enumerate(atoms_list):
            if not bool(np.all(a.pbc)):
                raise ValueError(f"structure {i} ({a.get_chemical_formula()}): relax_cell needs a 3D-periodic cell")
    f64 = torch.float64
    n_graphs = len(atoms_list)
    n_per = torch.tensor([len(a) for a in atoms_list], device=dev)
    ptr = torch.zeros(n_graphs + 1, dtype=torch.long, device=dev)
    ptr[1:] = torch.cumsum(n_per, 0)
    x = torch.cat([torch.as_tensor(a.positions, dtype=f64) for a in atoms_list]).to(dev)  # [N, 3]
    numbers = torch.cat([torch.as_tensor(a.numbers, dtype=torch.long) for a in atoms_list]).to(dev)
    cell0 = torch.stack([torch.as_tensor(np.asarray(a.cell), dtype=f64) for a in atoms_list]).to(dev)
    pbc = torch.stack([torch.as_tensor(np.asarray(a.pbc, dtype=bool)) for a in atoms_list]).to(dev)
    charge = torch.tensor([float(a.info.get("charge", math.nan)) for a in atoms_list], dtype=f64, device=dev)
    spin = torch.tensor([float(a.info.get("spin", math.nan)) for a in atoms_list], dtype=f64, device=dev)
    heads = [str(a.info.get("head", "default")) for a in atoms_list]
    deform = torch.eye(3, dtype=f64, device=dev).repeat(n_graphs, 1, 1)  # F
    cell_factor = n_per.to(f64)  # [B]
    p = pressure * GPA
    caches = [NeighborCache(net.r_max, skin=skin) for _ in range(n_graphs)]

    v_x = torch.zeros_like(x)
    v_c = torch.zeros_like(deform)
    dt_g = torch.full((n_graphs,), dt, dtype=f64, device=dev)
    a_g = torch.full((n_graphs,), astart, dtype=f64, device=dev)
    nsteps_fire = torch.zeros(n_graphs, dtype=torch.long, device=dev)
    started = torch.zeros(n_graphs, dtype=torch.bool, device=dev)
    steps = [0] * n_graphs
    done = [False] * n_graphs
    converged = [False] * n_graphs
    final: dict[int, dict[str, Any]] = {}

    while not all(done):
        active = [g for g in range(n_graphs) if not done[g]]
        act_t = torch.tensor(active, device=dev)
        atom_idx = torch.cat([torch.arange(int(ptr[g]), int(ptr[g + 1]), device=dev) for g in active])
        local_graph = torch.repeat_interleave(torch.arange(len(active), device=dev), n_per[act_t])
        fdef = deform[act_t]  # [b, 3, 3]
        pos = torch.einsum("ni,nji->nj", x[atom_idx], fdef[local_graph]) if relax_cell else x[atom_idx]
        cell = torch.bmm(cell0[act_t], fdef.transpose(1, 2)) if relax_cell else cell0[act_t]
        # per-structure cached edges, offset into the batch
        edges, shifts = [], []
        sub_ptr = torch.zeros(len(active) + 1, dtype=torch.long, device=dev)
        sub_ptr[1:] = torch.cumsum(n_per[act_t], 0)
        for k, g in enumerate(active):
            a0, a1 = int(sub_ptr[k]), int(sub_ptr[k + 1])
            ei, sh = caches[g](pos[a0:a1], cell[k], pbc[g], numbers[int(ptr[g]):int(ptr[g + 1])])
            edges.append(ei + a0)
            shifts.append(sh)
        n_act = int(atom_idx.numel())
        nan = math.nan
        batch = GraphBatch(
            positions=pos.to(dtype_), numbers=numbers[atom_idx], cell=cell.to(dtype_), pbc=pbc[act_t],
            edge_index=torch.cat(edges, dim=1), unit_shifts=torch.cat(shifts), batch=local_graph, ptr=sub_ptr,
            energy=torch.full((len(active),), nan, dtype=dtype_, device=dev),
            forces=torch.full((n_act, 3), nan, dtype=dtype_, device=dev),
            stress=torch.full((len(active), 3, 3), nan, dtype=dtype_, device=dev),
            charge=charge[act_t].to(dtype_), spin=spin[act_t].to(dtype_),
            weight=torch.ones(len(active), dtype=dtype_, device=dev), head=[heads[g] for g in active],
        )
        out = predict(net, batch, forces=True, stress=relax_cell or bool(pbc[act_t].all()))
        forces = out["forces"].detach().to(f64)  # [n, 3]
        energy = out["energy"].detach().to(f64)  # [b]
        # generalised forces (UnitCellFilter convention)
        if relax_cell:
            g_x = torch.einsum("ni,nij->nj", forces, fdef[local_graph])
            volume = torch.linalg.det(cell).abs()  # [b]
            virial = out["virial"].detach().to(f64) - (volume * p)[:, None, None] * torch.eye(3, dtype=f64, device=dev)
            g_c = torch.linalg.solve(fdef, virial.transpose(1, 2)).transpose(1, 2) / cell_factor[act_t][:, None, None]
        else:
            g_x = forces
            g_c = torch.zeros(len(active), 3, 3, dtype=f64, device=dev)
        f2_atoms = torch.zeros(len(active), dtype=f64, device=dev).scatter_reduce(
            0, local_graph, (g_x**2).sum(1), reduce="amax", include_self=True
        )
        f2 = torch.maximum(f2_atoms, (g_c**2).sum(2).amax(1))  # [b] squared largest row
        update = []
        for k, g in enumerate(active):
            is_conv = bool(f2[k] < fmax**2)
            if is_conv or steps[g] >= max_steps:
                done[g] = True
                converged[g] = is_conv
                a0, a1 = int(sub_ptr[k]), int(sub_ptr[k + 1])
                rec = {
                    "energy": float(energy[k]), "forces": forces[a0:a1].cpu().numpy(),
                    "positions": pos[a0:a1].cpu().numpy(), "cell": cell[k].cpu().numpy(),
                    "fmax": float(f2[k].sqrt()),
                }
                if "stress" in out:
                    rec["stress"] = out["stress"][k].detach().to(f64).cpu().numpy()
                final[g] = rec
            else:
                update.append(k)
        if not update:
            continue
        upd = torch.tensor(update, device=dev)  # local indices
        upd_g = act_t[upd]  # global graph indices
        upd_atom_local = torch.isin(local_graph, upd)
        atoms_g = atom_idx[upd_atom_local]  # global atom indices being updated
        lg = local_graph[upd_atom_local]  # local graph index of each updated atom
        # map local graph -> position in `update`
        slot = torch.full((len(active),), -1, dtype=torch.long, device=dev)
        slot[upd] = torch.arange(len(update), device=dev)
        s_atom = slot[lg]
        gx, gc = g_x[upd_atom_local], g_c[upd]
        vx, vc = v_x[atoms_g], v_c[upd_g]
        nu = len(update)

        def per_graph(ax: torch.Tensor, ac: torch.Tensor, nu: int = nu, s_atom: torch.Tensor = s_atom) -> torch.Tensor:
            """Per-structure sum over atom rows [n, 3] and cell rows [nu, 3, 3] -> [nu]."""
            return torch.zeros(nu, dtype=f64, device=dev).index_add(0, s_atom, ax.sum(1)) + ac.sum((1, 2))

        st = started[upd_g]
        vf = per_graph(gx * vx, gc * vc)
        grad2 = per_graph(gx * gx, gc * gc)
        vnorm = per_graph(vx * vx, vc * vc).sqrt()
        a_now, dt_now, ns = a_g[upd_g], dt_g[upd_g], nsteps_fire[upd_g]
        uphill_free = st & (vf > 0)
        reset = st & ~(vf > 0)
        mix = a_now * vnorm / grad2.clamp_min(1e-300).sqrt()  # a |v| / |g|
        vx = torch.where(uphill_free[s_atom, None], (1 - a_now)[s_atom, None] * vx + mix[s_atom, None] * gx, vx)
        vc = torch.where(uphill_free[:, None, None], (1 - a_now)[:, None, None] * vc + mix[:, None, None] * gc, vc)
        grow = uphill_free & (ns > n_min)
        dt_now = torch.where(grow, torch.clamp(dt_now * finc, max=dtmax), dt_now)
        a_now = torch.where(grow, a_now * fa, a_now)
        ns = torch.where(uphill_free, ns + 1, ns)
        vx = torch.where(reset[s_atom, None], torch.zeros_like(vx), vx)
        vc = torch.where(reset[:, None, None], torch.zeros_like(vc), vc)
        a_now = torch.where(reset, torch.full_like(a_now, astart), a_now)
        dt_now = torch.where(reset, dt_now * fdec, dt_now)
        ns = torch.where(reset, torch.zeros_like(ns), ns)
        vx = vx + dt_now[s_atom, None] * gx
        vc = vc + dt_now[:, None, None] * gc
        drx, drc = dt_now[s_atom, None] * vx, dt_now[:, None, None] * vc
        normdr = per_graph(drx * drx, drc * drc).sqrt()
        scale = torch.where(normdr > maxstep, maxstep / normdr.clamp_min(1e-300), torch.ones_like(normdr))
        x[atoms_g] = x[atoms_g] + scale[s_atom, None] * drx
        if relax_cell:
            deform[upd_g] = deform[upd_g] + scale[:, None, None] * drc / cell_factor[upd_g][:, None, None]
        v_x[atoms_g], v_c[upd_g] = vx, vc
        a_g[upd_g], dt_g[upd_g], nsteps_fire[upd_g] = a_now, dt_now, ns
        started[upd_g] = True
        for g in upd_g.tolist():
            steps[g] += 1

    results = []
    for g, (atoms, kind) in enumerate(converted):
        rec = final[g]
        out_atoms = atoms.copy()
        out_atoms.positions = rec["positions"]
        out_atoms.cell = rec["cell"]
        sp = {"energy": rec["energy"], "forces": rec["forces"]}
        if "stress" in rec:
            sp["stress"] = full_3x3_to_voigt_6_stress(rec["stress"])
        out_atoms.calc = SinglePointCalculator(out_atoms, **sp)
        out_atoms.info.update(relax_steps=steps[g], relax_converged=converged[g], relax_fmax=rec["fmax"])
        volume = float(abs(np.linalg.det(rec["cell"])))
        results.append(
            RelaxResult(
                atoms=from_atoms(out_atoms, kind), energy=rec["energy"], steps=steps[g],
                converged=converged[g], fmax=rec["fmax"], volume=volume,
            )
        )
    return results
