"""E0s (isolated atoms, least-squares fit), average neighbour count and data-set summaries."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from mlip.data.datasets import GraphDataset
from mlip.data.formats import read
from mlip.data.stats import (
    average_num_neighbors,
    e0s_from_isolated_atoms,
    fit_e0s,
    fit_e0s_compositions,
    summarize,
)
from mlip.data.transforms import atoms_to_graph

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "emt_crystals.xyz"
E0 = {1: -13.587, 6: -1029.41, 8: -2041.7, 29: -1.3e4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_structures(n: int, seed: int = 0) -> list[Atoms]:
    """Structures of random composition over E0's elements, energies exactly Σ n_Z E0_Z."""
    rng = np.random.default_rng(seed)
    zs = sorted(E0)
    out = []
    for _ in range(n):
        numbers = rng.choice(zs, size=int(rng.integers(2, 9)))
        a = Atoms(numbers=numbers, positions=np.arange(len(numbers))[:, None] * [1.5, 0.0, 0.0])
        a.info["energy"] = float(sum(E0[int(z)] for z in numbers))
        out.append(a)
    return out


def test_fit_e0s_recovers_known_energies():
    frames = random_structures(40)
    unlabelled = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])  # no energy: skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full rank: no warning
        got = fit_e0s(frames + [unlabelled])
    assert list(got) == sorted(E0)
    for z, value in E0.items():
        assert got[z] == pytest.approx(value, rel=1e-12, abs=1e-9)
    # an explicit element list gives the same numbers, and so do bare compositions
    assert fit_e0s(frames, elements=[29, 8, 6, 1]) == pytest.approx(got, rel=1e-12)
    comps = [(dict(Counter(a.numbers.tolist())), a.info["energy"]) for a in frames] + [({29: 2}, float("nan"))]
    assert fit_e0s_compositions(comps, sorted(E0)) == pytest.approx(got, rel=1e-12)


def test_fit_e0s_rank_deficient_warns_and_still_fits():
    # only water: 2 E0_H + E0_O is fixed, the split between H and O is not
    frames = []
    for e in (-10.0, -10.5, -9.5):
        w = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
        w.info["energy"] = e
        frames.append(w)
    with pytest.warns(UserWarning, match=r"rank-deficient.*H, O"):
        got = fit_e0s(frames)
    # least squares on the determined combination: 2 E_H + E_O = mean energy
    assert 2 * got[1] + got[8] == pytest.approx(-10.0, abs=1e-12)
    # undetermined direction pinned to the mean per-atom energy: equal E0s here
    assert got[1] == pytest.approx(got[8], abs=1e-12) and got[1] == pytest.approx(-10.0 / 3, abs=1e-12)
    # an element that never appears is undetermined too; the others stay exact
    frames = random_structures(30)
    with pytest.warns(UserWarning, match=r"E0s of Au are not separable"):
        got = fit_e0s(frames, elements=sorted(E0) + [79])
    for z, value in E0.items():
        assert got[z] == pytest.approx(value, rel=1e-12, abs=1e-9)


def test_fit_e0s_errors():
    with pytest.raises(ValueError, match="no structure carries an energy"):
        fit_e0s([Atoms("H")])
    frames = random_structures(5)
    frames[3].info["source"] = "x.xyz frame 3"
    frames[3].numbers[0] = 26
    with pytest.raises(ValueError, match=r"x.xyz frame 3.*Fe"):
        fit_e0s(frames, elements=sorted(E0))


def isolated(symbol: str, energy: float) -> Atoms:
    a = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
    a.info["energy"] = energy
    a.info["isolated_atom"] = True
    return a


def test_e0s_from_isolated_atoms():
    frames = random_structures(5) + [isolated(s, float(i)) for i, s in enumerate("HCOH")] + [isolated("Cu", 7.0)]
    frames[-2].info["energy"] = 0.0  # a second H with the same energy as the first is fine
    assert e0s_from_isolated_atoms(frames) == {1: 0.0, 6: 1.0, 8: 2.0, 29: 7.0}
    assert e0s_from_isolated_atoms(frames, elements=[8]) == {8: 2.0}
    # detected without the flag too: one atom, no pbc, or config_type IsolatedAtom
    plain = Atoms("O", info={"energy": -3.0})
    tagged = Atoms("H", cell=[10, 10, 10], pbc=True, info={"energy": -1.0, "config_type": "IsolatedAtom"})
    assert e0s_from_isolated_atoms([plain, tagged]) == {1: -1.0, 8: -3.0}


