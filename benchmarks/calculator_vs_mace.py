"""What MD pays per step, side by side with MACE: each code through its own ASE calculator.

One call = move the atoms (a small seeded displacement, so nothing is cached), then energy, forces
and stress through ``MLIPCalculator`` (neighbour list rebuilt every call: skin 0) and through
mace-torch's ``MACECalculator`` (which rebuilds its list every call), float32, one torch thread,
random weights. The ``equivariant`` presets (``configs/equivariant-{small,medium}.yaml``) run against
a MACE of the same size (MACE-MP-0 medium: 128x0e+128x1o, max_ell 3, correlation 3, r_max 6 Å, 2
interactions), in worker processes that take turns call by call. Reported per structure: median
CPU time per call and the ratio mlip/MACE, and each worker's peak resident memory (a fresh pair of
workers per structure, so the peak is that structure's) with the growth over the worker's memory
before the first call, per edge::

    python -m venv venv-mace && venv-mace/bin/pip install torch==2.13.0 mace-torch==0.3.16
    python -m benchmarks.calculator_vs_mace --mace-python venv-mace/bin/python
    python -m benchmarks.calculator_vs_mace --profile Cu-1000 --preset medium   # where mlip's time goes
"""
from __future__ import annotations

import argparse
from typing import Any

try:
    from benchmarks import _common as common
    from benchmarks import speed
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]
    import speed  # type: ignore[no-redef]

DEFAULT_STRUCTURES = "Si-512,Cu-1000"


def spec(preset: str) -> dict[str, Any]:
    return {"kind": "mlip", "family": "equivariant", "preset": preset, "config": {}, "dtype": "float32"}


def profile(preset: str, structure: str, rows: int) -> None:
    """torch.profiler table of one calculator call of the preset, one thread."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(1)
    engine = speed.MlipEngine(spec(preset))
    atoms = common.make_structure(structure)
    fn = speed.calculator_call(engine, atoms)
    for _ in range(2):
        fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"# mlip equivariant {preset}, {structure}: {len(atoms)} atoms, {engine.params:,} parameters")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run_structure(preset: str, structure: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    ours = spec(preset)
    workers = speed.start_workers({"mlip": ours, "MACE": speed.mace_spec_like(ours)}, args.mace_python)
    try:
        rows = speed.compare(workers, [structure], {"task": "calculator"}, repeats=args.repeats,
                             warmup=args.warmup, budget_s=args.budget, max_call_s=1e9, max_mem_mb=1e9)
        for r in rows:
            r["preset"] = preset
            r["rss_setup_mb"] = workers[r["engine"]].info["rss_mb"]
    finally:
        for w in workers.values():
            w.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["preset"], r["engine"], r["structure"]): r for r in rows}
    out = []
    for preset, structure in dict.fromkeys((r["preset"], r["structure"]) for r in rows):
        a, b = by[(preset, "mlip", structure)], by[(preset, "MACE", structure)]
        per_edge = [1024 * (r["rss_mb"] - r["rss_setup_mb"]) / max(r["n_edges"], 1) for r in (a, b)]
        out.append([preset, structure, a["n_atoms"], a["n_edges"], f"{1e3 * a['cpu_median_s']:.0f}",
                    f"{1e3 * b['cpu_median_s']:.0f}", f"{a['cpu_median_s'] / b['cpu_median_s']:.2f}",
                    f"{a['rss_mb']:.0f} / {b['rss_mb']:.0f}", f"{a['rss_mb'] / b['rss_mb']:.2f}",
                    f"{per_edge[0]:.1f} / {per_edge[1]:.1f}", a["rounds"]])
    return common.markdown_table(
        ["preset", "structure", "atoms", "edges", "mlip CPU ms", "MACE CPU ms", "CPU ratio mlip/MACE",
         "peak RSS MiB mlip / MACE", "RSS ratio", "KiB per edge mlip / MACE", "rounds"], out)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mace-python", default=speed.MACE_PYTHON, help="python of the venv with mace-torch")
    ap.add_argument("--presets", default="medium,small")
    ap.add_argument("--structures", default=DEFAULT_STRUCTURES)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of timed rounds per structure (about)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", default=None, metavar="STRUCTURE", help="profile one mlip call instead")
    ap.add_argument("--preset", default="medium", help="with --profile: the preset")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args(argv)
    if args.profile:
        profile(args.preset, args.profile, args.profile_rows)
        return None
    env = common.environment()
    print(f"# {common.describe(env)}; float32, 1 torch thread per process", flush=True)
    rows = [r for preset in args.presets.split(",") for s in args.structures.split(",")
            for r in run_structure(preset, s, args)]
    end = common.environment()["load_average"]
    print(f"\nload average at the end {end}")
    print(table(rows), flush=True)
    result = {"env": env, "load_average_end": end, "rows": rows}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
