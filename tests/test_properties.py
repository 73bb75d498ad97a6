"""mlip.properties with ASE's EMT, against answers computed independently here: the bulk modulus and
C11, C12, C44 from second derivatives of the energy under our own strains (the module works from
stresses), and phonon frequencies from ASE's own ``Phonons`` (the module uses phonopy)."""
from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.units import GPa
from scipy.optimize import minimize_scalar

from mlip.properties import elastic_constants, eos, frequencies_at, phonons


@pytest.fixture(scope="module")
def a0() -> float:
    """EMT's fcc Cu lattice constant, by minimising the energy of the cubic cell (Å)."""
    def energy(a: float) -> float:
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    return float(minimize_scalar(energy, bounds=(3.4, 3.8), method="bounded", options={"xatol": 1e-9}).x)


def _energy_second_derivative(a0: float, strain_of, h: float = 1e-3) -> tuple[float, float]:
    """``d²E/dh²`` (eV) of the cubic cell under the strain matrix ``strain_of(h)``, and its volume (Å³)."""
    energies = []
    for x in (-h, 0.0, h):
        atoms = bulk("Cu", "fcc", a=a0, cubic=True)
        atoms.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + strain_of(x)), scale_atoms=True)
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy())
    return (energies[0] - 2 * energies[1] + energies[2]) / h**2, bulk("Cu", "fcc", a=a0, cubic=True).get_volume()


@pytest.fixture(scope="module")
def reference(a0) -> dict[str, float]:
    """C11, C12, C44 (GPa) of EMT Cu from energies: E = E0 + V/2 Σ C_ij ε_i ε_j at zero stress."""
    d11, v = _energy_second_derivative(a0, lambda h: np.diag([h, 0.0, 0.0]))  # = V C11
    d_pair, _ = _energy_second_derivative(a0, lambda h: np.diag([h, h, 0.0]))  # = 2 V (C11 + C12)
    shear = lambda h: np.array([[0, 0, 0], [0, 0, h / 2], [0, h / 2, 0]])
    d44, _ = _energy_second_derivative(a0, shear)  # = V C44
    c11 = d11 / v / GPa
    c12 = d_pair / (2 * v) / GPa - c11
    return {"C11": c11, "C12": c12, "C44": d44 / v / GPa, "B": (c11 + 2 * c12) / 3}


def test_eos_matches_the_energy_curvature(a0, reference):
    atoms = bulk("Cu", "fcc", a=a0 * 1.01, cubic=True)  # not at the minimum: the fit finds it
    result = eos(atoms, EMT(), strain=0.02)
    assert result["v0"] == pytest.approx(a0**3, rel=1e-4)
    assert result["bulk_modulus"] == pytest.approx(reference["B"], rel=0.02)
    assert len(result["volumes"]) == len(result["energies"]) == 9
    with pytest.raises(ValueError, match="needs a crystal"):
        eos(_molecule(), EMT())


def _molecule():
    """A Cu atom without periodicity."""
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.pbc = False
    return atoms


def test_elastic_constants_match_energy_second_derivatives(a0, reference):
    atoms = bulk("Cu", "fcc", a=a0 * 0.98, cubic=True)  # compressed: the cell is relaxed first
    atoms.rattle(0.01, seed=0)
    result = elastic_constants(atoms, EMT())
    relaxed = result["atoms"]
    assert relaxed.cell.lengths() == pytest.approx([a0] * 3, rel=1e-4)
    for key in ("C11", "C12", "C44"):
        assert result[key] == pytest.approx(reference[key], rel=0.01), key
    # cubic symmetry, GPa: C11 = C22 = C33, C12 = C13 = C23, C44 = C55 = C66, the rest ~0
    c = result["matrix"]
    assert np.allclose(np.diag(c)[:3], reference["C11"], rtol=0.01)
    assert abs(c[0, 3]) < 0.5 and abs(c[3, 4]) < 0.5
    # cubic moduli: B = (C11 + 2 C12)/3 in every average; G_V = (C11 - C12 + 3 C44)/5
    assert result["bulk_modulus"] == pytest.approx(reference["B"], rel=0.01)
    assert result["shear_modulus_voigt"] == pytest.approx(
        (reference["C11"] - reference["C12"] + 3 * reference["C44"]) / 5, rel=0.01)
    assert result["shear_modulus_reuss"] < result["shear_modulus"] < result["shear_modulus_voigt"]


def test_phonons_match_ase_phonons(a0, tmp_path):
    pytest.importorskip("phonopy", reason="the phonons extra (phonopy) is not installed")
    from ase.phonons import Phonons

    prim = bulk("Cu", "fcc", a=a0)
    result = phonons(prim, EMT(), supercell=(4, 4, 4), plot=tmp_path / "phonons.png")
    gamma = result["gamma_thz"]
    assert gamma.shape == (3,) and np.abs(gamma).max() < 0.05  # three acoustic modes, at zero
    assert (tmp_path / "phonons.png").stat().st_size > 1000
    band = result["band"]
    assert band["frequencies"].shape == (len(band["distances"]), 3)
    assert result["dos"]["frequencies"].shape == result["dos"]["dos"].shape
    # an independent answer: ASE's own finite-displacement phonons on the same 4x4x4 supercell, at X and L
    ase_ph = Phonons(prim, EMT(), supercell=(4, 4, 4), delta=0.01, name=str(tmp_path / "ase-phonons"))
    ase_ph.run()
    ase_ph.read(acoustic=True)
    ph = result["phonopy"]
    thz_per_ev = 1.0 / 4.135667696e-3  # E = h f
    for q in ([0.5, 0.0, 0.5], [0.5, 0.5, 0.5]):  # X and L in reduced coordinates of the primitive cell
        ours = np.sort(frequencies_at(ph, [q])[0])
        theirs = np.sort(ase_ph.band_structure([q], verbose=False)[0]) * thz_per_ev  # q in the same reduced units
        np.testing.assert_allclose(ours, theirs, rtol=0.01)
        assert ours.min() > 2.0  # real, optical-range frequencies away from Γ
