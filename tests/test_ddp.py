"""Data-parallel training: 2 CPU processes (gloo, launched by torchrun) follow the same loss
trajectory as 1 process with the same global batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy_models
from mlip.train.checkpoint import load_checkpoint
from mlip.train.config import config_from_mapping, save_config
from mlip.train.loop import train

HERE = Path(__file__).resolve().parent


def _config(tmp_path: Path, data: Path, name: str):
    return config_from_mapping({
        "output_dir": str(tmp_path / name),
        "dtype": "float64",
        "device": "cpu",
        "num_threads": 1,
        "model": {"family": "toy-pair", "r_max": 3.0},
        "data": {"train": str(data), "valid_fraction": 0.2},
        # 5 structures per global batch: the two ranks get unequal shares (3 and 2)
        "batch": {"max_graphs": 5, "max_atoms": None},
        "optim": {"lr": 0.05, "warmup_steps": 1},
        "train": {"epochs": 2, "progress": False, "equivariance_check": True, "equivariance_structures": 2},
    })


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    data = tmp_path / "emt.xyz"
    toy_models.write_emt_data(data, n=14, seed=3)
    single = _config(tmp_path, data, "single")
    train(single)

    multi = _config(tmp_path, data, "multi")
    cfg_path = tmp_path / "multi.yaml"
    save_config(multi, cfg_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "toy_models.py"), "train", str(cfg_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    steps_1 = [json.loads(l) for l in (Path(single.output_dir) / "steps.jsonl").read_text().splitlines()]
    steps_2 = [json.loads(l) for l in (Path(multi.output_dir) / "steps.jsonl").read_text().splitlines()]
    assert len(steps_1) == len(steps_2) >= 4
    for a, b in zip(steps_1, steps_2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9, abs=1e-12)
    # validation metrics are reduced over both ranks
    rows_1 = [json.loads(l) for l in (Path(single.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows_2 = [json.loads(l) for l in (Path(multi.output_dir) / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows_1, rows_2):
        for key in ("valid_loss", "valid_forces_mae", "valid_energy_per_atom_mae", "valid_stress_mae"):
            assert b[key] == pytest.approx(a[key], rel=1e-9)
        assert b["valid_n_structures"] == a["valid_n_structures"]
    w1 = load_checkpoint(Path(single.output_dir) / "last.pt")["model"]
    w2 = load_checkpoint(Path(multi.output_dir) / "last.pt")["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-9, atol=1e-12)
    assert (Path(multi.output_dir) / "model.pt").exists()


COUNTING_LAUNCHER = '''
"""torchrun target: ``mlip train`` with every HDF5 structure read logged as "<phase> <index>" to
<log dir>/reads-<rank>-<pid>.txt (phase: build = build_data, fit = training and validation)."""
import os
import sys

sys.path.insert(0, {tests!r})
import toy_models  # noqa: F401,E402 - registers toy-pair

from mlip.data.formats import hdf5  # noqa: E402
from mlip.train import loop  # noqa: E402

phase = ["start"]
read = hdf5.HDF5Reader.__getitem__


def counting(self, i):
    with open(os.path.join({logs!r}, f"reads-{{os.environ['RANK']}}-{{os.getpid()}}.txt"), "a") as fh:
        fh.write(f"{{phase[0]}} {{int(i) % len(self)}}\\n")
    return read(self, i)


def in_phase(name, fn):
    def run(*args, **kwargs):
        phase[0] = name
        return fn(*args, **kwargs)
    return run


hdf5.HDF5Reader.__getitem__ = counting
loop.build_data = in_phase("build", loop.build_data)
loop.fit = in_phase("fit", loop.fit)
from mlip.cli.main import main  # noqa: E402

main()
'''


@pytest.mark.slow
def test_each_rank_reads_only_its_share(tmp_path):
    """Under 2-process DDP from HDF5 with a DataLoader worker per rank: the statistics pass and the
    epoch (training and validation) split the structures between the ranks; no structure is read
    by both (a rank whose share of a small batch is empty stands in one of its own structures)."""
    import numpy as np

    from mlip.data.formats import write_hdf5

    frames = toy_models.write_emt_data(tmp_path / "emt.xyz", n=30, seed=4, isolated=False)
    write_hdf5(frames, tmp_path / "emt.h5")
    cfg = config_from_mapping({
        "output_dir": str(tmp_path / "run"), "dtype": "float64", "device": "cpu", "num_threads": 1,
        "model": {"family": "toy-pair", "r_max": 3.0},
        "data": {"train": str(tmp_path / "emt.h5"), "valid_fraction": 0.2, "num_workers": 1},
        "batch": {"max_graphs": 5, "max_atoms": None},
        "train": {"epochs": 1, "progress": False, "equivariance_check": False},
    })
    save_config(cfg, tmp_path / "cfg.yaml")
    logs = tmp_path / "reads"
    logs.mkdir()
    launcher = tmp_path / "launch.py"
    launcher.write_text(COUNTING_LAUNCHER.format(tests=str(HERE), logs=str(logs)))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
         "train", str(tmp_path / "cfg.yaml")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    reads: dict = {}  # (rank, phase) -> list of indices; pids per rank in the fit phase
    pids: dict = {0: set(), 1: set()}
    for path in logs.glob("reads-*.txt"):
        _, rank, pid = path.stem.split("-")
        for line in path.read_text().splitlines():
            phase, index = line.split()
            reads.setdefault((int(rank), phase), []).append(int(index))
            if phase == "fit":
                pids[int(rank)].add(pid)
    n_valid = 6  # round(0.2 * 30)
    for phase, expected in (("build", 30 - n_valid), ("fit", 30)):
        a, b = reads[(0, phase)], reads[(1, phase)]
        if phase == "build":
            assert len(a) == len(set(a)) and len(b) == len(set(b)), "a structure read twice for the statistics"
        assert not set(a) & set(b), f"{phase}: both ranks read {sorted(set(a) & set(b))}"
        assert len(set(a) | set(b)) == expected
        assert max(len(a), len(b)) <= 0.6 * expected  # neither rank read (nearly) everything
    # training batches came from each rank's DataLoader worker, validation from the rank itself
    assert all(len(p) == 2 for p in pids.values()), pids
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["valid_loss"])
