"""D3(BJ) dispersion on the calculator, batched relaxation and the CLI: energy, forces and stress
add up with simple-dftd3's own ASE calculator, forces and stress equal finite differences of the
energy (float64), periodic and molecular; a clear error when simple-dftd3 is missing."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.fd import calculate_numerical_forces
from ase.io import read, write
from click.testing import CliRunner
from toy_models import calc64, morse_model, rattled_cu

from mlip.models.base import save_model

pytest.importorskip("dftd3", reason="the d3 extra (simple-dftd3) is not installed")
from dftd3.ase import DFTD3

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")


def cu_cluster() -> Atoms:
    """A 13-atom Cu cuboctahedron (a molecule: no cell, no pbc), rattled."""
    from ase.cluster import Octahedron

    atoms = Octahedron("Cu", 3, cutoff=1)
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    atoms.rattle(0.05, seed=2)
    return atoms


def numerical_stress(atoms: Atoms, eps: float = 1e-5) -> np.ndarray:
    """Voigt stress ``(1/V) dE/dε`` by central differences of the energy under symmetric strains."""
    from mlip.properties import VOIGT

    cell, volume, out = np.asarray(atoms.cell).copy(), atoms.get_volume(), np.zeros(6)
    for k, (i, j) in enumerate(VOIGT):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            # engineering shear: ε_ij = ε_ji = eps/2, so dE/d(eps) = V σ_ij as for the normal components
            strain[i, j] += sign * eps / (1 if i == j else 2)
            strain[j, i] = strain[i, j]
            atoms.set_cell(cell @ strain, scale_atoms=True)
            energies.append(atoms.get_potential_energy())
        atoms.set_cell(cell, scale_atoms=True)
        out[k] = (energies[0] - energies[1]) / (2 * eps) / volume
    return out


@pytest.mark.parametrize("periodic", [True, False])
def test_energy_forces_stress_add_up(periodic):
    atoms = rattled_cu(rattle=0.05) if periodic else cu_cluster()
    results = {}
    # simple-dftd3's own ASE calculator with the same smooth cutoff (1 Å, mlip's default)
    for name, calc in (("sum", calc64(dispersion="pbe")), ("model", calc64()),
                       ("d3", DFTD3(method="PBE", damping="d3bj", realspace_cutoff={"width2": 1.0}))):
        a = atoms.copy()
        a.calc = calc
        results[name] = (a.get_potential_energy(), a.get_forces(), a.get_stress() if periodic else np.zeros(6))
        if name == "sum":
            # per-atom energies (D3's pairwise split) still sum to the total
            assert a.get_potential_energies().sum() == pytest.approx(results[name][0], abs=1e-10)
    e_d3 = results["d3"][0]
    assert abs(e_d3) > 1e-2  # dispersion is not negligible here, so the sum is a real check
    for k in range(3):
        np.testing.assert_allclose(results["sum"][k], results["model"][k] + results["d3"][k], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("periodic", [True, False])
def test_forces_with_dispersion_equal_finite_differences(periodic):
    atoms = rattled_cu(rattle=0.1) if periodic else cu_cluster()
    atoms.calc = calc64(dispersion="pbe")
    f = atoms.get_forces()
    some = [0, 5, 12]
    np.testing.assert_allclose(f[some], calculate_numerical_forces(atoms, eps=1e-4, iatoms=some), atol=5e-7)
    # and the dispersion part alone is a real force (not hidden under the model's)
    bare = atoms.copy()
    bare.calc = calc64()
    assert np.abs(f - bare.get_forces()).max() > 1e-3


def test_stress_with_dispersion_equals_strain_derivative():
    atoms = rattled_cu(rattle=0.05, triclinic=True)
    atoms.calc = calc64(dispersion="pbe")
    np.testing.assert_allclose(atoms.get_stress(), numerical_stress(atoms), atol=2e-8)


def test_functional_name_selects_parameters():
    atoms = rattled_cu()
    energies = {}
    for functional in ("pbe", "PBE", "b3lyp"):
        a = atoms.copy()
        a.calc = calc64(dispersion=functional)
        energies[functional] = a.get_potential_energy()
    assert energies["pbe"] == energies["PBE"]
    assert abs(energies["pbe"] - energies["b3lyp"]) > 1e-3  # other parameters, other energy
    with pytest.raises(ValueError, match="no D3.*parameters for it"):
        calc64(dispersion="not-a-functional")


def test_missing_dftd3_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dftd3", None)  # import dftd3 now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mlip\[d3\]'"):
        calc64(dispersion="pbe")


def test_batched_relaxation_includes_dispersion():
    from mlip.md import relax_batch

    start = [rattled_cu(rattle=0.05), rattled_cu(repeat=(1, 1, 2), rattle=0.05, seed=1)]
    with_d3 = relax_batch(start, morse_model(), fmax=1e-3, relax_cell=True, dtype="float64", device="cpu",
                          dispersion="pbe")
    without = relax_batch(start, morse_model(), fmax=1e-3, relax_cell=True, dtype="float64", device="cpu")
    for r, r0 in zip(with_d3, without):
        assert r.converged
        a = r.atoms.copy()
        a.calc = calc64(dispersion="pbe")
        assert a.get_potential_energy() == pytest.approx(r.energy, abs=1e-9)
        assert np.abs(a.get_forces()).max() < 1e-3  # relaxed on the summed forces
        assert r.volume < r0.volume  # dispersion is attractive: a denser crystal


def test_cli_md_and_relax_take_dispersion(tmp_path):
    from mlip.cli.main import main

    model_path = tmp_path / "morse.pt"
    save_model(morse_model(), model_path)
    start = tmp_path / "cu.extxyz"
    write(start, rattled_cu(rattle=0.03))
    relaxed = tmp_path / "relaxed"
    result = CliRunner().invoke(main, ["relax", str(model_path), str(start), "--out", str(relaxed), "--device", "cpu",
                                       "--dtype", "float64", "--fmax", "0.01", "--dispersion", "pbe"])
    assert result.exit_code == 0, result.output
    final = read(relaxed / "relaxed.extxyz")
    a = final.copy()
    a.calc = calc64(dispersion="pbe")
    assert final.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-8)
    traj = tmp_path / "md.extxyz"
    result = CliRunner().invoke(main, ["md", str(model_path), str(start), "--steps", "4", "--traj-every", "2",
                                       "--out", str(traj), "--device", "cpu", "--dtype", "float64",
                                       "--no-progress", "--dispersion", "pbe"])
    assert result.exit_code == 0, result.output
    frame = read(traj, index=-1)
    b = frame.copy()
    b.calc = calc64(dispersion="pbe")
    assert frame.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-8)
    result = CliRunner().invoke(main, ["md", str(model_path), str(start), "--steps", "1", "--out", str(traj),
                                       "--no-progress", "--dispersion", "nonsense"])
    assert result.exit_code != 0 and "no D3" in result.output
