"""Training-loop throughput (structures/s) from HDF5 with 0, 1 and 2 ``DataLoader`` workers,
against the same data held in memory (extxyz, graphs cached).

The bundled EMT crystals (``data/emt_crystals.xyz``, 420 frames of 1 to 32 atoms), repeated
``--repeat`` times, train the quickstart-sized ``equivariant`` model (lmax 1, 16 channels,
2 layers, r_max 4 Å, float32, one torch thread, batches of 256 atoms) for ``--epochs`` epochs;
each configuration runs in a fresh process. Throughput is the training structures per second
of wall time over the steps of each epoch after the first (validation excluded), median over
epochs. HDF5 reads one structure at a time and builds its neighbour list every epoch; the
in-memory set builds each graph once, before training.

    python -m benchmarks.data_loading --epochs 3 --repeat 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

RUN = """
import json, sys, time
import numpy as np
from mlip.train.config import config_from_mapping
from mlip.train.loop import train

path, out, workers, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = config_from_mapping({
    "output_dir": out, "seed": 0, "dtype": "float32", "device": "cpu", "num_threads": 1,
    "model": {"family": "equivariant", "r_max": 4.0, "num_channels": 16, "lmax": 1, "num_layers": 2},
    "data": {"train": path, "valid_fraction": 0.1, "num_workers": workers},
    "batch": {"max_atoms": 256}, "train": {"epochs": epochs, "progress": False, "log_steps": False},
})
steps = []
n_train = []

def step(state):
    steps.append((state.epoch, time.perf_counter()))
    if not n_train:
        n_train.append(len(state.data.train))

train(cfg, hooks={"step": step})
rates = []
for e in range(1, epochs):
    times = [t for ep, t in steps if ep == e]
    # n - 1 step intervals cover (n - 1) / n of the epoch's structures
    rates.append(n_train[0] * (len(times) - 1) / len(times) / (times[-1] - times[0]))
print(json.dumps({"structures_per_s": float(np.median(rates)), "per_epoch": rates, "n_train": n_train[0],
                  "steps_per_epoch": len([1 for ep, _ in steps if ep == 1])}))
"""


def measure(path: Path, out: Path, workers: int, epochs: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, str(path), str(out), str(workers), str(epochs)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the bundled crystals")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(RESULTS / "data_loading.json"))
    args = parser.parse_args(argv)
    from ase.io import read, write

    from benchmarks._common import environment, write_json
    from mlip.data.formats import iter_read, write_hdf5

    work = Path(tempfile.mkdtemp(prefix="mlip-loading-"))
    xyz, h5 = work / "crystals.xyz", work / "crystals.h5"
    write(xyz, read(ROOT / "data" / "emt_crystals.xyz", index=":") * args.repeat, format="extxyz")
    write_hdf5(iter_read(xyz), h5)
    record: dict = {"environment": environment(), "runs": []}
    cases = [("in-memory (extxyz, cached graphs)", xyz, 0)] + [(f"HDF5, {w} workers", h5, w) for w in args.workers]
    for name, path, workers in cases:
        result = measure(path, work / f"run-{len(record['runs'])}", workers, args.epochs)
        result.update(case=name, workers=workers)
        record["runs"].append(result)
        print(f"{name:36s} {result['structures_per_s']:7.1f} structures/s "
              f"(epochs 2..{args.epochs}: {', '.join(f'{r:.1f}' for r in result['per_epoch'])})", flush=True)
    write_json(args.out, record)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
