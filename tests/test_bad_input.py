"""Every bad input raises DataError naming the file, the frame index and the key."""
from __future__ import annotations

import json

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from mlip.data.formats import DataError, LabelKeys, read, write_hdf5


def frame(energy: float = -1.0, shift: float = 0.0) -> Atoms:
    a = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    a.positions += shift
    a.info["REF_energy"] = energy
    a.arrays["REF_forces"] = np.full((3, 3), 0.1)
    return a


KEYS = LabelKeys(energy="REF_energy", forces="REF_forces")


def write_xyz(path, frames) -> str:
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def expect(path, call, *needles: str) -> str:
    with pytest.raises(DataError) as info:
        call()
    msg = str(info.value)
    name = path.name if hasattr(path, "name") else str(path)
    assert name in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_extxyz_missing_line(tmp_path):
    path = tmp_path / "cut.xyz"
    write_xyz(path, [frame(), frame(-2.0), frame(-3.0)])
    lines = path.read_text().splitlines()
    del lines[5 + 3]                                  # an atom line of frame 1
    path.write_text("\n".join(lines) + "\n")
    expect(path, lambda: read(path, keys=KEYS), "frame 1", "malformed")


def test_extxyz_truncated_last_frame(tmp_path):
    path = tmp_path / "trunc.xyz"
    write_xyz(path, [frame(), frame(-2.0)])
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n")    # frame 1 loses two atoms
    expect(path, lambda: read(path, keys=KEYS), "frame 1")


def test_empty_files(tmp_path):
    for name in ("empty.xyz", "empty.json"):
        path = tmp_path / name
        path.write_text("")
        expect(path, lambda p=path: read(p), "frame 0", "empty")
    path = tmp_path / "nothing.json"
    path.write_text("{}")
    expect(path, lambda: read(path), "frame 0", "empty")
    path = tmp_path / "empty.h5"
    write_hdf5([], path)
    expect(path, lambda: read(path), "frame 0", "empty")
    path = tmp_path / "blank.xyz"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="blank.xyz"):
        read(path)


