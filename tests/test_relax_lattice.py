"""Relaxation reaches a lattice constant known independently of mlip's relaxation code.

With a pair potential whose cutoff takes in only the 12 nearest neighbours of fcc, the energy per
atom is ``6 φ(a / √2)``: the stress-free lattice constant is ``a* = √2 r*`` with ``φ'(r*) = 0``,
which a 1D root-find of the analytic derivative gives in plain float64 (no torch, no mlip). Both
relaxation paths (batched FIRE and ASE's FIRE + FrechetCellFilter) must land on it from a strained,
sheared and rattled start.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from ase.neighborlist import neighbor_list
from scipy.optimize import brentq
from toy_models import MorseConfig, morse_model, morse_pair_energy

import mlip
from mlip.md import relax_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")  # tiny structures: speed only

#: r_max between the first (r*) and second (a* = √2 r*) neighbour shells of the relaxed crystal
CONFIG = MorseConfig(r_max=3.3)
TOLERANCE = 1e-4  # Å, on a*
FMAX = 1e-5  # eV/Å: a cell force of 1e-5 eV/Å is a lattice-constant error of ~1e-5 Å here


def _dphi_dr(r: float) -> float:
    """d/dr of the test-morse pair energy ``D [(1 - e)² - 1] u³``, ``e = exp(-α (r - r0))``, ``u = 1 - (r/r_max)²``."""
    c = CONFIG
    e = math.exp(-c.alpha * (r - c.r0))
    u = 1.0 - (r / c.r_max) ** 2
    d_morse = 2.0 * (1.0 - e) * c.alpha * e  # d/dr [(1 - e)² - 1]
    d_cut = 3.0 * u**2 * (-2.0 * r / c.r_max**2)  # d/dr u³
    return c.depth * (d_morse * u**3 + ((1.0 - e) ** 2 - 1.0) * d_cut)


def exact_lattice_constant() -> float:
    """``a* = √2 r*``, ``φ'(r*) = 0`` (float64 root-find; φ has one minimum inside the cutoff)."""
    r_star = brentq(_dphi_dr, 2.0, 3.0, xtol=1e-15, rtol=4 * np.finfo(float).eps)
    return math.sqrt(2.0) * r_star


def _starts() -> list:
    """A sheared, strained and rattled 4-atom cubic cell and a compressed 1-atom primitive cell."""
    cubic = bulk("Cu", "fcc", a=3.7, cubic=True)
    strain = np.array([[0.03, 0.01, 0.0], [0.01, -0.02, 0.005], [0.0, 0.005, 0.02]])
    cubic.set_cell(np.asarray(cubic.cell) @ (np.eye(3) + strain), scale_atoms=True)
    cubic.rattle(0.02, seed=0)
    return [cubic, bulk("Cu", "fcc", a=3.5)]


def _lattice_constant_error(atoms, a_star: float) -> float:
    """Largest ``|√2 d - a*|`` over all nearest-neighbour distances ``d`` (checks size and shape)."""
    _, d = neighbor_list("id", atoms, 0.5 * (a_star / math.sqrt(2.0) + a_star))
    assert len(d) == 12 * len(atoms)  # fcc: 12 nearest neighbours per atom
    return float(np.abs(math.sqrt(2.0) * d - a_star).max())


def test_the_cutoff_takes_in_only_nearest_neighbours():
    a_star = exact_lattice_constant()
    r_star = a_star / math.sqrt(2.0)
    assert r_star + 0.5 < CONFIG.r_max < a_star - 0.2  # second shell well outside the cutoff
    assert abs(_dphi_dr(r_star)) < 1e-12
    # the analytic derivative is the derivative of the analytic energy (guards a typo in _dphi_dr)
    h = 1e-6
    fd = (morse_pair_energy(r_star + 0.1 + h, CONFIG) - morse_pair_energy(r_star + 0.1 - h, CONFIG)) / (2 * h)
    assert _dphi_dr(r_star + 0.1) == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("path", ["batched", "sequential"])
def test_relaxation_reaches_the_analytic_lattice_constant(path):
    a_star = exact_lattice_constant()
    model = morse_model(r_max=CONFIG.r_max)
    kw = {"fmax": FMAX, "relax_cell": True, "device": "cpu", "dtype": "float64", "max_steps": 2000}
    if path == "batched":
        relaxed = [r.atoms for r in relax_batch(_starts(), model, **kw)]
    else:
        relaxed = [mlip.relax(s, model, optimizer="FIRE", **kw) for s in _starts()]
    for atoms in relaxed:
        assert atoms.info["relax_converged"]
        assert _lattice_constant_error(atoms, a_star) < TOLERANCE
        # and the energy per atom is that of 6 bonds at r* (E0 = 0)
        e_star = 6.0 * morse_pair_energy(a_star / math.sqrt(2.0), CONFIG)
        assert atoms.get_potential_energy() / len(atoms) == pytest.approx(e_star, abs=1e-9)
