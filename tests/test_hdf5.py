"""mlip HDF5: round trip, streaming chunked write, atomic rename, lazy picklable reader."""
from __future__ import annotations

import os
import pickle

import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms

from mlip.data.formats import DataError, HDF5Reader, LabelKeys, iter_read, read, write_hdf5


def make_frames(n: int, seed: int = 0) -> list[Atoms]:
    """Mixed canonical frames: triclinic crystals with stress, charged molecules, isolated atoms."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            cell = np.array([[3.9, 0.0, 0.0], [0.6, 4.2, 0.0], [0.4, 0.8, 4.0]])
            a = Atoms("NaCl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=cell, pbc=True)
            a.positions += rng.normal(scale=0.05, size=(2, 3))
            s = rng.normal(size=(3, 3)) * 1e-3
            a.info["stress"] = s + s.T
            a.info["head"] = "pbe"
            a.info["weight"] = 2.0
            a.info["config_type"] = "bulk"
        elif kind == 1:
            a = Atoms("CH4", positions=rng.normal(scale=0.2, size=(5, 3)) + np.arange(5)[:, None] * 1.1)
            a.info["charge"] = -1.0
            a.info["spin"] = 2.0
            a.info["head"] = "wb97"
        else:
            a = Atoms("O", positions=[[0.0, 0.0, 0.0]])
            a.info["config_type"] = "IsolatedAtom"
        a.info["energy"] = float(rng.normal()) - 10.0 * len(a)
        if kind != 2:
            a.arrays["forces"] = rng.normal(size=(len(a), 3))
        a.info["source"] = f"made frame {i}"
        frames.append(a)
    return frames


def assert_same(out: Atoms, src: Atoms) -> None:
    np.testing.assert_array_equal(out.numbers, src.numbers)
    np.testing.assert_array_equal(out.positions, src.positions)
    np.testing.assert_array_equal(out.cell[:], src.cell[:])
    np.testing.assert_array_equal(out.pbc, src.pbc)
    for key in ("energy", "stress", "charge", "spin", "weight", "head", "config_type"):
        assert (key in out.info) == (key in src.info), key
        if key in src.info:
            np.testing.assert_array_equal(out.info[key], src.info[key])
    assert ("forces" in out.arrays) == ("forces" in src.arrays)
    if "forces" in src.arrays:
        np.testing.assert_array_equal(out.arrays["forces"], src.arrays["forces"])


def test_round_trip_from_extxyz(tmp_path):
    src = make_frames(6)
    xyz = tmp_path / "src.xyz"
    ase.io.write(xyz, src, format="extxyz")
    frames = read(xyz)
    h5 = tmp_path / "packed.h5"
    assert write_hdf5(iter_read(xyz), h5, chunk_size=4) == 6
    out = read(h5)
    assert len(out) == 6
    for i, (a, b) in enumerate(zip(out, frames)):
        assert_same(a, b)
        assert a.info["source"] == f"{h5} frame {i}"
        assert a.info["original_source"] == f"{xyz} frame {i}"
        assert a.info["isolated_atom"] == b.info["isolated_atom"]
    assert [a.info["isolated_atom"] for a in out] == [False, False, True] * 2
    # missing labels are stored as NaN / empty strings
    with h5py.File(h5, "r") as f:
        assert np.all(np.isnan(f["stress"][1])) and np.all(np.isnan(f["stress"][2]))
        assert np.isnan(f["charge"][0]) and f["charge"][1] == -1.0
        assert np.all(np.isnan(f["forces"][f["offsets"][2]:f["offsets"][3]]))
        assert f["head"][2] == b"" and f["head"][0] == b"pbe"
        np.testing.assert_array_equal(f["offsets"][:], np.cumsum([0] + [len(a) for a in src]))


def test_streaming_write_generator_many_chunks(tmp_path):
    src = make_frames(23, seed=1)
    consumed = []

    def generate():
        for a in src:
            consumed.append(1)
            yield a

    h5 = tmp_path / "stream.hdf5"
    n = write_hdf5(generate(), h5, chunk_size=5)
    assert n == 23 and len(consumed) == 23
    with h5py.File(h5, "r") as f:
        assert f["positions"].maxshape == (None, 3) and f["positions"].chunks is not None
        assert f["energy"].chunks == (5,)
        assert f.attrs["n_structures"] == 23
    reader = HDF5Reader(h5)
    assert len(reader) == 23
    np.testing.assert_array_equal(reader.n_atoms, [len(a) for a in src])
    for i in (0, 4, 5, 11, 22, -1):
        assert_same(reader[i], src[i])
    with pytest.raises(IndexError):
        reader[23]
    reader.close()
    assert [a.info["energy"] for a in iter_read(h5, index=slice(20, None))] == \
        [a.info["energy"] for a in src[20:]]
    assert read(h5, index=7)[0].info["energy"] == src[7].info["energy"]


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    h5 = tmp_path / "data.h5"
    write_hdf5(make_frames(3), h5)
    before = h5.read_bytes()

    def broken():
        yield from make_frames(7)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_hdf5(broken(), h5, chunk_size=2)
    assert h5.read_bytes() == before                 # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["data.h5"]  # and no temp file is left
    write_hdf5(make_frames(4), h5, chunk_size=2)     # a successful write replaces it
    assert len(HDF5Reader(h5)) == 4


def test_reader_pickles_and_opens_lazily(tmp_path):
    src = make_frames(5, seed=2)
    h5 = tmp_path / "p.h5"
    write_hdf5(src, h5, chunk_size=2)
    reader = HDF5Reader(h5)
    assert reader._file is None                      # nothing opened yet
    assert_same(reader[3], src[3])
    assert reader._file is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._file is None
    assert_same(clone[1], src[1])
    assert len(clone) == 5
    reader.close()
    clone.close()
    assert_same(reader[4], src[4])                   # reopens after close


def test_required_label_missing_in_hdf5(tmp_path):
    h5 = tmp_path / "r.h5"
    write_hdf5(make_frames(3), h5)
    with pytest.raises(DataError) as info:
        read(h5, required=("forces",))
    msg = str(info.value)
    assert "r.h5" in msg and "frame 2" in msg and "forces" in msg
    with pytest.raises(DataError, match="frame 2"):
        read(h5, required=("forces",), index=2)
    assert len(read(h5, required=("energy",), keys=LabelKeys())) == 3


def _energy_of(args):
    reader, i = args
    return reader[i].info["energy"], reader._pid


def test_reader_in_forked_workers(tmp_path):
    """A reader opened in the parent is reopened in each worker process (no shared handle)."""
    import multiprocessing as mp

    src = make_frames(6, seed=3)
    h5 = tmp_path / "w.h5"
    write_hdf5(src, h5)
    reader = HDF5Reader(h5)
    reader[0]                                         # parent holds an open handle
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_energy_of, [(reader, i) for i in range(6)])
    assert [e for e, _ in results] == [a.info["energy"] for a in src]
    assert all(pid != os.getpid() for _, pid in results)
    reader.close()
