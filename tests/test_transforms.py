"""atoms_to_graph: labels carried through, Voigt stress, sanity errors naming the source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from mlip.data.neighbors import neighbor_list
from mlip.data.transforms import atoms_to_graph, voigt_to_matrix


def labelled_crystal() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=0)
    rng = np.random.default_rng(0)
    atoms.info.update(
        energy=-13.5,
        charge=1.0,
        spin=2.0,
        weight=0.25,
        head="pbe",
        source="train.xyz frame 7",
        stress=rng.normal(size=(3, 3)),
    )
    atoms.arrays["forces"] = rng.normal(size=(len(atoms), 3))
    return atoms


def test_labels_and_structure_carried_through():
    atoms = labelled_crystal()
    g = atoms_to_graph(atoms, r_max=4.0)
    assert g.positions.dtype == torch.float64 and g.positions.device.type == "cpu"
    assert torch.equal(g.positions, torch.tensor(atoms.positions))
    assert g.numbers.tolist() == atoms.numbers.tolist() and g.numbers.dtype == torch.long
    assert torch.equal(g.cell, torch.tensor(atoms.cell.array)) and g.pbc.tolist() == [True] * 3
    assert float(g.energy) == -13.5
    assert torch.equal(g.forces, torch.tensor(atoms.arrays["forces"]))
    assert torch.equal(g.stress, torch.tensor(atoms.info["stress"]))
    assert (float(g.charge), float(g.spin), float(g.weight), g.head) == (1.0, 2.0, 0.25, "pbe")
    ei, sh = neighbor_list(
        torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), torch.tensor(atoms.pbc), 4.0
    )
    assert torch.equal(g.edge_index, ei) and torch.equal(g.unit_shifts, sh)
    # the ASE backend builds the identical graph
    g_ase = atoms_to_graph(atoms, r_max=4.0, backend="ase")
    assert torch.equal(g_ase.edge_index, g.edge_index) and torch.equal(g_ase.unit_shifts, g.unit_shifts)
    # edges follow the convention edge_vec = pos[sender] - pos[receiver] + S @ cell, |edge_vec| < r_max
    s, r = g.edge_index
    vec = g.positions[s] - g.positions[r] + g.unit_shifts.double() @ g.cell
    assert bool((vec.norm(dim=1) < 4.0).all()) and g.n_edges > 0


def test_missing_labels_are_nan_with_defaults():
    atoms = molecule("CH4")
    g = atoms_to_graph(atoms, r_max=3.0)
    assert (
        torch.isnan(g.energy)
        and torch.isnan(g.stress).all()
        and torch.isnan(g.charge)
        and torch.isnan(g.spin)
    )
    assert g.forces.shape == (5, 3) and torch.isnan(g.forces).all()
    assert float(g.weight) == 1.0 and g.head == "default"
    assert g.cell.abs().sum() == 0 and g.pbc.tolist() == [False] * 3
    assert g.n_edges == 20 and bool((g.unit_shifts == 0).all())  # CH4 within 3 Å: all 5*4 pairs


def test_voigt_stress_is_converted_in_ase_order():
    atoms = labelled_crystal()
    full = atoms.info["stress"]
    sym = 0.5 * (full + full.T)
    voigt = full_3x3_to_voigt_6_stress(sym)  # xx yy zz yz xz xy
    atoms.info["stress"] = voigt
    g = atoms_to_graph(atoms, r_max=3.0)
    np.testing.assert_allclose(g.stress.numpy(), voigt_6_to_full_3x3_stress(voigt), rtol=0, atol=1e-15)
    np.testing.assert_allclose(g.stress.numpy(), sym, atol=1e-15)
    assert voigt_to_matrix(np.arange(1.0, 7.0))[0, 1] == 6.0  # xy is the sixth entry
    assert voigt_to_matrix(np.arange(1.0, 7.0))[1, 2] == 4.0  # yz the fourth


def test_bad_label_shapes_raise_with_source():
    atoms = labelled_crystal()
    atoms.arrays["forces"] = np.zeros((len(atoms), 3))
    atoms.info["stress"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"train\.xyz frame 7.*stress"):
        atoms_to_graph(atoms, r_max=3.0)
    atoms = labelled_crystal()
    atoms.info["energy"] = "abc"
    with pytest.raises(ValueError, match=r"train\.xyz frame 7.*energy"):
        atoms_to_graph(atoms, r_max=3.0)


def test_forces_shape_checked():
    # ASE refuses per-atom arrays of the wrong length, but a flat [n] array is accepted by it
    atoms = labelled_crystal()
    del atoms.arrays["forces"]
    atoms.arrays["forces"] = np.zeros(len(atoms))
    with pytest.raises(ValueError, match=r"train\.xyz frame 7: forces must have shape"):
        atoms_to_graph(atoms, r_max=3.0)


def test_overlapping_atoms_raise_naming_atoms_and_distance():
    atoms = labelled_crystal()
    atoms.positions[3] = atoms.positions[1] + [0.03, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"train\.xyz frame 7: atoms (1 and 3|3 and 1) are 0\.03 Å apart"):
        atoms_to_graph(atoms, r_max=4.0)
    # min_distance larger than the cutoff takes the separate search
    with pytest.raises(ValueError, match="0.03 Å apart"):
        atoms_to_graph(atoms, r_max=0.02, min_distance=0.05)
    # the check can be turned off
    assert atoms_to_graph(atoms, r_max=4.0, min_distance=0.0).n_atoms == len(atoms)


def test_overlap_with_own_periodic_image():
    atoms = Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=np.diag([0.05, 4.0, 4.0]), pbc=True)
    atoms.info["source"] = "chain.xyz frame 0"
    with pytest.raises(
        ValueError, match=r"chain\.xyz frame 0: atoms 0 and 0 \(periodic image.*0\.05 Å apart"
    ):
        atoms_to_graph(atoms, r_max=3.0)


def test_overlap_across_the_boundary():
    atoms = Atoms("H2", positions=[[0.02, 1.0, 1.0], [3.97, 1.0, 1.0]], cell=np.eye(3) * 4.0, pbc=True)
    with pytest.raises(
        ValueError, match=r"structure: atoms (0 and 1|1 and 0) \(periodic image.*0\.05 Å apart"
    ):
        atoms_to_graph(atoms, r_max=3.0)


@pytest.mark.parametrize(
    "cell,pbc",
    [
        (np.zeros((3, 3)), [True, True, True]),
        (np.array([[4.0, 0, 0], [0, 4.0, 0], [4.0, 4.0, 1e-9]]), [True, True, True]),  # coplanar
        (np.array([[4.0, 0, 0], [8.0, 0, 0], [0, 0, 0]]), [True, True, False]),  # parallel
        (np.zeros((3, 3)), [False, True, False]),
    ],
)
def test_degenerate_periodic_cell_raises(cell, pbc):
    atoms = Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.8]], cell=cell, pbc=pbc)
    atoms.info["source"] = "bad.db frame 3"
    with pytest.raises(ValueError, match=r"bad\.db frame 3: zero or near-zero cell"):
        atoms_to_graph(atoms, r_max=3.0)


def test_slab_with_zero_vacuum_vector_is_fine():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.cell[2] = 0.0
    atoms.pbc = [True, True, False]
    g = atoms_to_graph(atoms, r_max=3.0)
    assert bool((g.unit_shifts[:, 2] == 0).all()) and g.n_edges > 0
    # a NaN vacuum vector is replaced by zeros (never used, but must stay finite downstream)
    atoms.cell[2] = np.nan
    g_nan = atoms_to_graph(atoms, r_max=3.0)
    assert torch.equal(g_nan.edge_index, g.edge_index) and bool(torch.isfinite(g_nan.cell).all())


def test_nan_positions_raise_with_source():
    atoms = labelled_crystal()
    atoms.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"train\.xyz frame 7: positions contain NaN or inf \(atoms \[2\]\)"):
        atoms_to_graph(atoms, r_max=3.0)
    mol = molecule("H2O")
    mol.positions[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"structure: positions contain NaN"):
        atoms_to_graph(mol, r_max=3.0)
