"""Readers: extxyz, ASE db, ASE-LMDB, MPTrj JSON -> canonical ase.Atoms (labels, units, sign)."""
from __future__ import annotations

import gzip
import json
import os

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa

from mlip.data.formats import DataError, LabelKeys, detect_format, iter_read, read
from mlip.units import KBAR_VASP_TO_EV_A3

TRICLINIC_CELL = np.array([[4.1, 0.0, 0.0], [0.7, 3.9, 0.0], [0.5, 0.9, 4.3]])


def crystal(seed: int = 0) -> Atoms:
    """Periodic triclinic 3-atom crystal with energy, forces and a symmetric stress (eV/Å³)."""
    rng = np.random.default_rng(seed)
    atoms = Atoms("MgO2", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.7, 0.1]],
                  cell=TRICLINIC_CELL, pbc=True)
    atoms.positions += rng.normal(scale=0.02, size=(3, 3))
    a = rng.normal(size=(3, 3)) * 0.01
    labels = {"energy": -12.5 + seed, "forces": rng.normal(size=(3, 3)), "stress": a + a.T}
    return atoms, labels


def molecule(seed: int = 1) -> Atoms:
    """Non-periodic water cation doublet with energy and forces, charge +1, spin multiplicity 2."""
    rng = np.random.default_rng(seed)
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    labels = {"energy": -75.0 - seed, "forces": rng.normal(size=(3, 3)), "charge": 1.0, "spin": 2.0}
    return atoms, labels


def isolated() -> Atoms:
    atoms = Atoms("H", positions=[[5.0, 5.0, 5.0]], cell=np.eye(3) * 10.0, pbc=False)
    return atoms, {"energy": -13.6}


def with_calc(atoms: Atoms, labels: dict) -> Atoms:
    """Labels the ASE way: energy/forces/stress in a SinglePointCalculator (stress Voigt)."""
    atoms = atoms.copy()
    results = {k: v for k, v in labels.items() if k in ("energy", "forces")}
    if "stress" in labels:
        results["stress"] = full_3x3_to_voigt_6_stress(labels["stress"])
    atoms.calc = SinglePointCalculator(atoms, **results)
    for k in ("charge", "spin"):
        if k in labels:
            atoms.info[k] = labels[k]
    return atoms


def with_ref_keys(atoms: Atoms, labels: dict, stress_form: str = "3x3") -> Atoms:
    """Labels under user-chosen names in info/arrays (MACE style)."""
    atoms = atoms.copy()
    atoms.info["REF_energy"] = labels["energy"]
    if "forces" in labels:
        atoms.arrays["REF_forces"] = labels["forces"]
    if "stress" in labels:
        s = labels["stress"]
        atoms.info["REF_stress"] = {"3x3": s, "9": s.reshape(9),
                                    "voigt": full_3x3_to_voigt_6_stress(s)}[stress_form]
    for k in ("charge", "spin"):
        if k in labels:
            atoms.info["total_" + k] = labels[k]
    return atoms


def assert_labels(atoms: Atoms, labels: dict) -> None:
    assert atoms.calc is None
    assert atoms.info["energy"] == pytest.approx(labels["energy"], abs=1e-12)
    if "forces" in labels:
        np.testing.assert_allclose(atoms.arrays["forces"], labels["forces"], atol=1e-7)
    else:
        assert "forces" not in atoms.arrays
    if "stress" in labels:
        assert atoms.info["stress"].shape == (3, 3)
        np.testing.assert_allclose(atoms.info["stress"], labels["stress"], atol=1e-7)
    else:
        assert "stress" not in atoms.info
    for k in ("charge", "spin"):
        if k in labels:
            assert atoms.info[k] == labels[k]
        else:
            assert k not in atoms.info


