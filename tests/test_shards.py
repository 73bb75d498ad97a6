"""``mlip data convert`` of many inputs into HDF5 shards: the same structures whatever the number
of workers, one data set for training, and a SIGKILLed conversion that never looks complete and
continues to the same result when rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from click.testing import CliRunner
from mlip.cli.main import main

from mlip.data.datasets import open_dataset
from mlip.data.formats import DataError, HDF5Reader, expand_paths, read
from mlip.data.formats.convert import convert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ (the synthetic-data generators) lives at the root

from benchmarks.data_synthetic import crystal_frames, write_mptrj, write_omol_folder


def content(paths: list[str]) -> list[tuple]:
    """Every structure of the HDF5 files, as comparable tuples of bytes and strings."""
    out = []
    for path in paths:
        reader = HDF5Reader(path)
        for i in range(len(reader)):
            a = reader[i]
            out.append((a.numbers.tobytes(), a.positions.tobytes(), a.cell[:].tobytes(), a.pbc.tobytes(),
                        a.arrays["forces"].tobytes(), a.info["energy"], np.asarray(a.info.get("stress")).tobytes(),
                        a.info.get("charge"), a.info.get("spin"), a.info["original_source"]))
        reader.close()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """An extxyz file, an MPTrj JSON file and a folder of two OMol25-style .aselmdb files."""
    pytest.importorskip("ase_db_backends")
    root = tmp_path_factory.mktemp("inputs")
    xyz = root / "crystals.xyz"
    ase.io.write(xyz, list(crystal_frames(9, 4, seed=1)), format="extxyz")
    write_mptrj(root / "mptrj.json", n_frames=23, seed=2)
    write_omol_folder(root / "omol", n_molecules=17, n_files=2, seed=3)
    return [str(xyz), str(root / "mptrj.json"), str(root / "omol")]


def test_shards_equal_one_file_and_do_not_depend_on_workers(tmp_path, inputs):
    seen = []
    single = convert(inputs, str(tmp_path / "all.h5"), workers=1, progress=seen.append)
    assert single.n_structures == 9 + 23 + 17 == sum(seen)  # the progress bar's count
    result = CliRunner().invoke(main, ["data", "convert", *inputs, str(tmp_path / "shards"),
                                       "--shard-size", "10", "--workers", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "wrote 49 structures" in result.output and "(5 shards)" in result.output
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [s["n_structures"] for s in manifest["shards"]] == [10, 10, 10, 10, 9]
    shards = expand_paths(tmp_path / "shards")
    assert [Path(p).name for p in shards] == [f"shard-0000{k}.h5" for k in range(5)]
    assert content(shards) == content([str(tmp_path / "all.h5")])
    # OMol25's charge and spin multiplicity survive; the sources name the input files
    omol = [a for a in read(tmp_path / "all.h5") if "omol" in a.info["original_source"]]
    assert len(omol) == 17 and all(a.info["spin"] in (1.0, 2.0, 3.0) for a in omol)
    assert {round(a.info["charge"]) for a in omol} <= {-1, 0, 1}
    assert "data0001.aselmdb frame" in omol[-1].info["original_source"]
    # HDF5 input (read in the main process) re-shards to the same structures
    again = convert([str(tmp_path / "all.h5")], str(tmp_path / "resharded"), shard_size=30)
    assert [len(HDF5Reader(p)) for p in again.outputs] == [30, 19]
    assert [c[:9] for c in content(again.outputs)] == [c[:9] for c in content(shards)]


def test_shard_folder_glob_and_list_train_as_one_data_set(tmp_path, inputs):
    convert(inputs, str(tmp_path / "shards"), shard_size=20)
    folder = open_dataset(tmp_path / "shards", r_max=3.0)
    glob = open_dataset(str(tmp_path / "shards" / "shard-*.h5"), r_max=3.0)
    listed = open_dataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.h5")), r_max=3.0)
    assert len(folder) == len(glob) == len(listed) == 49
    np.testing.assert_array_equal(folder.n_atoms, listed.n_atoms)
    assert folder[48].positions.tolist() == listed[48].positions.tolist()

    import toy_models

    from mlip.train.config import config_from_mapping
    from mlip.train.loop import train

    # the crystals (xyz and MPTrj inputs: 32 structures, random labels of one scale) train as one set
    convert(inputs[:2], str(tmp_path / "crystals"), shard_size=10)
    cfg = config_from_mapping({
        "output_dir": str(tmp_path / "run"), "dtype": "float64", "device": "cpu", "num_threads": 1,
        "model": {"family": "toy-pair", "r_max": 3.0},
        "data": {"train": [{"path": str(tmp_path / "crystals"), "head": "mp"}], "valid_fraction": 0.25},
        "batch": {"max_atoms": 200}, "train": {"epochs": 1, "progress": False},
    })
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "24 train / 8 valid structures" in log


def _convert_command(inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlip.cli.main", "data", "convert", *inputs, str(out), *extra]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` and its worker processes as soon as ``ready()`` holds."""
    start = time.time()
    while not ready():
        assert proc.poll() is None, "the conversion ended before it could be killed"
        assert time.time() - start < timeout
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkilled_conversion_never_looks_complete_and_a_rerun_finishes_it(tmp_path):
    src = tmp_path / "mptrj.json"
    write_mptrj(src, n_frames=1500, seed=5)
    reference = convert([str(src)], str(tmp_path / "reference"), shard_size=200)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_convert_command([str(src)], out, "--shard-size", "200", "--workers", "2"),
                            start_new_session=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(proc, lambda: len(list(out.glob("shard-*.h5"))) >= 2)
    assert not (out / "manifest.json").exists()
    done = json.loads((out / "progress.json").read_text())["shards"]
    assert 1 <= len(done) < 8
    with pytest.raises(DataError, match="unfinished conversion"):
        open_dataset(out, r_max=3.0)

    result = subprocess.run(_convert_command([str(src)], out, "--shard-size", "200"), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already converted by an earlier run" in result.stdout
    assert not (out / "progress.json").exists() and not list(out.glob(".*"))
    assert content(expand_paths(out)) == content(reference.outputs)
    # rerunning a finished conversion changes nothing
    again = convert([str(src)], str(out), shard_size=200)
    assert again.resumed == again.n_structures == 1500


def test_a_kill_between_a_shard_and_its_progress_record_is_finished_by_a_rerun(tmp_path, monkeypatch):
    """The one window the SIGKILL test hits only by chance: shard k is on disk, progress.json
    still lists k shards."""
    from mlip.data.formats import convert as convert_module
    src = tmp_path / "mptrj.json"
    write_mptrj(src, n_frames=50, seed=6)
    reference = convert([str(src)], str(tmp_path / "reference"), shard_size=20)
    write_json = convert_module._write_json

    def killed_after_second_shard(path, data):
        if len(data.get("shards", [])) == 2 and "signature" in data and "format" not in data:
            raise KeyboardInterrupt
        write_json(path, data)

    out = tmp_path / "killed"
    monkeypatch.setattr(convert_module, "_write_json", killed_after_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert([str(src)], str(out), shard_size=20)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("shard-*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    assert len(json.loads((out / "progress.json").read_text())["shards"]) == 1
    again = convert([str(src)], str(out), shard_size=20)
    assert again.resumed == 20 and again.n_structures == 50
    assert content(expand_paths(out)) == content(reference.outputs)


def test_a_folder_with_a_foreign_shard_and_no_progress_record_is_refused(tmp_path):
    src = tmp_path / "mptrj.json"
    write_mptrj(src, n_frames=10, seed=7)
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00000.h5").write_bytes(b"someone else's file")
    with pytest.raises(DataError, match="holds other files"):
        convert([str(src)], str(out), shard_size=5)
    assert (out / "shard-00000.h5").read_bytes() == b"someone else's file"


@pytest.mark.slow
def test_sigkilled_single_file_conversion_leaves_no_output(tmp_path):
    src = tmp_path / "mptrj.json"
    write_mptrj(src, n_frames=1500, seed=6)
    out = tmp_path / "out.h5"
    proc = subprocess.Popen(_convert_command([str(src)], out, "--chunk-size", "50"), start_new_session=True,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: any(p.stat().st_size > 200_000 for p in tmp_path.glob(".out.h5.*.tmp")))
    assert not out.exists()
    result = CliRunner().invoke(main, ["data", "convert", str(src), str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob(".out.h5.*"))  # the killed run's temporary file is cleaned up
    assert len(read(out)) == 1500


def test_changed_inputs_restart_and_foreign_folders_are_refused(tmp_path, inputs):
    out = tmp_path / "shards"
    convert(inputs[:1], str(out), shard_size=4)
    # pretend the run was interrupted after its first shard, then the input changes
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    for shard in manifest["shards"][1:]:
        (out / shard["file"]).unlink()
    (out / "progress.json").write_text(json.dumps({"signature": {"inputs": "other"}, "shards": manifest["shards"][:1],
                                                   "next": [0, 4], "n_bad": 0, "bad": []}))
    summary = convert(inputs[:2], str(out), shard_size=4)
    assert summary.resumed == 0 and summary.n_structures == 32
    with pytest.raises(DataError, match="finished conversion of other inputs"):
        convert(inputs[:1], str(out), shard_size=4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        convert(inputs[:1], str(other), shard_size=4)


def test_training_reads_an_aselmdb_folder_directly(tmp_path, inputs):
    """OMol25 layout: data.train is the folder of .aselmdb files, read row by row (also from a
    DataLoader worker), with the charge and spin of every molecule."""
    import toy_models

    from mlip.train.config import config_from_mapping
    from mlip.train.data import build_data
    from mlip.train.loop import train

    cfg = config_from_mapping({
        "output_dir": str(tmp_path / "run"), "dtype": "float64", "device": "cpu", "num_threads": 1,
        "model": {"family": "toy-pair", "r_max": 3.0},
        "data": {"train": inputs[2], "valid_fraction": 0.2, "num_workers": 1},
        "batch": {"max_atoms": 200}, "train": {"epochs": 1, "progress": False},
    })
    data = build_data(cfg, r_max=3.0)
    assert len(data.train) + len(data.valid) == 17 and data.charge_spin_heads == data.heads
    assert not data.train.dataset.cache  # streamed, not cached
    train(cfg)
    assert "14 train / 3 valid structures" in (tmp_path / "run" / "train.log").read_text()
