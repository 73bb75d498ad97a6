"""Large inputs: MPTrj JSON read as a stream gives exactly the frames ``json.load`` gave, in a
fraction of the memory; bad frames in the middle of a file stop with their id or are skipped."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from click.testing import CliRunner
from mlip.cli.main import main

from mlip.data.formats import DataError, LabelKeys, iter_read, read
from mlip.data.formats.labels import canonicalize
from mlip.data.formats.mptrj import mptrj_keys
from mlip.units import KBAR_VASP_TO_EV_A3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ (the synthetic-data generators) lives at the root

from benchmarks.data_synthetic import mptrj_frame, write_mptrj


# --- the reader before streaming, kept as the oracle ---------------------------------------------
def old_mptrj_reader(path: Path) -> list[Atoms]:
    """What ``iter_read`` returned before the stream: ``json.load`` of the whole file, pymatgen's
    ``Structure.from_dict`` + ``AseAtomsAdaptor``, the same canonical labels."""
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    out, frame = [], 0
    for mp_id, frames in data.items():
        for frame_id, entry in frames.items():
            atoms = AseAtomsAdaptor.get_atoms(Structure.from_dict(entry["structure"]))
            raw = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell[:], pbc=True)
            for name, value in entry.items():
                if name != "structure" and value is not None:
                    raw.info[name] = value
            arrays = {}
            if entry.get("magmom") is not None:
                arrays["magmom"] = np.asarray(entry["magmom"], dtype=np.float64)
            out.append(canonicalize(raw, mptrj_keys(None), path=path, frame=frame, stress_scale=KBAR_VASP_TO_EV_A3,
                                    extra_info={"mp_id": str(mp_id), "frame_id": str(frame_id)},
                                    extra_arrays=arrays))
            frame += 1
    return out


def assert_identical(a: Atoms, b: Atoms) -> None:
    """Bit-for-bit the same structure, labels and metadata."""
    np.testing.assert_array_equal(a.numbers, b.numbers)
    assert a.positions.tobytes() == b.positions.tobytes()
    assert a.cell[:].tobytes() == b.cell[:].tobytes()
    np.testing.assert_array_equal(a.pbc, b.pbc)
    assert sorted(a.info) == sorted(b.info) and sorted(a.arrays) == sorted(b.arrays)
    for key, value in b.info.items():
        assert np.asarray(a.info[key]).tobytes() == np.asarray(value).tobytes(), key
    for key, value in b.arrays.items():
        assert a.arrays[key].tobytes() == value.tobytes(), key


def special_frames() -> dict:
    """Frames the synthetic generator does not make: oxidation-state species (pymatgen's path),
    a one-atom cell, no magmom, integer and exponent-formatted numbers."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(5)
    oxide = Structure(Lattice([[4.1, 0.1, 0.0], [0.0, 4.0, 0.2], [0.3, 0.0, 4.2]]), ["Fe2+", "O2-"],
                      [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    one = mptrj_frame(rng, "mp-2", 1)
    one["magmom"] = None
    one["uncorrected_total_energy"] = -3  # an integer in the file
    one["force"] = [[0, 0, 1e-300]]
    frames = {"mp-1": {"mp-1-0": {**mptrj_frame(rng, "mp-1", 2), "structure": oxide.as_dict()}},
              "mp-2": {"mp-2-0": one, "mp-2-1": mptrj_frame(rng, "mp-2", 7)}}
    return frames


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_streamed_mptrj_equals_the_json_load_reader(tmp_path, suffix):
    plain = tmp_path / "synthetic.json"
    write_mptrj(plain, n_frames=150, seed=1)
    doc = json.loads(plain.read_text())
    doc.update(special_frames())
    text = json.dumps(doc)
    path = tmp_path / f"mptrj{suffix}"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    new, old = read(path), old_mptrj_reader(path)
    assert len(new) == len(old) == 153
    for a, b in zip(new, old):
        assert_identical(a, b)
    assert new[-1].info["frame_id"] == "mp-2-1" and new[-1].info["source"] == f"{path} frame 152"
    assert new[-2].info["energy"] == -3.0 and "magmom" not in new[-2].arrays


def _peak_rss_mb(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it sets ``result``, the peak resident memory is added.

    The peak is the process's ``VmHWM``: ``ru_maxrss`` would also count the forked copy of this
    (pytest, torch-sized) process that existed before the ``exec``.
    """
    script = textwrap.dedent(code) + textwrap.dedent("""
        import json
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM:"))
        result["peak_mb"] = int(hwm.split()[1]) / 1024  # kB
        print(json.dumps(result))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_conversion_memory_stays_far_below_the_file_size(tmp_path):
    """A 40 MB MPTrj file converts with a peak of about 12 MB above the interpreter's baseline
    (measured: +11 to +13 MB); parsing it whole with ``json.load`` (the former reader) needs several
    times the file size (measured: +210 MB)."""
    path = tmp_path / "mptrj.json"
    info = write_mptrj(path, target_bytes=40_000_000, seed=2)
    size_mb = info["bytes"] / 2**20
    baseline = """
        import resource
        from mlip.data.formats import write_hdf5, iter_read
        import pymatgen.core, h5py, scipy.spatial
        with open("/proc/self/statm") as fh:  # resident pages now (the peak so far may be higher)
            base = int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    """
    streamed = _peak_rss_mb(baseline + f"""
        n = write_hdf5(iter_read({str(path)!r}), {str(tmp_path / 'out.h5')!r})
        result = {{"n": n, "base_mb": base}}
    """)
    loaded = _peak_rss_mb(baseline + f"""
        import json
        with open({str(path)!r}) as fh:
            data = json.load(fh)
        result = {{"n": sum(len(v) for v in data.values()), "base_mb": base}}
    """)
    assert streamed["n"] == loaded["n"] == info["frames"]
    grown_streamed = streamed["peak_mb"] - streamed["base_mb"]
    grown_loaded = loaded["peak_mb"] - loaded["base_mb"]
    print(f"file {size_mb:.1f} MB: streamed +{grown_streamed:.1f} MB, json.load +{grown_loaded:.1f} MB")
    assert grown_streamed < 0.5 * size_mb  # a constant: lazily loaded code, one HDF5 write buffer
    assert grown_loaded > 2.0 * size_mb


# --- bad frames in the middle of a file ---------------------------------------------------------
def mptrj_with_bad_frames(path: Path) -> None:
    """20 good frames and, in the middle, a frame with a NaN force, one without forces and one
    whose structure is malformed (mp-bad/nan, mp-bad/noforce, mp-bad/broken)."""
    rng = np.random.default_rng(3)
    doc = {f"mp-{i}": {f"mp-{i}-0": mptrj_frame(rng, f"mp-{i}", 3 + i % 4)} for i in range(10)}
    nan = mptrj_frame(rng, "mp-bad", 4)
    nan["force"][2][1] = float("nan")
    noforce = mptrj_frame(rng, "mp-bad", 4)
    del noforce["force"]
    broken = mptrj_frame(rng, "mp-bad", 4)
    broken["structure"]["sites"][1]["abc"] = [0.1, 0.2]
    doc["mp-bad"] = {"nan": nan, "noforce": noforce, "broken": broken}
    doc.update({f"mp-{i}": {f"mp-{i}-0": mptrj_frame(rng, f"mp-{i}", 3)} for i in range(10, 20)})
    path.write_text(json.dumps(doc, allow_nan=True))


def test_bad_mptrj_frame_names_file_frame_and_id(tmp_path):
    path = tmp_path / "bad.json"
    mptrj_with_bad_frames(path)
    with pytest.raises(DataError) as info:
        read(path, required=("energy", "forces"))
    msg = str(info.value)
    assert str(path) in msg and "frame 10 (mp-bad/nan)" in msg and "'force'" in msg and "nan" in msg.lower()
    skipped: list[DataError] = []
    frames = list(iter_read(path, required=("energy", "forces"), on_bad=skipped.append))
    assert len(frames) == 20 and [f.info["mp_id"] for f in frames] == [f"mp-{i}" for i in range(20)]
    assert len(skipped) == 3
    assert "frame 11 (mp-bad/noforce)" in str(skipped[1]) and "required label 'forces'" in str(skipped[1])
    assert "frame 12 (mp-bad/broken)" in str(skipped[2]) and "'structure'" in str(skipped[2])
    # frame indices stay those of the file
    assert frames[10].info["source"] == f"{path} frame 13"


def test_broken_json_syntax_stops_even_when_skipping(tmp_path):
    path = tmp_path / "cut.json"
    write_mptrj(path, n_frames=5, seed=4)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match="invalid JSON after frame") as info:
        list(iter_read(path, on_bad=lambda err: None))
    assert str(path) in str(info.value)


def test_bad_extxyz_and_aselmdb_frames_are_named_and_skippable(tmp_path):
    pytest.importorskip("ase_db_backends")
    rng = np.random.default_rng(0)
    frames = []
    for i in range(6):
        a = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
        a.calc = SinglePointCalculator(a, energy=-float(i), forces=rng.normal(size=(3, 3)))
        frames.append(a)
    xyz = tmp_path / "mid.xyz"
    ase.io.write(xyz, frames, format="extxyz")
    lines = xyz.read_text().splitlines()
    lines[5 * 3 + 2] = "O 0.0 zero 0.0 0.1 0.1 0.1"  # frame 3: an atom line that does not parse
    xyz.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="frame 3") as info:
        read(xyz)
    assert str(xyz) in str(info.value)
    skipped: list[DataError] = []
    assert [a.info["energy"] for a in iter_read(xyz, on_bad=skipped.append)] == [0, -1, -2, -4, -5]
    assert len(skipped) == 1

    db_path = tmp_path / "omol.aselmdb"
    db = ase.db.connect(str(db_path), type="aselmdb")
    for i, a in enumerate(frames):
        a = a.copy()
        forces = frames[i].calc.results["forces"].copy()
        if i == 4:
            forces[1, 2] = np.nan
        a.calc = SinglePointCalculator(a, energy=-float(i), forces=forces)
        db.write(a, data={"charge": 0, "spin": 1})
    db.close()
    with pytest.raises(DataError) as info:
        read(db_path)
    assert "frame 4 (row 5)" in str(info.value) and "non-finite force on atom 1" in str(info.value)
    skipped = []
    assert len(list(iter_read(db_path, on_bad=skipped.append))) == 5 and len(skipped) == 1


def test_convert_skip_bad_counts_and_stop_leaves_no_output(tmp_path):
    path = tmp_path / "bad.json"
    mptrj_with_bad_frames(path)
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(main, ["data", "convert", str(path), str(out), "--require", "energy,forces"])
    assert result.exit_code != 0 and "mp-bad/nan" in result.output and str(path) in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))
    result = CliRunner().invoke(main, ["data", "convert", str(path), str(out), "--require", "energy,forces",
                                       "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "wrote 20 structures" in result.output and "skipped 3 bad frames" in result.output
    assert "mp-bad/noforce" in result.output
    assert len(read(out)) == 20
    # a shard folder stopped by a bad frame has no manifest, so it does not read as a data set
    shards = tmp_path / "shards"
    result = CliRunner().invoke(main, ["data", "convert", str(path), str(shards), "--shard-size", "4",
                                       "--require", "energy,forces"])
    assert result.exit_code != 0 and "mp-bad/nan" in result.output
    assert not (shards / "manifest.json").exists() and len(list(shards.glob("shard-*.h5"))) == 2
    from mlip.data.datasets import open_dataset

    with pytest.raises(DataError, match="unfinished conversion"):
        open_dataset(shards, r_max=3.0)
    # rerun with --skip-bad continues after the two shards already written
    result = CliRunner().invoke(main, ["data", "convert", str(path), str(shards), "--shard-size", "4",
                                       "--require", "energy,forces", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "8 structures were already converted" in result.output and "skipped 3 bad frames" in result.output
    assert len(open_dataset(shards, r_max=3.0)) == 20
    assert json.loads((shards / "manifest.json").read_text())["n_bad"] == 3


def test_label_keys_still_apply_to_mptrj(tmp_path):
    path = tmp_path / "m.json"
    write_mptrj(path, n_frames=4, seed=7)
    doc = json.loads(path.read_text())
    corrected = [f["corrected_total_energy"] for frames in doc.values() for f in frames.values()]
    assert [a.info["energy"] for a in read(path, keys=LabelKeys(energy="corrected_total_energy"))] == corrected