def test_extxyz_calculator_keys(tmp_path):
    frames = [crystal(0), molecule(1), isolated()]
    path = tmp_path / "data.xyz"
    ase.io.write(path, [with_calc(a, lab) for a, lab in frames], format="extxyz")
    out = read(path, required=("energy",))
    assert len(out) == 3
    for i, ((src, labels), atoms) in enumerate(zip(frames, out)):
        np.testing.assert_allclose(atoms.positions, src.positions, atol=1e-7)
        np.testing.assert_array_equal(atoms.numbers, src.numbers)
        np.testing.assert_allclose(atoms.cell[:], src.cell[:], atol=1e-7)
        np.testing.assert_array_equal(atoms.pbc, src.pbc)
        assert_labels(atoms, labels)
        assert atoms.info["source"] == f"{path} frame {i}"
    assert [a.info["isolated_atom"] for a in out] == [False, False, True]


@pytest.mark.parametrize("stress_form", ["3x3", "9", "voigt"])
def test_extxyz_user_keys_and_stress_forms(tmp_path, stress_form):
    frames = [crystal(0), crystal(3), molecule(1)]
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, [with_ref_keys(a, lab, stress_form) for a, lab in frames], format="extxyz")
    keys = LabelKeys(energy="REF_energy", forces="REF_forces", stress="REF_stress",
                     charge="total_charge", spin="total_spin")
    out = read(path, keys=keys, required=("energy", "forces"))
    for (_, labels), atoms in zip(frames, out):
        assert_labels(atoms, labels)


def test_voigt_order_is_ase():
    """Voigt (xx, yy, zz, yz, xz, xy) -> symmetric 3x3, checked element by element."""
    from mlip.data.formats.labels import convert_label

    s = convert_label("stress", [1, 2, 3, 4, 5, 6], 1, "f", 0, "stress")
    np.testing.assert_array_equal(s, [[1, 6, 5], [6, 2, 4], [5, 4, 3]])
    s9 = convert_label("stress", np.arange(9.0), 1, "f", 0, "stress")
    np.testing.assert_array_equal(s9, np.arange(9.0).reshape(3, 3))


def test_isolated_atom_detection_and_config_type(tmp_path):
    a = Atoms("Cu", cell=np.eye(3) * 20, pbc=True)           # periodic box, tagged
    a.info.update(config_type="IsolatedAtom", REF_energy=-0.5)
    b = Atoms("O", positions=[[1, 2, 3]])                    # one atom, no pbc
    b.info.update(REF_energy=-1.5, config_type="bulk")
    c = Atoms("Cu", cell=[[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]], pbc=True)  # fcc primitive
    c.info.update(REF_energy=-3.7, config_type="bulk")
    d = Atoms("H", positions=[[0, 0, 0]], cell=np.eye(3) * 12, pbc=True)
    d.info.update(REF_energy=-13.0, config_type="isolated_atom")
    path = tmp_path / "e0.xyz"
    ase.io.write(path, [a, b, c, d], format="extxyz")
    out = read(path, keys=LabelKeys(energy="REF_energy"))
    assert [x.info["isolated_atom"] for x in out] == [True, True, False, True]
    assert [x.info["config_type"] for x in out] == ["IsolatedAtom", "bulk", "bulk", "isolated_atom"]
    assert [x.info["energy"] for x in out] == [-0.5, -1.5, -3.7, -13.0]


def test_index_selection_and_streaming(tmp_path):
    frames = [with_calc(*crystal(s)) for s in range(5)]
    path = tmp_path / "five.xyz"
    ase.io.write(path, frames, format="extxyz")
    assert read(path, index=3)[0].info["energy"] == pytest.approx(-12.5 + 3)
    assert [a.info["energy"] for a in read(path, index=slice(1, 5, 2))] == \
        pytest.approx([-11.5, -9.5])
    assert read(path, index=-1)[0].info["source"] == f"{path} frame 4"
    stream = iter_read(path)
    first = next(stream)
    assert first.info["source"] == f"{path} frame 0"
    assert len(list(stream)) == 4