def test_e0s_from_isolated_atoms_errors():
    conflict = [isolated("H", -13.6), isolated("H", -13.5)]
    conflict[1].info["source"] = "b.xyz frame 9"
    with pytest.raises(ValueError, match=r"two different isolated-atom energies for H.*b.xyz frame 9"):
        e0s_from_isolated_atoms(conflict)
    with pytest.raises(ValueError, match=r"no isolated-atom frame for C \(Z=6\), Cu \(Z=29\)"):
        e0s_from_isolated_atoms(random_structures(20) + [isolated("H", 0.0), isolated("O", 0.0)])
    no_energy = isolated("O", 0.0)
    del no_energy.info["energy"]
    with pytest.raises(ValueError, match="has no energy"):
        e0s_from_isolated_atoms([no_energy])


def test_bundled_isolated_atoms_are_emt_single_atoms():
    frames = read(BUNDLED)
    e0s = e0s_from_isolated_atoms(frames)
    assert sorted(e0s) == [13, 28, 29, 46, 47, 78, 79]
    for z, value in e0s.items():
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        atom.calc = EMT()
        assert value == pytest.approx(atom.get_potential_energy(), abs=1e-10)


def test_average_num_neighbors_fcc_first_shell():
    # fcc: 12 neighbours at a/sqrt(2) = 2.55 Å, the next 6 at a = 3.6 Å
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    ds = GraphDataset([cu, bulk("Cu", "fcc", a=3.6)], r_max=3.0)
    assert average_num_neighbors(ds) == pytest.approx(12.0)
    assert average_num_neighbors([atoms_to_graph(cu, 4.0)]) == pytest.approx(18.0)
    # mixed: a dimer (1 neighbour each) and an isolated atom (0) with the fcc crystal
    dimer = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    ds = GraphDataset([cu, dimer, Atoms("H")], r_max=3.0)
    assert average_num_neighbors(ds) == pytest.approx((8 * 12 + 2) / 11)


def test_summarize_counts_and_moments():
    rng = np.random.default_rng(1)
    crystal = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    crystal.info.update(energy=-8.0, stress=np.diag([0.01, -0.02, 0.03]), head="pbe", config_type="bulk")
    crystal.arrays["forces"] = rng.normal(size=(2, 3))
    mol = Atoms("CH4", positions=np.arange(15).reshape(5, 3) * 0.9)
    mol.info.update(energy=-25.0, charge=1.0, spin=2.0)
    mol.arrays["forces"] = rng.normal(size=(5, 3))
    slab = Atoms("Cu3", positions=np.arange(9).reshape(3, 3) * 1.1, cell=[5, 5, 20], pbc=[True, True, False])
    atom = Atoms("O", info={"energy": -4.0, "config_type": "IsolatedAtom"})
    s = summarize(iter([crystal, mol, slab, atom]))  # any iterable: streams
    assert s["n_structures"] == 4
    assert (s["n_atoms_total"], s["n_atoms_min"], s["n_atoms_max"]) == (11, 1, 5)
    assert s["elements"] == {"H": 4, "C": 1, "O": 1, "Cu": 5}
    assert list(s["elements"]) == ["H", "C", "O", "Cu"]  # ordered by Z
    assert s["element_structures"]["Cu"] == 2
    assert s["labels"] == {"energy": 3, "forces": 2, "stress": 1, "charge": 1, "spin": 1, "weight": 0, "head": 1}
    assert (s["n_periodic"], s["n_molecular"], s["n_partially_periodic"], s["n_isolated_atoms"]) == (1, 2, 1, 1)
    per_atom = np.array([-8.0 / 2, -25.0 / 5, -4.0])
    assert s["energy_per_atom_mean"] == pytest.approx(per_atom.mean())
    assert s["energy_per_atom_std"] == pytest.approx(per_atom.std())
    assert (s["energy_per_atom_min"], s["energy_per_atom_max"]) == (-5.0, -4.0)
    forces = np.concatenate([crystal.arrays["forces"], mol.arrays["forces"]])
    assert s["forces_rms"] == pytest.approx(np.sqrt(np.mean(forces**2)))
    assert s["forces_max"] == pytest.approx(np.linalg.norm(forces, axis=1).max())
    assert (s["stress_min"], s["stress_max"]) == (-0.02, 0.03)
    assert s["heads"] == {"default": 3, "pbe": 1}
    assert s["config_types"] == {"IsolatedAtom": 1, "bulk": 1}
    assert s["charges"] == {1.0: 1} and s["spins"] == {2.0: 1}
    empty = summarize([])
    assert empty["n_structures"] == 0 and np.isnan(empty["forces_rms"])
