"""Per-atom energy heads: linear/MLP readouts with one output per head, scale/shift, and the
per-head, per-element reference energies E0.

Readouts have no biases, so an atom whose features are all zero (an isolated atom) gets
exactly ``E0`` when the shift is weighted by the atom's smooth bond count
(``shift_by_coordination``, the default), and ``shift + E0`` with a constant shift (MACE's ScaleShift).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from ase.data import covalent_radii

from mlip.nn.frames import smoothstep
from mlip.nn.scatter import scatter_sum


def head_index(heads: Sequence[str], batch_heads: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Index of each structure's head in ``heads`` (``[n_graphs]``, int64).

    A single-head model maps every structure to that head; a multi-head model raises on a
    head it does not have.
    """
    if len(heads) == 1:
        return torch.zeros(len(batch_heads), dtype=torch.long, device=device)
    lookup = {h: i for i, h in enumerate(heads)}
    out = []
    for g, h in enumerate(batch_heads):
        if h not in lookup:
            raise ValueError(f"structure {g} in the batch has head {h!r}; this model has heads {list(heads)}")
        out.append(lookup[h])
    return torch.tensor(out, dtype=torch.long, device=device)


def e0_table(e0s: Any, heads: Sequence[str], elements: Sequence[int]) -> torch.Tensor:
    """Reference energies as a float64 table ``[n_heads, n_elements]`` in eV.

    ``e0s`` is ``None`` (zeros), ``{Z: E0}`` (one table for every head), ``{head: {Z: E0}}``,
    or a list of per-element values (or a list of such lists, one per head) in ``elements`` order.
    Keys may be ints or strings (YAML).
    """
    n_h, n_e = len(heads), len(elements)
    table = torch.zeros(n_h, n_e, dtype=torch.float64)
    if e0s is None:
        return table

    def row(spec: Any, where: str) -> torch.Tensor:
        r = torch.zeros(n_e, dtype=torch.float64)
        if isinstance(spec, dict):
            for z, v in spec.items():
                z = int(z)
                if z in elements:
                    r[list(elements).index(z)] = float(v)
            return r
        spec = list(spec)
        if len(spec) != n_e:
            raise ValueError(f"e0s{where}: {len(spec)} values for {n_e} elements {list(elements)}")
        return torch.tensor([float(v) for v in spec], dtype=torch.float64)

    if isinstance(e0s, dict) and e0s and all(isinstance(k, str) and k in heads for k in e0s):
        for h, spec in e0s.items():
            table[list(heads).index(h)] = row(spec, f"[{h!r}]")
        return table
    if isinstance(e0s, (list, tuple)) and e0s and isinstance(e0s[0], (list, tuple, dict)):
        if len(e0s) != n_h:
            raise ValueError(f"e0s: {len(e0s)} per-head tables for {n_h} heads {list(heads)}")
        for i, spec in enumerate(e0s):
            table[i] = row(spec, f"[{i}]")
        return table
    table[:] = row(e0s, "")
    return table


