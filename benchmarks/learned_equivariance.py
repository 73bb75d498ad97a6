"""The ``learned-equivariance`` family: speed against the ``equivariant`` family. Prints a Markdown
table and writes JSON to ``--out``::

    python benchmarks/learned_equivariance.py speed                # energy + forces, molecule and Cu crystals

*speed*: the ``small`` presets (``configs/<family>-small.yaml``, elements H C O Cu), ``--dtype``,
eval mode; energy + forces through :func:`mlip.models.outputs.predict`, median of ``--repeats``
calls after one warm-up, neighbour list built once outside the timing; both wall-clock and process
CPU time are recorded (on a shared machine compare CPU time, with ``--threads 1``). Structures: a 27-atom
molecule (H, C, O) and rattled fcc Cu supercells of 64, 128, 256 and 512 atoms. Reported as µs per
atom per energy+forces call.

Accuracy and rotation error, against the rotation-augmentation baseline (``symmetry_mode: augment``)
and every other model at equal CPU budget, are part of ``python -m benchmarks accuracy``
(:mod:`benchmarks.accuracy`, models ``learned-equivariance`` and ``learned-equivariance-augment``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = [1, 6, 8, 29]


def _preset(family: str, size: str = "small") -> dict:
    with open(ROOT / "configs" / f"{family}-{size}.yaml") as fh:
        section = dict(yaml.safe_load(fh)["model"])
    section.pop("family")
    return section


def _structures() -> dict:
    import ase
    import ase.build

    rng = np.random.default_rng(0)
    mol = ase.Atoms("C8O3H16", positions=rng.uniform(0, 7.0, size=(27, 3)))  # a dense random cluster
    while True:  # keep atoms at least 1 Å apart (the graph builder refuses near-overlaps)
        d = np.linalg.norm(mol.positions[:, None] - mol.positions[None], axis=-1) + 10 * np.eye(27)
        i = int(np.argmin(d.min(1)))
        if d.min() > 1.0:
            break
        mol.positions[i] = rng.uniform(0, 7.0, size=3)
    out = {"molecule (27 atoms)": mol}
    unit = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    for reps in ((2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8)):
        atoms = unit.repeat(reps)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out[f"Cu fcc ({len(atoms)} atoms)"] = atoms
    return out


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of ``fn()`` (CPU time is what to compare on
    a shared machine: it does not count time spent waiting for a core)."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def speed(args: argparse.Namespace) -> dict:
    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph
    from mlip.dtypes import resolve_dtype
    from mlip.models.base import build_model
    from mlip.models.outputs import predict

    dtype = resolve_dtype(args.dtype)
    rows = []
    for family in ("learned-equivariance", "equivariant"):
        cfg = {**_preset(family), "elements": ELEMENTS}
        model = build_model(family, cfg).to(dtype).eval()
        for name, atoms in _structures().items():
            batch = collate([atoms_to_graph(atoms, float(cfg["r_max"]))]).to(dtype=dtype)
            wall, cpu = _time(lambda: predict(model, batch, forces=True), args.repeats)
            rows.append({"family": family, "structure": name, "n_atoms": batch.n_atoms, "n_edges": batch.n_edges,
                         "wall_seconds": wall, "cpu_seconds": cpu, "cpu_us_per_atom": 1e6 * cpu / batch.n_atoms,
                         "wall_us_per_atom": 1e6 * wall / batch.n_atoms})
            print(f"{family:22s} {name:22s} cpu {1e6 * cpu / batch.n_atoms:9.1f} µs/atom, wall {1e6 * wall / batch.n_atoms:9.1f}",
                  flush=True)
    print("\n| structure | edges | learned-equivariance CPU µs/atom | equivariant CPU µs/atom | speed-up |")
    print("|---|---|---|---|---|")
    for name in _structures():
        a = next(r for r in rows if r["family"] == "learned-equivariance" and r["structure"] == name)
        b = next(r for r in rows if r["family"] == "equivariant" and r["structure"] == name)
        print(f"| {name} | {a['n_edges']} | {a['cpu_us_per_atom']:.0f} | {b['cpu_us_per_atom']:.0f} | "
              f"{b['cpu_seconds'] / a['cpu_seconds']:.2f}x |")
    return {"rows": rows, "dtype": args.dtype, "repeats": args.repeats}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["speed"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/learned_equivariance.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "command": " ".join(["python", "benchmarks/learned_equivariance.py"] + (argv or sys.argv[1:]))}
    result = {"meta": meta}
    result["speed"] = speed(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
