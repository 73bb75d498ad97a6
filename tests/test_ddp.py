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
