"""Smoke runs of the benchmark scripts (``python -m benchmarks <part> --smoke``): the same code path at
tiny sizes in seconds, so a change to the library or to the shared benchmark machinery that breaks a
benchmark shows up here. They assert what was run and that the figures are finite and positive; they
never judge a timing. (The GPU check's smoke run is tested in ``test_gpu_check.py``.)"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ lives at the root

from benchmarks.speed import MACE_PYTHON


def test_train_vs_mace_smoke_times_both_data_shapes(tmp_path):
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "benchmarks", "train_vs_mace", "--smoke", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "structures/s mlip / MACE" in res.stdout  # the table is printed
    result = json.loads(out.read_text())
    assert result["smoke"] and result["env"]["load_average"]
    engines = {"mlip", "MACE"} if Path(MACE_PYTHON).exists() else {"mlip"}  # MACE runs where its venv is
    rows = {(r["engine"], r["structure"]): r for r in result["rows"]}
    assert set(rows) == {(e, s) for e in engines for s in ("molecules 2x ethanol", "crystals 1x Si-8")}
    for (engine, structure), r in rows.items():
        assert r["stress"] == structure.startswith("crystals"), r  # stress in the loss for the periodic batch only
        assert r["structures"] == (2 if structure.startswith("molecules") else 1) and r["batches"] == 2
        assert all(math.isfinite(t) and t > 0 for t in r["cpu_s"] + r["wall_s"]), r
        assert r["n_atoms"] > 0 and r["n_edges"] > 0
        if engine == "MACE":  # the same structures, each code's own neighbour list: the same edges
            assert r["n_edges"] == rows[("mlip", structure)]["n_edges"]


def test_accuracy_mean_of_repeated_runs(tmp_path):
    """``accuracy --mean-of``: per model and test file the mean over the folders' runs, its range and
    count, and the ratio of the means to MACE's."""
    from benchmarks.accuracy import mean_table

    def write(folder: Path, name: str, forces_mae: float) -> None:
        folder.mkdir(exist_ok=True)
        run = {"tests": {"MD": {"forces_mae": forces_mae, "energy_mae": 0.01}, "dimers": {"energy_mae": 2.0}}}
        (folder / f"accuracy-{name}.json").write_text(json.dumps(run))

    write(tmp_path / "a", "equivariant", 0.030)
    write(tmp_path / "b", "equivariant", 0.036)
    write(tmp_path / "a", "mace", 0.040)
    table = mean_table([tmp_path / "a", tmp_path / "b"], "rmd17", "forces_mae", "F MAE (meV/Å)")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert rows == {"equivariant": "33.0 (30-36, 2) 0.82×MACE", "mace": "40.0 (40-40, 1)"}
    assert "dimers" not in table.splitlines()[0]  # no force error there
    energy = mean_table([tmp_path / "a", tmp_path / "b"], "rmd17", "energy_mae", "E MAE (meV)")
    assert energy.splitlines()[0].endswith("| MD | dimers |")