def test_detect_format():
    assert detect_format("a/b.extxyz") == "extxyz"
    assert detect_format("x.aselmdb") == "asedb"
    assert detect_format("MPtrj.json.gz") == "mptrj"
    assert detect_format("data.h5") == "hdf5"
    with pytest.raises(DataError, match="unknown file extension"):
        detect_format("data.cif")


def test_ase_sqlite_db(tmp_path):
    path = tmp_path / "data.db"
    (c, lc), (m, lm) = crystal(2), molecule(4)
    with ase.db.connect(path) as db:
        db.write(with_calc(c, lc), config_type="bulk")
        mol = m.copy()
        mol.calc = SinglePointCalculator(mol, forces=lm["forces"])
        db.write(mol, REF_energy=lm["energy"], data={"charge": 1.0, "spin": 2.0})
    # energy of the crystal comes from the calculator, of the molecule from key_value_pairs
    out = read(path, keys=LabelKeys(energy="REF_energy"))
    assert "energy" not in out[0].info                      # calculator 'energy' is not REF_energy
    out = read(path)
    assert_labels(out[0], lc)
    assert out[0].info["config_type"] == "bulk"
    assert "energy" not in out[1].info
    np.testing.assert_allclose(out[1].arrays["forces"], lm["forces"])
    assert out[1].info["charge"] == 1.0 and out[1].info["spin"] == 2.0
    assert [a.info["db_id"] for a in out] == [1, 2]
    assert out[1].info["source"] == f"{path} frame 1"


def test_aselmdb_omol_style(tmp_path):
    pytest.importorskip("ase_db_backends")
    path = tmp_path / "omol.aselmdb"
    frames = [molecule(1), molecule(2), crystal(5)]
    db = ase.db.connect(str(path), type="aselmdb")
    for atoms, labels in frames:
        a = atoms.copy()
        results = {"energy": labels["energy"], "forces": labels["forces"]}
        if "stress" in labels:
            results["stress"] = full_3x3_to_voigt_6_stress(labels["stress"])
        a.calc = SinglePointCalculator(a, **results)
        data = {k: labels[k] for k in ("charge", "spin") if k in labels}
        db.write(a, data=data)
    db.close()
    out = read(path, required=("energy", "forces"))
    assert len(out) == 3
    for (src, labels), atoms in zip(frames, out):
        np.testing.assert_allclose(atoms.positions, src.positions, atol=1e-12)
        assert_labels(atoms, labels)
    assert [a.info["isolated_atom"] for a in out] == [False, False, False]


# --- MPTrj ---------------------------------------------------------------------------------

