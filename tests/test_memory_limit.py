"""Training from HDF5 on a data set larger than the memory the process may use: under an address-
space limit (``RLIMIT_AS``) of 40 MB above what the training process needs anyway, an epoch over a
73 MB data set completes with flat memory, and the same run with every graph kept in memory
(``data.cache_graphs: true``, what an in-memory data set does) fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlip.data.formats import write_hdf5

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ (the synthetic-data generators) lives at the root

from benchmarks.data_synthetic import crystal_frames

HEADROOM_MB = 40

SCRIPT = '''
import json, resource, sys, time
sys.path.insert(0, {tests!r})
import toy_models  # noqa: F401 - registers toy-pair
from mlip.train.config import config_from_mapping
from mlip.train.loop import train


def status(key):
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key + ":")).split()[1]) / 1024  # MB


def config(path, out):
    return config_from_mapping({{
        "output_dir": out, "dtype": "float64", "device": "cpu", "num_threads": 1,
        "model": {{"family": "toy-pair", "r_max": 3.0}},
        "data": {{"train": path, "valid_fraction": 0.05, "cache_graphs": {cache!r}}},
        "batch": {{"max_atoms": 5000}}, "optim": {{"ema_decay": None}},
        "train": {{"epochs": 1, "progress": False, "log_steps": False}},
    }})


# a small run first loads every library, thread and buffer the loop uses; the limit is then
# set {headroom} MB above the address space in use, less than the data set's size on disk
train(config({small!r}, {out!r} + "-warmup"))
limit = int((status("VmSize") + {headroom}) * 2**20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rss = []
try:
    train(config({big!r}, {out!r}), hooks={{"step": lambda state: rss.append(status("VmRSS"))}})
    error = None
except (MemoryError, RuntimeError) as err:  # torch's allocator raises RuntimeError
    error = repr(err)[:300]
print(json.dumps({{"error": error, "rss": rss}}))
'''


def _run(tmp_path: Path, small: Path, big: Path, cache: bool) -> dict:
    script = SCRIPT.format(tests=str(HERE), small=str(small), big=str(big), out=str(tmp_path / f"run-{cache}"),
                           cache=cache, headroom=HEADROOM_MB)
    # few malloc arenas: each one reserves 64 MB of address space
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_epoch_on_data_larger_than_the_memory_limit(tmp_path):
    small, big = tmp_path / "small.h5", tmp_path / "big.h5"
    write_hdf5(crystal_frames(40, 500, seed=1, spacing=3.5), small, validate=False)
    write_hdf5(crystal_frames(3000, 500, seed=2, spacing=3.5), big, validate=False)
    size_mb = big.stat().st_size / 2**20
    assert size_mb > 1.5 * HEADROOM_MB

    streamed = _run(tmp_path, small, big, cache=False)
    assert streamed["error"] is None
    rss = streamed["rss"]
    assert len(rss) > 250  # every step of the epoch ran under the limit
    settled = rss[len(rss) // 10]
    # flat: after the first tenth of the epoch resident memory grows by less than a tenth of the data
    assert max(rss[len(rss) // 10:]) - settled < 0.1 * size_mb, (settled, max(rss))

    cached = _run(tmp_path, small, big, cache=True)
    assert cached["error"] is not None and ("MemoryError" in cached["error"] or "allocate" in cached["error"])
