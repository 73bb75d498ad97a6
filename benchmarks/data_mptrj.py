"""Converting a large MPTrj-format JSON file: peak memory and frames/s of ``mlip data convert``.

Generates an MPTrj-layout file of ``--size-gb`` (realistic frame shapes: ~7 kB of JSON per frame,
as the real 11 GB / 1.58 M-frame ``MPtrj_2022.9_full.json``; see ``benchmarks/data_synthetic.py``),
then converts it to HDF5 shards once per ``--workers`` value, each conversion in a fresh process.
Reported per run: wall time, frames/s, and peak resident memory of the converting process
(``VmHWM``) and of its largest worker (``RUSAGE_CHILDREN``; a worker's figure includes the copy of
the parent present before its ``exec``, so it is an upper bound).

    python -m benchmarks.data_mptrj --size-gb 1.0 --workers 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CONVERT = """
import json, resource, sys, time
from mlip.data.formats.convert import convert
t = time.perf_counter()
summary = convert([sys.argv[1]], sys.argv[2], shard_size=int(sys.argv[3]), workers=int(sys.argv[4]))
wall = time.perf_counter() - t
with open("/proc/self/status") as fh:
    hwm = next(line for line in fh if line.startswith("VmHWM:"))
print(json.dumps({"frames": summary.n_structures, "wall_s": wall, "peak_rss_mb": int(hwm.split()[1]) / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "shards": len(summary.outputs)}))
"""


def convert_once(src: Path, out: Path, workers: int, shard_size: int) -> dict:
    """One conversion in a fresh interpreter (so its peak memory is its own)."""
    if out.exists():
        shutil.rmtree(out)
    proc = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(out), str(shard_size), str(workers)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if workers <= 1:  # no worker processes (the figure would be some library's helper process)
        result["worker_peak_rss_mb"] = None
    result["frames_per_s"] = result["frames"] / result["wall_s"]
    result["output_mb"] = sum(p.stat().st_size for p in out.glob("*.h5")) / 2**20
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of the generated JSON file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=50_000)
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(RESULTS / "data_mptrj.json"))
    args = parser.parse_args(argv)
    from benchmarks.data_synthetic import write_mptrj

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mlip-mptrj-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "mptrj.json"
        t = time.perf_counter()
        info = write_mptrj(src, target_bytes=int(args.size_gb * 1e9), seed=0)
        print(f"generated {info['bytes'] / 1e9:.2f} GB, {info['frames']} frames, {info['atoms']} atoms "
              f"({info['bytes'] / info['frames'] / 1e3:.1f} kB/frame) in {time.perf_counter() - t:.0f} s", flush=True)
        runs = []
        for workers in args.workers:
            run = convert_once(src, work / f"shards-{workers}", workers, args.shard_size)
            run["workers"] = workers
            runs.append(run)
            worker = "" if run["worker_peak_rss_mb"] is None else f" (largest worker <= {run['worker_peak_rss_mb']:.0f} MB)"
            print(f"workers {workers}: {run['frames']} frames in {run['wall_s']:.0f} s = {run['frames_per_s']:.0f} "
                  f"frames/s; peak RSS {run['peak_rss_mb']:.0f} MB{worker}; {run['shards']} shards, "
                  f"{run['output_mb']:.0f} MB", flush=True)
            shutil.rmtree(work / f"shards-{workers}")
        from benchmarks._common import environment, write_json

        record = {"file": info, "runs": runs, "environment": environment()}
        write_json(args.out, record)
        print(f"results in {args.out}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
