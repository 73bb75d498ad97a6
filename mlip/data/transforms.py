"""``ase.Atoms`` -> :class:`~mlip.data.graph.AtomGraph`: neighbour graph, labels, sanity checks.

Labels are read from the canonical names of :mod:`mlip.keys` (``atoms.info["energy"]``,
``atoms.arrays["forces"]``, ``atoms.info["stress"]``, ``charge``, ``spin``, ``weight``,
``head``); a missing label becomes NaN. Attached calculators are not consulted: readers in
:mod:`mlip.data.formats` put labels under these names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from ase import Atoms

from mlip import keys
from mlip.data.formats.labels import is_isolated_atom
from mlip.data.graph import AtomGraph
from mlip.data.neighbors import neighbor_list

__all__ = ["atoms_to_graph", "voigt_to_matrix"]

_NAN = float("nan")
#: periodic cells with a perpendicular height below this (Å) count as zero volume
_MIN_CELL_HEIGHT = 1e-3


def voigt_to_matrix(voigt: np.ndarray) -> np.ndarray:
    """Voigt stress ``[xx, yy, zz, yz, xz, xy]`` (ASE order) to the symmetric 3x3 matrix.

    >>> voigt_to_matrix(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).tolist()
    [[1.0, 6.0, 5.0], [6.0, 2.0, 4.0], [5.0, 4.0, 3.0]]
    """
    xx, yy, zz, yz, xz, xy = np.asarray(voigt, dtype=np.float64).reshape(6)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _source(atoms: Atoms) -> str:
    return str(atoms.info.get(keys.SOURCE, "structure"))


def _scalar(atoms: Atoms, key: str, default: float) -> torch.Tensor:
    value = atoms.info.get(key)
    if value is None:
        return torch.tensor(default, dtype=torch.float64)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{_source(atoms)}: info[{key!r}] = {value!r} is not a number") from err
    if arr.size != 1:
        raise ValueError(f"{_source(atoms)}: info[{key!r}] must be a scalar, got shape {arr.shape}")
    return torch.tensor(float(arr.reshape(())), dtype=torch.float64)


def _forces(atoms: Atoms, n_atoms: int) -> torch.Tensor:
    value = atoms.arrays.get(keys.FORCES)
    if value is None:
        return torch.full((n_atoms, 3), _NAN, dtype=torch.float64)
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (n_atoms, 3):
        raise ValueError(f"{_source(atoms)}: forces must have shape ({n_atoms}, 3), got {arr.shape}")
    return torch.tensor(arr, dtype=torch.float64)


def _stress(atoms: Atoms) -> torch.Tensor:
    value = atoms.info.get(keys.STRESS)
    if value is None:
        return torch.full((3, 3), _NAN, dtype=torch.float64)
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape == (6,):
        arr = voigt_to_matrix(arr)
    elif arr.shape == (9,):
        arr = arr.reshape(3, 3)
    elif arr.shape != (3, 3):
        raise ValueError(
            f"{_source(atoms)}: stress must be 3x3 or Voigt-6 (xx yy zz yz xz xy), got shape {arr.shape}"
        )
    return torch.tensor(arr, dtype=torch.float64)


def _check_cell(atoms: Atoms, cell: np.ndarray, pbc: np.ndarray) -> None:
    """Cell vectors along periodic directions must be finite and span a non-zero volume."""
    src = _source(atoms)
    per = np.flatnonzero(pbc)
    if len(per) == 0:
        return  # a molecule: the cell (zeros or anything) is never used
    if not np.isfinite(cell[per]).all():
        raise ValueError(f"{src}: cell vectors along periodic directions contain NaN or inf: {cell.tolist()}")
    vecs = cell[per]
    # measure spanned by the periodic vectors: length, area or volume
    if len(per) == 1:
        measure, what = float(np.linalg.norm(vecs[0])), "length"
    elif len(per) == 2:
        measure, what = float(np.linalg.norm(np.cross(vecs[0], vecs[1]))), "area"
    else:
        measure, what = float(abs(np.linalg.det(vecs))), "volume"
    # smallest distance between opposite faces of the periodic part (Å)
    lengths = np.linalg.norm(vecs, axis=1)
    if len(per) == 1:
        height = measure
    elif len(per) == 2:
        height = measure / lengths.max() if lengths.max() > 0 else 0.0
    else:
        faces = np.linalg.norm(np.cross(vecs[[1, 2, 0]], vecs[[2, 0, 1]]), axis=1)
        height = measure / faces.max() if faces.max() > 0 else 0.0
    if not height > _MIN_CELL_HEIGHT:
        raise ValueError(
            f"{src}: zero or near-zero cell {what} along periodic directions {per.tolist()} "
            f"({what} {measure:.3g}, smallest height {height:.3g} Å); "
            f"cell = {cell.tolist()}, pbc = {pbc.tolist()}"
        )


def atoms_to_graph(
    atoms: Atoms,
    r_max: float,
    backend: str = "auto",
    min_distance: float = 0.1,
) -> AtomGraph:
    """Build the neighbour graph and collect labels of one structure.

    Edges are every pair closer than ``r_max`` (periodic images included; see
    :func:`mlip.data.neighbors.neighbor_list`), as ``(sender, receiver)`` with integer shifts.
    Positions are kept as given (not wrapped). Labels missing from ``atoms`` are NaN, ``weight``
    defaults to 1 and ``head`` to ``"default"``. A Voigt stress is read in ASE order
    ``xx yy zz yz xz xy``.

    Args:
        atoms: the structure; labels under the canonical names of :mod:`mlip.keys`.
        r_max: cutoff radius (Å).
        backend: neighbour-list backend (``"torch"``, ``"ase"``, ``"vesin"``, ``"matscipy"``).
        min_distance: any two atoms (or an atom and a periodic image) closer than this (Å) are
            an error; 0 disables the check.

    Returns:
        An :class:`AtomGraph` of float64 CPU tensors.

    Shapes:
        positions [n_atoms, 3] Å; numbers [n_atoms]; cell [3, 3] Å; pbc [3];
        edge_index [2, n_edges]; unit_shifts [n_edges, 3]; energy [] eV; forces [n_atoms, 3] eV/Å;
        stress [3, 3] eV/Å³; charge, spin, weight [].

    Raises:
        ValueError: naming ``atoms.info["source"]`` (or ``"structure"``) for NaN/inf positions,
            a zero-volume cell along periodic directions, overlapping atoms, malformed labels.
    """
    src = _source(atoms)
    positions = np.asarray(atoms.positions, dtype=np.float64)
    n_atoms = len(atoms)
    if not np.isfinite(positions).all():
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        raise ValueError(f"{src}: positions contain NaN or inf (atoms {bad[:10].tolist()})")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    _check_cell(atoms, cell, pbc)
    # rows along non-periodic directions are never used; keep them finite so that
    # unit_shifts @ cell (0 * inf = NaN) stays finite downstream
    bad_rows = ~pbc & ~np.isfinite(cell).all(axis=1)
    if bad_rows.any():
        cell = np.where(bad_rows[:, None], 0.0, cell)

    pos_t = torch.tensor(positions, dtype=torch.float64)
    cell_t = torch.tensor(cell, dtype=torch.float64)
    pbc_t = torch.tensor(pbc, dtype=torch.bool)
    edge_index, unit_shifts = neighbor_list(pos_t, cell_t, pbc_t, r_max, backend=backend)

    if min_distance > 0 and n_atoms > 0:
        _check_overlaps(src, pos_t, cell_t, pbc_t, edge_index, unit_shifts, r_max, min_distance, backend)

    head: Any = atoms.info.get(keys.HEAD)
    head = "default" if head is None else head
    return AtomGraph(
        positions=pos_t,
        numbers=torch.tensor(np.asarray(atoms.numbers), dtype=torch.long),
        cell=cell_t,
        pbc=pbc_t,
        edge_index=edge_index,
        unit_shifts=unit_shifts,
        energy=_scalar(atoms, keys.ENERGY, _NAN),
        forces=_forces(atoms, n_atoms),
        stress=_stress(atoms),
        charge=_scalar(atoms, keys.CHARGE, _NAN),
        spin=_scalar(atoms, keys.SPIN, _NAN),
        weight=_scalar(atoms, keys.WEIGHT, 1.0),
        head=str(head),
        isolated=torch.tensor(is_isolated_atom(atoms)),
    )


def _check_overlaps(
    src: str,
    pos: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    edge_index: torch.Tensor,
    unit_shifts: torch.Tensor,
    r_max: float,
    min_distance: float,
    backend: str,
) -> None:
    """Raise if any pair (periodic images included) is closer than ``min_distance`` (Å)."""
    if min_distance >= r_max:  # the graph does not contain every short pair: search again
        edge_index, unit_shifts = neighbor_list(pos, cell, pbc, min_distance, backend=backend)
    sender, receiver = edge_index
    vec = pos[sender] - pos[receiver] + unit_shifts.to(torch.float64) @ cell
    dist = torch.linalg.norm(vec, dim=1)
    close = dist < min_distance
    if bool(close.any()):
        k = int(torch.argmin(torch.where(close, dist, torch.full_like(dist, math.inf))))
        i, j = int(receiver[k]), int(sender[k])
        shift = unit_shifts[k].tolist()
        image = "" if shift == [0, 0, 0] else f" (periodic image shifted by {shift} cells)"
        raise ValueError(
            f"{src}: atoms {i} and {j}{image} are {float(dist[k]):.4g} Å apart, closer than "
            f"min_distance={min_distance} Å: overlapping atoms"
        )