class LinearReadout(torch.nn.Module):
    """Scalars -> one energy per head, bias-free.

    Shapes:
        x [n_atoms, num_channels] -> [n_atoms, n_heads].
    """

    def __init__(self, num_channels: int, n_heads: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_channels, n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight / math.sqrt(self.weight.shape[0])


class MLPReadout(torch.nn.Module):
    """Scalars -> SiLU -> one energy per head, bias-free (zero features give zero energy).

    Shapes:
        x [n_atoms, num_channels] -> [n_atoms, n_heads].
    """

    def __init__(self, num_channels: int, hidden: int, n_heads: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(num_channels, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(x @ self.w1 / math.sqrt(self.w1.shape[0]))
        return h @ self.w2 / math.sqrt(self.w2.shape[0])


def select_head(per_head: torch.Tensor, atom_head: torch.Tensor) -> torch.Tensor:
    """Pick each atom's head column: ``[n_atoms, n_heads], [n_atoms] -> [n_atoms]``."""
    if per_head.shape[1] == 1:
        return per_head[:, 0]
    return per_head.gather(1, atom_head[:, None])[:, 0]


#: a pair counts as one bond up to ``BOND_RANGE[0] * s`` and none from ``BOND_RANGE[1] * s`` on,
#: ``s`` its covalent radii sum: flat over thermal bond stretching, broken before second neighbours
BOND_RANGE = (1.3, 2.0)
#: a bonded atom keeps ``1 - exp(-BOND_SHIFT_RATE * n)`` of the shift (0.95 with one bond)
BOND_SHIFT_RATE = 3.0
_COVALENT: dict[tuple, torch.Tensor] = {}


def covalent_radius_sum(z_i: torch.Tensor, z_j: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Covalent radii sum (Å, ASE's table) of each pair, in ``like``'s dtype and device.

    Shapes: z_i, z_j [n_pairs] (atomic numbers) -> [n_pairs].
    """
    key = (like.dtype, like.device)
    if key not in _COVALENT:
        _COVALENT[key] = torch.as_tensor(covalent_radii, dtype=like.dtype, device=like.device)
    table = _COVALENT[key]
    return table[z_i] + table[z_j]


def bond_count(r: torch.Tensor, envelope: torch.Tensor, z_sender: torch.Tensor, z_receiver: torch.Tensor,
               receiver: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Each atom's smooth count of covalent bonds ``n_i = Σ_j b(r_ij) u(r_ij)``: ``b = 1`` up to
    ``BOND_RANGE[0] * s``, ``s`` the pair's covalent radii sum (ASE's table), 0 from
    ``BOND_RANGE[1] * s`` on, a C² smoothstep between; ``u`` is the model's cutoff envelope, so ``n``
    also vanishes smoothly at ``r_max``.
    0 for an isolated atom, 1 per bond otherwise (1 for H in a molecule, 12 in fcc Cu).

    Shapes: r, envelope, z_sender, z_receiver, receiver [n_edges] -> [n_atoms].
    """
    s = covalent_radius_sum(z_sender, z_receiver, r)
    inner, outer = BOND_RANGE
    b = 1.0 - smoothstep((r - inner * s) / ((outer - inner) * s))
    return scatter_sum(b * envelope, receiver, n_atoms)


class AtomicEnergies(torch.nn.Module):
    """Per-atom ``scale * e + shift * w + E0[head, element]`` in eV, ``w = 1 - exp(-3 n)`` for an atom
    with ``n`` smooth covalent bonds (:func:`bond_count`) when ``shift_by_coordination``, else ``w = 1``.

    The shift is the mean per-atom energy left after the E0s (the binding energy per atom, several
    eV in molecules and crystals). Weighted by ``w`` it is there for every bonded atom (``w = 0.95``
    with one bond, > 0.997 with two) and goes smoothly as an atom's bonds break, so a dissociated
    atom ends at its isolated-atom E0 and a structure pulled apart tends to the sum of the
    fragments' E0s as the bonds break, where a constant shift would leave every atom ``shift``
    below its E0.

    E0s, scale and shift come from the config and are kept as a float64 master copy (not as
    buffers), cast to the input dtype on use, so a float32 model moved to float64 keeps exact E0s.

    Shapes:
        energy [n_atoms], element [n_atoms], atom_head [n_atoms] -> [n_atoms].
    """

    def __init__(self, e0s: Any, heads: Sequence[str], elements: Sequence[int], scale: float = 1.0, shift: float = 0.0,
                 shift_by_coordination: bool = True) -> None:
        super().__init__()
        self._e0 = e0_table(e0s, heads, elements)
        self.scale = float(scale)
        self.shift = float(shift)
        self.shift_by_coordination = bool(shift_by_coordination)
        self._cache: dict[tuple, torch.Tensor] = {}

    def table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = self._e0.to(dtype=dtype, device=device)
        return self._cache[key]

    def forward(self, energy: torch.Tensor, element: torch.Tensor, atom_head: torch.Tensor,
                coordination: torch.Tensor | None = None) -> torch.Tensor:
        """Shapes: energy, element, atom_head, coordination [n_atoms] (:func:`bond_count`, needed with
        ``shift_by_coordination``) -> [n_atoms] eV."""
        e0 = self.table(energy.dtype, energy.device)[atom_head, element]
        if not self.shift_by_coordination:
            return self.scale * energy + self.shift + e0
        if coordination is None:
            raise ValueError("AtomicEnergies(shift_by_coordination=True) needs each atom's smooth bond count")
        return self.scale * energy + self.shift * -torch.expm1(-BOND_SHIFT_RATE * coordination.to(energy.dtype)) + e0
