"""Short-range pair repulsion: the Ziegler-Biersack-Littmark (ZBL) screened nuclear repulsion.

A learned potential trained on near-equilibrium data has seen no atoms closer than its training
distribution, and nothing stops it from predicting energies far too low there (atoms collapsing in
MD, holes in extrapolation). ZBL is the universal screened Coulomb repulsion of two nuclei,

    E(r) = k Z_i Z_j / r · φ(r / a),   a = 0.46850 Å / (Z_i^0.23 + Z_j^0.23),
    φ(x) = 0.18175 e^{-3.19980 x} + 0.50986 e^{-0.94229 x} + 0.28022 e^{-0.40290 x} + 0.02817 e^{-0.20162 x},

(``k = e²/4πε0`` = 14.40 eV Å; Ziegler, Biersack and Littmark, *The Stopping and Range of Ions in
Solids*, 1985), switched off by a C² polynomial envelope that reaches zero at
``SWITCH_RANGE`` = 0.85 times the pair's covalent radii sum (ASE's table), so it acts only on bonds
compressed beyond what thermal motion reaches and leaves the learned part to describe everything
from there on. ``φ(0) = 1``: at short range it is the bare Coulomb repulsion of the nuclei.

Why not at the covalent radii sum itself (MACE's choice): thermally compressed bonds reach 0.90-0.95
of it (rMD17 ethanol: C-C in 39 % of the frames below 1.0, none below 0.90), where the switch's tail
still exerts ~2 eV/Å on a C-C bond, which the network must learn to cancel at the cost of its
in-distribution accuracy (docs/benchmarks.md, Accuracy).
"""
from __future__ import annotations

import torch
from ase.units import Bohr, Hartree

from mlip.nn.radial import PolynomialEnvelope
from mlip.nn.readout import covalent_radius_sum
from mlip.nn.scatter import scatter_sum

#: e² / (4 π ε0) in eV Å
COULOMB_EV_A = Hartree * Bohr
#: screening length constant (Å) and exponent of the universal screening length
ZBL_A0, ZBL_POWER = 0.46850, 0.23
#: coefficients and exponents of the universal screening function φ (they sum to 1)
ZBL_COEFFS = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)
#: polynomial degree of the switching envelope (u = u' = u'' = 0 where it ends)
SWITCH_P = 6
#: the switch ends at this fraction of the pair's covalent radii sum
SWITCH_RANGE = 0.85

_SWITCH = PolynomialEnvelope(1.0, SWITCH_P)


def screening(x: torch.Tensor) -> torch.Tensor:
    """The universal screening function ``φ(x)``, ``x = r / a`` (dimensionless)."""
    return sum(c * torch.exp(-d * x) for c, d in zip(ZBL_COEFFS, ZBL_EXPONENTS))


def zbl_pair_energy(r: torch.Tensor, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
    """Switched ZBL energy (eV) of each pair at distance ``r`` (Å) with atomic numbers ``z_i``, ``z_j``.

    Shapes: r, z_i, z_j [n_pairs] -> [n_pairs]; zero from ``SWITCH_RANGE`` times the pair's covalent
    radii sum on.
    """
    zi, zj = z_i.to(r.dtype), z_j.to(r.dtype)
    a = ZBL_A0 / (zi.pow(ZBL_POWER) + zj.pow(ZBL_POWER))
    switch = _SWITCH(r / (SWITCH_RANGE * covalent_radius_sum(z_i, z_j, r)))
    # beyond the switch the pair contributes exactly zero (no 0 * inf where r would be 0 on padding)
    r_safe = torch.where(switch > 0, r, torch.ones_like(r))
    return COULOMB_EV_A * zi * zj / r_safe * screening(r_safe / a) * switch


def zbl_atom_energy(r: torch.Tensor, z_sender: torch.Tensor, z_receiver: torch.Tensor, receiver: torch.Tensor,
                    n_atoms: int) -> torch.Tensor:
    """Each atom's share of the ZBL pair energies over directed edges: half of each edge's pair energy
    goes to its receiver, so a pair listed in both directions counts once in the total.

    Shapes: r, z_sender, z_receiver, receiver [n_edges] -> [n_atoms] (eV).
    """
    return scatter_sum(0.5 * zbl_pair_energy(r, z_sender, z_receiver), receiver, n_atoms)
