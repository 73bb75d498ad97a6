"""Reading an OMol25-layout folder of ``.aselmdb`` files: throughput without loading it into memory.

Generates ``--molecules`` molecules (3 to 60 atoms, energy and forces in the row's calculator
results, ``charge`` and ``spin`` in ``row.data``, as fairchem stores OMol25) in ``--files``
``.aselmdb`` files, then measures, each in a fresh process:

* ``sequential``: ``iter_read`` over every file (parse, label, check), molecules/s and atoms/s;
* ``random``: ``open_dataset(folder)[i]`` (what training does: read a row, check it, build the
  neighbour graph) for ``--random`` random indices, structures/s;
* ``convert``: ``mlip data convert folder/ shards/ --shard-size`` with ``--workers`` processes.

Peak resident memory (``VmHWM``, which includes the LMDB files' memory-mapped pages that were
read: file-backed page cache the kernel can drop) and the process's own memory at the end
(``RssAnon``) are reported next to the folder's size. ``--reuse`` measures again on the
molecules a previous run left in ``--dir``.

    python -m benchmarks.data_omol --molecules 100000 --files 8 --workers 1 2
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

# VmHWM counts the LMDB files' memory-mapped pages that were read (file-backed, evictable page
# cache); RssAnon is the process's own memory (heap, arrays) at the end
PEAK = """
with open("/proc/self/status") as fh:
    status = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in fh if l.startswith(("VmHWM:", "RssAnon:"))}
result["peak_rss_mb"], result["anon_rss_mb"] = status["VmHWM"], status["RssAnon"]
print(json.dumps(result))
"""

SEQUENTIAL = """
import json, sys, time
from mlip.data.formats import expand_paths, iter_read
t = time.perf_counter()
n = atoms = 0
charges = set()
for path in expand_paths(sys.argv[1]):
    for a in iter_read(path, required=("energy", "forces", "charge", "spin")):
        n += 1
        atoms += len(a)
        charges.add(a.info["charge"])
result = {"structures": n, "atoms": atoms, "wall_s": time.perf_counter() - t, "charges": sorted(charges)}
""" + PEAK

RANDOM = """
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from mlip.data.datasets import open_dataset
t = time.perf_counter()
ds = open_dataset(sys.argv[1], r_max=5.0)
n_total = len(ds)
opened = time.perf_counter() - t
t = time.perf_counter()
n_atoms_total = int(ds.n_atoms.sum())  # the one pass over the rows that batching needs
counted = time.perf_counter() - t
idx = np.random.default_rng(0).choice(n_total, size=int(sys.argv[2]), replace=False)
t = time.perf_counter()
atoms = sum(ds[int(i)].n_atoms for i in idx)
result = {"structures": len(idx), "atoms": int(atoms), "wall_s": time.perf_counter() - t, "open_s": opened,
          "n_total": n_total, "n_atoms_pass_s": counted, "n_atoms_total": n_atoms_total}
""" + PEAK

CONVERT = """
import json, sys, time
from mlip.data.formats.convert import convert
t = time.perf_counter()
s = convert([sys.argv[1]], sys.argv[2], shard_size=50000, workers=int(sys.argv[3]), required=("energy", "forces"))
result = {"structures": s.n_structures, "wall_s": time.perf_counter() - t}
""" + PEAK


def run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["structures_per_s"] = result["structures"] / result["wall_s"]
    return result


def _memory(result: dict) -> str:
    return (f"peak RSS {result['peak_rss_mb']:.0f} MB (with mapped LMDB pages), own memory at the end "
            f"{result['anon_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--random", type=int, default=5000, help="random reads through open_dataset")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--reuse", action="store_true", help="reuse the molecules generated in --dir before")
    parser.add_argument("--out", default=str(RESULTS / "data_omol.json"))
    args = parser.parse_args(argv)
    from benchmarks._common import environment, write_json
    from benchmarks.data_synthetic import write_omol_folder

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mlip-omol-"))
    try:
        folder = work / "omol"
        info_path = work / "omol.json"
        if args.reuse and info_path.exists():
            info = json.loads(info_path.read_text())
        else:
            shutil.rmtree(folder, ignore_errors=True)
            t = time.perf_counter()
            info = write_omol_folder(folder, args.molecules, n_files=args.files, seed=0)
            info_path.write_text(json.dumps(info))
            print(f"generated {info['molecules']} molecules, {info['atoms']} atoms in {args.files} files, "
                  f"{info['bytes'] / 2**20:.0f} MB, in {time.perf_counter() - t:.0f} s", flush=True)
        record = {"folder": {k: v for k, v in info.items() if k != "files"}, "environment": environment()}
        record["sequential"] = seq = run(SEQUENTIAL, str(folder))
        print(f"sequential iter_read: {seq['structures_per_s']:.0f} molecules/s "
              f"({seq['atoms'] / seq['wall_s']:.0f} atoms/s), {_memory(seq)}", flush=True)
        record["random"] = rnd = run(RANDOM, str(folder), str(args.random))
        print(f"random open_dataset reads + graphs: {rnd['structures_per_s']:.0f} structures/s "
              f"(opening {rnd['n_total']} rows: {rnd['open_s']:.1f} s, atom counts of all rows: "
              f"{rnd['n_atoms_pass_s']:.1f} s), {_memory(rnd)}", flush=True)
        record["convert"] = []
        for workers in args.workers:
            out = work / f"shards-{workers}"
            conv = run(CONVERT, str(folder), str(out), str(workers))
            conv["workers"] = workers
            record["convert"].append(conv)
            print(f"convert, {workers} workers: {conv['structures_per_s']:.0f} molecules/s, {_memory(conv)}",
                  flush=True)
            shutil.rmtree(out)
        write_json(args.out, record)
        print(f"results in {args.out}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
