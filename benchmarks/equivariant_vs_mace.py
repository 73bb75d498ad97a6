"""Time mlip's ``equivariant`` model against mace-torch's MACE of the same size on CPU.

Both models see the same structures and the same neighbour list (ASE, ``r_max``, built once per
structure outside the timing) and are timed on energy + forces (+ stress for crystals). Each runs
in its own worker process with one torch thread (MACE in its own virtual environment, since
mace-torch pins its own e3nn); after warm-up calls the two take turns, one call each (mlip, MACE,
mlip, MACE, ...), so a change in machine load hits both alike. Reported: median process CPU time
per call (robust to other processes sharing the cores), median wall-clock time, and their ratios::

    python -m venv ../venv-mace && ../venv-mace/bin/pip install torch==2.13.0 mace-torch
    python -m benchmarks.equivariant_vs_mace          # --mace-python ../venv-mace/bin/python is the default
    python -m benchmarks.equivariant_vs_mace --profile Si-216   # where mlip's time goes (torch.profiler)

Sizes: the defaults ``--channels 128 --lmax 3 --hidden-lmax 1 --layers 2 --correlation 3 --r-max 6``
are MACE-MP medium (and ``configs/equivariant-medium.yaml``). Structures: a 27-atom molecule (H, C, O)
and rattled diamond-cubic Si supercells (64, 216, 512, 1000 atoms). The machinery (workers, engines,
interleaving) is :mod:`benchmarks.speed`.
"""
from __future__ import annotations

import argparse

try:
    from benchmarks import _common as common
    from benchmarks import speed
except ImportError:  # run as a script: python benchmarks/equivariant_vs_mace.py
    import _common as common  # type: ignore[no-redef]
    import speed  # type: ignore[no-redef]


def mlip_spec(args: argparse.Namespace) -> dict:
    """The ``equivariant`` spec of the sizes on the command line (all other fields: defaults)."""
    cfg = {"r_max": args.r_max, "num_channels": args.channels, "lmax": args.lmax, "hidden_lmax": args.hidden_lmax,
           "num_layers": args.layers, "correlation": args.correlation, "mixing": args.mixing, "radial": args.radial,
           "avg_num_neighbors": 30.0, "kernel": "auto"}
    if args.grid_activation:
        cfg["grid_activation"] = args.grid_activation
    return {"kind": "mlip", "family": "equivariant", "preset": None, "config": cfg, "dtype": args.dtype}


def profile(args: argparse.Namespace, structure: str) -> None:
    """torch.profiler table of one mlip energy+forces(+stress) call, in this process, one thread."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(1)
    engine = speed.MlipEngine(mlip_spec(args))
    atoms = common.make_structure(structure)
    fn, n_edges = engine.static(atoms, stress=bool(atoms.pbc.any()) and not args.no_stress)
    for _ in range(2):
        fn()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=args.profile_shapes) as prof:
        fn()
    print(f"# mlip equivariant, {structure}: {len(atoms)} atoms, {n_edges} edges, {engine.params:,} parameters")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    if args.profile_shapes:  # the same ops split by input shapes: which tensors the time goes to
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_shapes_column_width=90))


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mace-python", default=speed.MACE_PYTHON, help="python of the venv with mace-torch")
    ap.add_argument("--sizes", default="64,216,512,1000", help="Si supercell atom counts (8 k^3)")
    ap.add_argument("--no-molecule", action="store_true", help="skip the 27-atom molecule")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--lmax", type=int, default=3)
    ap.add_argument("--hidden-lmax", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--correlation", type=int, default=3)
    ap.add_argument("--r-max", type=float, default=6.0)
    ap.add_argument("--mixing", default="grid", choices=["grid", "none"])
    ap.add_argument("--radial", default="spline", choices=["spline", "mlp"])
    ap.add_argument("--grid-activation", default=None, choices=["silu", "quadratic"],
                    help="MLP of the grid mixing (default: the model's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per structure (MACE needs ~3)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of one call each (fewer for slow sizes)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per structure (about)")
    ap.add_argument("--max-mem", type=float, default=10000.0,
                    help="skip sizes predicted to need more memory than this per process (MiB)")
    ap.add_argument("--no-stress", action="store_true", help="forces only, also for crystals")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", default=None, metavar="STRUCTURE",
                    help="instead of timing, profile one mlip call on this structure (e.g. Si-216)")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--profile-shapes", action="store_true", help="with --profile: also group the ops by input shape")
    args = ap.parse_args(argv)
    if args.profile:
        profile(args, args.profile)
        return None

    structures = ([] if args.no_molecule else ["molecule-27"]) + [f"Si-{n}" for n in args.sizes.split(",") if n]
    ours = mlip_spec(args)
    specs = {"mlip": ours, "MACE": speed.mace_spec_like(ours)}
    env = common.environment()
    print(f"# {common.describe(env)}; {args.dtype}, 1 torch thread per process; channels={args.channels} "
          f"lmax={args.lmax} hidden_lmax={args.hidden_lmax} layers={args.layers} correlation={args.correlation} "
          f"r_max={args.r_max} mixing={args.mixing} radial={args.radial}", flush=True)
    workers = speed.start_workers(specs, args.mace_python)
    try:
        params = {label: w.info["params"] for label, w in workers.items()}
        rows = speed.compare(workers, structures, {"task": "static", "stress": not args.no_stress},
                             repeats=args.repeats, warmup=args.warmup, budget_s=args.budget, max_call_s=1e9,
                             max_mem_mb=args.max_mem)
    finally:
        for w in workers.values():
            w.close()
    end = common.environment()["load_average"]
    by = {(r["engine"], r["structure"]): r for r in rows}
    table = []
    for s in structures:
        a, b = by[("mlip", s)], by[("MACE", s)]
        if "skipped" in a or "skipped" in b:
            table.append([s, a["n_atoms"], "—", "—", "skipped: " + a.get("skipped", b.get("skipped"))] + ["—"] * 7)
            continue
        assert a["n_edges"] == b["n_edges"], (a, b)
        table.append([s, a["n_atoms"], a["n_edges"], "yes" if a["stress"] else "no",
                      f"{1e3 * a['cpu_median_s']:.0f}", f"{1e3 * b['cpu_median_s']:.0f}",
                      f"{a['cpu_median_s'] / b['cpu_median_s']:.2f}",
                      f"{1e3 * a['wall_median_s']:.0f}", f"{1e3 * b['wall_median_s']:.0f}",
                      f"{a['wall_median_s'] / b['wall_median_s']:.2f}", a["rounds"],
                      f"{a['rss_mb']:.0f} / {b['rss_mb']:.0f}"])
    print()
    print(f"parameters: mlip {params['mlip']:,}, MACE {params['MACE']:,}; load average at the end {end}")
    print(common.markdown_table(
        ["structure", "atoms", "edges", "stress", "mlip CPU ms", "MACE CPU ms", "CPU ratio mlip/MACE",
         "mlip wall ms", "MACE wall ms", "wall ratio", "rounds", "peak RSS MiB mlip / MACE"], table), flush=True)
    result = {"env": env, "load_average_end": end, "specs": specs, "params": params, "rows": rows}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