def mptrj_document(kbar_stress: np.ndarray) -> tuple[dict, dict]:
    from pymatgen.core import Lattice, Structure

    structure = Structure(Lattice(TRICLINIC_CELL), ["Li", "Fe", "O"],
                          [[0, 0, 0], [0.5, 0.5, 0.5], [0.2, 0.7, 0.1]])
    forces = np.array([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5], [-0.1, -0.3, 0.2]])
    frame = {"structure": structure.as_dict(), "uncorrected_total_energy": -20.0,
             "corrected_total_energy": -21.5, "energy_per_atom": -20.0 / 3, "force": forces.tolist(),
             "stress": kbar_stress.tolist(), "magmom": [0.0, 3.5, 0.1], "bandgap": 1.0}
    molecule_free = {"structure": structure.as_dict(), "uncorrected_total_energy": -19.0,
                     "corrected_total_energy": -20.5, "force": (forces * 0).tolist(),
                     "stress": np.zeros((3, 3)).tolist(), "magmom": None}
    return {"mp-1": {"mp-1-0-0": frame, "mp-1-1-0": molecule_free}}, {"structure": structure,
                                                                      "forces": forces}


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_mptrj_units_and_sign(tmp_path, suffix):
    kbar = np.array([[10.0, 1.0, 0.0], [1.0, 10.0, 0.0], [0.0, 0.0, -4.0]])  # VASP: + = compressive
    doc, ref = mptrj_document(kbar)
    path = tmp_path / f"mptrj{suffix}"
    text = json.dumps(doc)
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    out = read(path, required=("energy", "forces", "stress"))
    assert len(out) == 2
    atoms = out[0]
    # +10 kBar compressive (VASP) is -1 GPa in ASE's tensile-positive convention
    assert atoms.info["stress"][0, 0] == pytest.approx(-10 * 0.1 * GPa, rel=1e-12)
    assert atoms.info["stress"][2, 2] == pytest.approx(+4 * 0.1 * GPa, rel=1e-12)
    assert atoms.info["stress"][0, 1] == pytest.approx(-1 * 0.1 * GPa, rel=1e-12)
    np.testing.assert_allclose(atoms.info["stress"], kbar * KBAR_VASP_TO_EV_A3, rtol=1e-12)
    assert atoms.info["energy"] == -20.0                      # uncorrected by default
    np.testing.assert_allclose(atoms.arrays["forces"], ref["forces"])
    np.testing.assert_allclose(atoms.arrays["magmom"], [0.0, 3.5, 0.1])
    assert "magmom" not in out[1].arrays
    assert (atoms.info["mp_id"], atoms.info["frame_id"]) == ("mp-1", "mp-1-0-0")
    assert out[1].info["source"] == f"{path} frame 1"
    # structure survives pymatgen -> ASE
    np.testing.assert_allclose(atoms.cell[:], ref["structure"].lattice.matrix, atol=1e-12)
    np.testing.assert_allclose(atoms.positions, ref["structure"].cart_coords, atol=1e-12)
    assert atoms.get_chemical_symbols() == ["Li", "Fe", "O"] and all(atoms.pbc)
    corrected = read(path, keys=LabelKeys(energy="corrected_total_energy"))
    assert [a.info["energy"] for a in corrected] == [-21.5, -20.5]


def _read_row(args):
    reader, i = args
    atoms = reader[i]
    return atoms.info["energy"], atoms.info["charge"], atoms.info["spin"], reader._pid


def test_aselmdb_folder_streams_row_by_row_and_workers_open_their_own_handles(tmp_path):
    """A folder of OMol25-style .aselmdb files opens as one lazy data set: rows are read on demand
    (nothing is loaded up front), charge and spin come from row.data, and DataLoader-style worker
    processes each open their own connection."""
    pytest.importorskip("ase_db_backends")
    import multiprocessing as mp
    import pickle

    from mlip.data.datasets import open_dataset
    from mlip.data.formats import AseDBReader, expand_paths

    folder = tmp_path / "omol"
    folder.mkdir()
    expected = []
    for f in range(2):
        db = ase.db.connect(str(folder / f"data{f:04d}.aselmdb"), type="aselmdb")
        for k in range(3):
            atoms, labels = molecule(10 * f + k)
            a = atoms.copy()
            a.calc = SinglePointCalculator(a, energy=labels["energy"], forces=labels["forces"])
            db.write(a, data={"charge": labels["charge"], "spin": labels["spin"]})
            expected.append((labels["energy"], labels["charge"], labels["spin"]))
        db.close()
    (folder / "notes.txt").write_text("not data")
    assert [p.rsplit("/", 1)[1] for p in expand_paths(folder)] == ["data0000.aselmdb", "data0001.aselmdb"]
    ds = open_dataset(folder, r_max=3.0)
    readers = ds.source.parts
    assert all(isinstance(r, AseDBReader) and r._n_atoms is None for r in readers)  # ids only, no row read yet
    assert len(ds) == 6 and ds.n_atoms.tolist() == [len(molecule(i)[0]) for i in (0, 1, 2, 10, 11, 12)]
    assert [(float(g.energy), float(g.charge), float(g.spin)) for g in (ds[i] for i in range(6))] == expected
    reader = readers[1]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._db is None and clone._ids is None                 # no handle, no ids travel along
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_read_row, [(reader, i) for i in range(3)])
    assert [r[:3] for r in results] == expected[3:]
    assert all(pid != os.getpid() for *_, pid in results)