def test_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"mp-1": {"mp-1-0": {"structure": ')
    expect(path, lambda: read(path), "invalid JSON")


def test_required_label_missing_in_one_frame(tmp_path):
    a, b = frame(), frame()
    del b.info["REF_energy"]
    b.info["REF_energyy"] = -2.0
    path = write_xyz(tmp_path / "miss.xyz", [a, b, frame()])
    msg = expect(tmp_path / "miss.xyz", lambda: read(path, keys=KEYS, required=("energy",)),
                 "frame 1", "'REF_energy'", "required label 'energy'")
    assert "REF_energyy" in msg                        # keys of the frame are listed
    # not required: the frame is kept, without an energy
    out = read(path, keys=KEYS)
    assert len(out) == 3 and "energy" not in out[1].info and out[2].info["energy"] == -1.0


def test_user_key_in_no_frame_suggests_nearest(tmp_path):
    path = write_xyz(tmp_path / "typo.xyz", [frame(), frame()])
    msg = expect(tmp_path / "typo.xyz",
                 lambda: read(path, keys=LabelKeys(energy="REF_enrgy", forces="REF_forces")),
                 "frame 0-1", "'REF_enrgy'", "Did you mean 'REF_energy'?")
    assert "REF_forces" in msg                         # existing keys are listed
    msg = expect(tmp_path / "typo.xyz",
                 lambda: read(path, keys=LabelKeys(energy="REF_enrgy"), required=("energy",)),
                 "frame 0", "'REF_enrgy'", "Did you mean 'REF_energy'?")


@pytest.mark.parametrize("what,key", [("positions", "positions"), ("energy", "REF_energy"),
                                      ("forces", "REF_forces"), ("stress", "REF_stress")])
def test_non_finite_values(tmp_path, what, key):
    frames = [frame(), frame(), frame()]
    for f in frames:
        f.info["REF_stress"] = np.zeros((3, 3))
    bad = frames[2]
    if what == "positions":
        bad.positions[1, 2] = np.nan
    elif what == "energy":
        bad.info["REF_energy"] = np.inf
    elif what == "forces":
        bad.arrays["REF_forces"][0, 1] = -np.inf
    else:
        bad.info["REF_stress"] = np.array([[0, 0, 0], [0, np.nan, 0], [0, 0, 0]])
    path = write_xyz(tmp_path / "nan.xyz", frames)
    keys = LabelKeys(energy="REF_energy", forces="REF_forces", stress="REF_stress")
    expect(tmp_path / "nan.xyz", lambda: read(path, keys=keys), "frame 2", f"key '{key}'",
           "non-finite")


def test_wrong_label_shapes(tmp_path):
    a = frame()
    a.info["REF_stress"] = np.arange(4.0)
    path = write_xyz(tmp_path / "shape.xyz", [frame(), a])
    expect(tmp_path / "shape.xyz",
           lambda: read(path, keys=LabelKeys(energy="REF_energy", stress="REF_stress")),
           "frame 1", "key 'REF_stress'", "shape")
    b = frame()
    b.info["dipole"] = np.ones(3)
    path = write_xyz(tmp_path / "shape2.xyz", [b])
    expect(tmp_path / "shape2.xyz", lambda: read(path, keys=LabelKeys(forces="dipole")),
           "frame 0", "key 'dipole'", "(3, 3)")
    c = frame()
    c.info["REF_energy"] = np.ones(2)
    path = write_xyz(tmp_path / "shape3.xyz", [frame(), frame(), c])
    expect(tmp_path / "shape3.xyz", lambda: read(path, keys=KEYS), "frame 2", "key 'REF_energy'",
           "scalar")


def test_mptrj_wrong_force_shape(tmp_path):
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    good = {"structure": s.as_dict(), "uncorrected_total_energy": -5.0,
            "force": np.zeros((2, 3)).tolist(), "stress": np.zeros((3, 3)).tolist()}
    bad = dict(good, force=np.zeros((3, 3)).tolist())
    path = tmp_path / "mp.json"
    path.write_text(json.dumps({"mp-1": {"a": good, "b": good}, "mp-2": {"c": bad}}))
    expect(path, lambda: read(path), "frame 2", "key 'force'", "(2, 3)")
    nostruct = {"mp-1": {"a": good, "b": {"force": [[0, 0, 0]]}}}
    path.write_text(json.dumps(nostruct))
    expect(path, lambda: read(path), "frame 1", "key 'structure'")


def test_unknown_elements(tmp_path):
    path = tmp_path / "elem.xyz"
    write_xyz(path, [frame(), frame()])
    lines = path.read_text().splitlines()
    lines[5 + 2] = lines[5 + 2].replace("H ", "Xx", 1)   # second atom of frame 1
    path.write_text("\n".join(lines) + "\n")
    expect(path, lambda: read(path, keys=KEYS), "frame 1", "'Xx'", "unknown element")
    db_path = tmp_path / "elem.db"
    with ase.db.connect(db_path) as db:
        db.write(frame())
        db.write(Atoms(numbers=[8, 0], positions=[[0, 0, 0], [1, 0, 0]]))
    expect(db_path, lambda: read(db_path), "frame 1", "key 'numbers'", "Z=0")


def test_zero_volume_cell(tmp_path):
    a = frame()
    a.cell = [[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3.0]]
    a.pbc = True
    path = write_xyz(tmp_path / "flat.xyz", [frame(), a])
    expect(tmp_path / "flat.xyz", lambda: read(path, keys=KEYS), "frame 1", "key 'cell'",
           "zero volume")
    # the same degenerate cell without pbc is a molecule in a dummy box: fine
    a.pbc = False
    path = write_xyz(tmp_path / "ok.xyz", [a])
    assert len(read(path, keys=KEYS)) == 1


def test_overlapping_atoms(tmp_path):
    a = frame()
    a.positions[2] = a.positions[0] + [0.03, 0.04, 0.0]   # 0.05 Å apart
    path = write_xyz(tmp_path / "clash.xyz", [frame(), a])
    expect(tmp_path / "clash.xyz", lambda: read(path, keys=KEYS), "frame 1", "key 'positions'",
           "atoms 0 and 2", "0.0500")
    # across a periodic boundary: 0.02 and 4.97 in a 5 Å box are 0.05 Å apart
    b = Atoms("Cu2", positions=[[0.02, 1, 1], [4.97, 1, 1]], cell=np.eye(3) * 5, pbc=True)
    c = b.copy()
    c.pbc = False                                          # no images: 4.95 Å apart, fine
    path = write_xyz(tmp_path / "pbc.xyz", [c, b])
    expect(tmp_path / "pbc.xyz", lambda: read(path), "frame 1", "key 'positions'", "periodic")


def test_bad_frame_in_hdf5_is_reported(tmp_path):
    good = frame()
    good.info["energy"] = -1.0
    bad = good.copy()
    bad.positions[0, 0] = np.nan
    path = tmp_path / "bad.h5"
    with pytest.raises(DataError, match="frame 1"):
        write_hdf5([good, bad], path)
    assert not path.exists()
    write_hdf5([good, bad, good], path, validate=False)
    expect(path, lambda: read(path), "frame 1", "key 'positions'", "non-finite")
    path.write_bytes(b"not an hdf5 file")
    expect(path, lambda: read(path), "HDF5")


def test_calculator_label_shapes_are_checked(tmp_path):
    a = frame()
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((3, 3)))
    path = tmp_path / "ok.db"
    with ase.db.connect(path) as db:
        db.write(a, data={"charge": [1.0, 2.0]})
    expect(path, lambda: read(path), "frame 0", "key 'charge'", "scalar")


def _brute_force_pairs(atoms: Atoms, cutoff: float) -> set:
    """All (i <= j, distance) pairs closer than cutoff over image shifts -2..2 (reference)."""
    import itertools

    pos, cell, out = atoms.positions, atoms.cell[:], set()
    ranges = [range(-2, 3) if p else [0] for p in atoms.pbc]
    for s in itertools.product(*ranges):
        d = np.linalg.norm(pos[:, None, :] - (pos[None, :, :] + np.array(s) @ cell), axis=-1)
        for i, j in zip(*np.nonzero(d < cutoff)):
            if i != j or any(s):
                out.add((int(min(i, j)), int(max(i, j)), round(float(d[i, j]), 8)))
    return out


def test_close_pairs_matches_brute_force():
    """The O(N) overlap search finds exactly the brute-force pairs in triclinic, mixed-pbc cells."""
    from mlip.data.formats.labels import close_pairs

    rng = np.random.default_rng(0)
    n_pairs = 0
    for _ in range(40):
        cell = np.eye(3) * rng.uniform(2.5, 4.0, 3) + rng.normal(scale=0.8, size=(3, 3))
        n = int(rng.integers(2, 30))
        atoms = Atoms(f"H{n}", scaled_positions=rng.uniform(-0.2, 1.2, (n, 3)), cell=cell,
                      pbc=rng.random(3) < 0.7)
        i, j, d = close_pairs(atoms, 0.6)
        found = set(zip(i.tolist(), j.tolist(), np.round(d, 8).tolist()))
        assert found == _brute_force_pairs(atoms, 0.6)
        n_pairs += len(found)
    assert n_pairs > 50                                    # the comparison is not vacuous


def test_corrupt_databases(tmp_path):
    path = tmp_path / "bad.db"
    path.write_text("this is not an sqlite file, " * 40)
    expect(path, lambda: read(path), "frame 0", "malformed")
    pytest.importorskip("ase_db_backends")
    path = tmp_path / "bad.aselmdb"
    path.write_text("this is not an lmdb file, " * 40)
    expect(path, lambda: read(path), "frame 0", "malformed")
