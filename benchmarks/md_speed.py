"""MD speed through the ASE calculator: steps/s and atoms*steps/s for fcc Cu crystals.

Velocity-Verlet NVE (2 fs, from 300 K) of ``MLIPCalculator`` with a full neighbour rebuild every
step (``skin=0``) and with skin reuse (``--skin``: rebuild only when an atom moved more than about
skin/2), next to MACE's ``MACECalculator`` loading a MACE model of the same size (channels, lmax,
layers, correlation, r_max) that the MACE worker builds and saves itself (random weights: speed
does not depend on them; nothing is downloaded). Every code computes energy, forces and stress per
step (``MACECalculator`` always computes stress, so ours is asked for it too). Each code runs in
its own worker process with one torch thread (MACE in its own venv); after warm-up steps they take
turns, ``--steps`` MD steps each (rebuild, skin, MACE, rebuild, ...), ``--repeats`` rounds (fewer
for large cells), and we report the median per step of wall-clock and of process CPU time (robust
to other processes sharing the cores)::

    python -m benchmarks.md_speed --sizes 108,500,2048,4000,10976
    python -m benchmarks.md_speed --mace-python ''              # without MACE
    python -m benchmarks.md_speed --neighbors-only              # only the neighbour list per step
    python -m benchmarks.md_speed --families frame-averaged,learned-equivariance --mace-python ''

``--families`` (default all three) picks the mlip families. ``equivariant`` gives the two columns
above (a custom size from ``--channels`` etc., so that MACE can be built alike); ``frame-averaged``
and ``learned-equivariance`` run their ``--preset`` (``configs/<family>-<preset>.yaml``) through
``MLIPCalculator`` with the ``--skin`` setting, in the same interleaved rounds. Frame-averaged runs
with full averaging (its inference default, exact invariance) and, unless ``--fa-averaging full``,
with one random frame per step (``stochastic``: not exactly invariant, energy not conserved; a cost
reference only); the rows record how many frames the steps averaged over (``frames_sample``: the
last timed sample; ``frames_min``/``frames_max``: every step so far). Cubic cells are near-degenerate:
the perfect lattice averages over 32 frames instead of 8, and during the MD the count changes from
step to step with the (near-)degeneracy of the structure (8, 32 or 48 frames were seen in fcc Cu),
so the cost of full averaging per step is not steady. ``--fa-rattle`` starts the frame-averaged columns from positions rattled by that many Å instead of
the perfect lattice the other columns start from (default 0: the same start).

``--neighbors-only`` times, in this process, one full neighbour-list build at ``r_max`` (what
``skin=0`` pays every step) against the skin path on a reuse step (displacement test + filtering
the ``r_max + skin`` list). Sizes are fcc conventional cells repeated k^3 (4 k^3 atoms).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

try:
    from benchmarks import _common as common
    from benchmarks import speed
except ImportError:  # run as a script: python benchmarks/md_speed.py
    import _common as common  # type: ignore[no-redef]
    import speed  # type: ignore[no-redef]

ELEMENTS = [29]


def run_neighbors(args: argparse.Namespace) -> list[dict]:
    """Per-step neighbour cost: a full build at ``r_max`` against a skin-reuse step."""
    import torch

    from mlip.calculator import NeighborCache
    from mlip.data.neighbors import neighbor_list

    torch.set_num_threads(1)
    rows = []
    for n in args.sizes:
        atoms = common.crystal("Cu", n)
        pos = torch.tensor(atoms.positions)
        cell = torch.tensor(np.asarray(atoms.cell))
        pbc = torch.tensor(atoms.pbc)
        numbers = torch.tensor(atoms.numbers)
        reps = 5
        build = common.timed(lambda p=pos, c=cell, b=pbc: neighbor_list(p, c, b, args.r_max, backend=args.backend), reps)
        cache = NeighborCache(args.r_max, skin=args.skin, backend=args.backend)
        cache(pos, cell, pbc, numbers)  # the one build with r_max + skin
        moved = pos + 0.01 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(0), dtype=pos.dtype)
        reuse = common.timed(lambda f=cache, p=moved, c=cell, b=pbc, z=numbers: f(p, c, b, z), reps)
        assert cache.n_builds == 1
        rows.append({"n_atoms": n, "build_s": build["wall"] / reps, "reuse_s": reuse["wall"] / reps,
                     "build_cpu_s": build["cpu"] / reps, "reuse_cpu_s": reuse["cpu"] / reps})
    return rows


def plot(result: dict, path: Path) -> None:
    """atoms·steps/s (from CPU time per step) against atoms, one line per code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in result["specs"]:
        pts = sorted((r["n_atoms"], r["n_atoms"] / r["cpu_median_s"]) for r in result["rows"]
                     if r["engine"] == label and "skipped" not in r)
        if pts:
            ax.semilogx([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlabel("atoms (fcc Cu)")
    ax.set_ylabel("atoms·steps per CPU second")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"MD speed, velocity Verlet, 1 thread\n{common.describe(result['env'])}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


FAMILIES = ("equivariant", "frame-averaged", "learned-equivariance")
EQ_REBUILD, EQ_SKIN, MACE_LABEL = "mlip, rebuild every step", "mlip, skin {skin} Å", "MACE (MACECalculator)"


def family_label(family: str, preset: str, skin: float, averaging: str | None = None) -> str:
    """Column label of a preset family run with skin reuse."""
    mode = {None: "", "full": " (full averaging)", "stochastic": " (1 random frame, not exact)"}[averaging]
    return f"mlip {family}-{preset}{mode}, skin {skin} Å"


def specs(args: argparse.Namespace, mace: bool) -> dict[str, dict]:
    """Labelled worker specs: the equivariant columns and MACE (as before), then the other families.

    Returns:
        label -> spec, in column order; :func:`skins` gives each label's skin.
    """
    out: dict[str, dict] = {}
    cfg = {"r_max": args.r_max, "num_channels": args.channels, "lmax": args.lmax, "hidden_lmax": args.hidden_lmax,
           "num_layers": args.layers, "correlation": args.correlation, "avg_num_neighbors": 40.0,
           "e0s": {29: -3.5}, "scale": 0.3}
    ours = {"kind": "mlip", "family": "equivariant", "preset": None, "config": cfg, "elements": ELEMENTS,
            "dtype": args.dtype}
    if "equivariant" in args.families:
        out[EQ_REBUILD] = ours
        out[EQ_SKIN.format(skin=args.skin)] = ours
    if mace:
        out[MACE_LABEL] = speed.mace_spec_like(ours)
    for family in args.families:
        if family == "equivariant":
            continue
        spec = {"kind": "mlip", "family": family, "preset": args.preset, "elements": ELEMENTS, "dtype": args.dtype}
        if family == "frame-averaged":
            for mode in args.fa_averaging:
                out[family_label(family, args.preset, args.skin, mode)] = {**spec, "config": {"eval_averaging": mode}}
        else:
            out[family_label(family, args.preset, args.skin)] = spec
    return out


def skins(args: argparse.Namespace, labels: list[str]) -> dict[str, dict]:
    """Per-label MD task fields: skin 0 for the equivariant rebuild column, ``--skin`` for all others
    (MACE's calculator has its own neighbour handling and ignores it); the frame-averaged columns
    also start from positions rattled by ``--fa-rattle`` Å."""
    out = {label: {"skin": 0.0 if label == EQ_REBUILD else args.skin} for label in labels}
    for label in labels:
        if label.startswith("mlip frame-averaged") and args.fa_rattle:
            out[label]["rattle"] = args.fa_rattle
    return out


def _done(row: dict | None) -> dict | None:
    return None if row is None or "skipped" in row else row


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="108,500,2048,4000,10976", help="atom counts, each 4 k^3")
    ap.add_argument("--steps", type=int, default=2, help="MD steps per timed sample")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of --steps steps per code (fewer when slow)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed MD steps first (MACE needs ~3)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per size (about)")
    ap.add_argument("--max-mem", type=float, default=6000.0,
                    help="skip sizes predicted to need more memory than this per process (MiB)")
    ap.add_argument("--max-call", type=float, default=120.0, help="skip sizes predicted slower than this per step (s)")
    ap.add_argument("--skin", type=float, default=0.5, help="Å, for the skin-reuse column")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--lmax", type=int, default=2)
    ap.add_argument("--hidden-lmax", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--correlation", type=int, default=2)
    ap.add_argument("--r-max", type=float, default=4.5)
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help="mlip families, comma-separated: equivariant (the custom size above, next to MACE), "
                         "frame-averaged, learned-equivariance (their --preset)")
    ap.add_argument("--preset", default="small", help="configs/<family>-<preset>.yaml of the non-equivariant families")
    ap.add_argument("--fa-rattle", type=float, default=0.0,
                    help="Å (Gaussian, seeded): start the frame-averaged columns this far off the perfect lattice "
                         "(whose frames are degenerate); default 0, the same start as the other columns")
    ap.add_argument("--fa-averaging", default="full,stochastic",
                    help="frame-averaged inference modes: full (exact, default) and/or stochastic (1 random frame)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--mace-python", default=speed.MACE_PYTHON, help="python with mace-torch ('' to skip)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--backend", default="auto", help="neighbour-list backend of --neighbors-only")
    ap.add_argument("--neighbors-only", action="store_true",
                    help="only time the neighbour list per step: full build vs skin reuse")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.families = [f for f in args.families.split(",") if f]
    args.fa_averaging = [m for m in args.fa_averaging.split(",") if m]
    bad = [f for f in args.families if f not in FAMILIES] + [m for m in args.fa_averaging if m not in ("full", "stochastic")]
    if bad:
        ap.error(f"unknown --families / --fa-averaging entries {bad}; families: {', '.join(FAMILIES)}; "
                 "modes: full, stochastic")

    if args.neighbors_only:
        env = common.environment()
        print(f"# neighbour list per MD step, fcc Cu, r_max={args.r_max} Å, skin={args.skin} Å, backend "
              f"{args.backend}, 1 thread; {common.describe(env)}; CPU ms (wall ms), mean of 5")
        rows = run_neighbors(args)
        print(common.markdown_table(
            ["atoms", "full build at r_max", "skin reuse step", "speed-up (CPU)"],
            [[r["n_atoms"], f"{1e3 * r['build_cpu_s']:.3g} ({1e3 * r['build_s']:.3g})",
              f"{1e3 * r['reuse_cpu_s']:.3g} ({1e3 * r['reuse_s']:.3g})", f"{r['build_cpu_s'] / r['reuse_cpu_s']:.1f}"]
             for r in rows]))
        if args.json:
            common.write_json(args.json, {"env": env, "rows": rows})
        return None

    mace = bool(args.mace_python) and Path(args.mace_python).exists()
    if args.mace_python and not mace:
        print(f"# no MACE python at {args.mace_python}: MACE columns left out", file=sys.stderr)
    labelled = specs(args, mace)
    labels = list(labelled)
    env = common.environment()
    print(f"# MD speed: {common.describe(env)}; velocity Verlet NVE 2 fs, fcc Cu, {args.dtype}, 1 torch thread "
          f"per process; families {', '.join(args.families)}"
          + (f"; equivariant (and MACE): channels={args.channels} lmax={args.lmax} hidden_lmax={args.hidden_lmax} "
             f"layers={args.layers} correlation={args.correlation} r_max={args.r_max}" if "equivariant" in args.families
             or mace else "")
          + (f"; other families: configs/<family>-{args.preset}.yaml" if set(args.families) - {"equivariant"} else ""),
          flush=True)
    workers = speed.start_workers(labelled, args.mace_python)
    try:
        params = {label: w.info["params"] for label, w in workers.items()}
        rows = speed.compare(workers, [f"Cu-{n}" for n in args.sizes], {"task": "md"}, repeats=args.repeats,
                             warmup=args.warmup, budget_s=args.budget, max_call_s=args.max_call,
                             max_mem_mb=args.max_mem, steps=args.steps,
                             per_worker_task=skins(args, labels))
    finally:
        for w in workers.values():
            w.close()
    end = common.environment()["load_average"]
    by = {(r["engine"], r["n_atoms"]): r for r in rows}
    eq_skin = EQ_SKIN.format(skin=args.skin)
    eq = [label for label in (EQ_REBUILD, eq_skin, MACE_LABEL) if label in labelled]
    others = [label for label in labels if label not in eq]
    tables = []
    if eq:  # the equivariant / MACE table, computed as before
        table = []
        for n in args.sizes:
            line = [n]
            for label in eq:
                r = _done(by.get((label, n)))
                line += (["—", "—"] if r is None else
                         [f"{1 / r['cpu_median_s']:.3g} ({1 / r['wall_median_s']:.3g})",
                          f"{n / r['cpu_median_s']:.3g} ({n / r['wall_median_s']:.3g})"])
            skin, base = _done(by.get((eq_skin, n))), _done(by.get((EQ_REBUILD, n)))
            if eq_skin in labelled:
                line.append(f"{skin['nl_builds']}/{skin['nl_calls']}" if skin else "—")
            if eq_skin in labelled and EQ_REBUILD in labelled:
                line.append(f"{base['cpu_median_s'] / skin['cpu_median_s']:.2f}" if skin and base else "—")
            if mace and eq_skin in labelled:
                m = _done(by.get((MACE_LABEL, n)))
                line.append(f"{m['cpu_median_s'] / skin['cpu_median_s']:.2f}" if skin and m else "—")
            table.append(line)
        header = ["atoms"]
        for label in eq:
            header += [f"{label}: steps/s", "atoms·steps/s"]
        header += (["skin: NL builds / calls"] if eq_skin in labelled else []) \
            + (["skin speed-up"] if eq_skin in labelled and EQ_REBUILD in labelled else []) \
            + (["MACE time / mlip skin time"] if mace and eq_skin in labelled else [])
        tables.append(common.markdown_table(header, table))
    if others:  # one line per family column and size
        table = []
        for label in others:
            for n in args.sizes:
                r = by.get((label, n))
                if r is None or "skipped" in r:
                    table.append([label, n, r["skipped"] if r else "not run", "—", "—", "—"])
                    continue
                frames = (f"{'/'.join(map(str, r['frames_sample']))} (all steps {r['frames_min']}-{r['frames_max']})"
                          if "frames_sample" in r else "—")
                table.append([label, n, f"{1 / r['cpu_median_s']:.3g} ({1 / r['wall_median_s']:.3g})",
                              f"{n / r['cpu_median_s']:.3g} ({n / r['wall_median_s']:.3g})",
                              f"{r['nl_builds']}/{r['nl_calls']}", frames])
        tables.append(common.markdown_table(
            ["code", "atoms", "steps/s", "atoms·steps/s", "NL builds / calls", "frames per step, last sample"], table))
    print()
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()) + f"; load average at the end {end}")
    print("values: from median process CPU time per step (from median wall-clock time in parentheses)")
    for t in tables:
        print(t, flush=True)
        print()
    result = {"env": env, "load_average_end": end, "specs": labelled, "params": params, "rows": rows,
              "steps_per_sample": args.steps, "skin": args.skin, "families": args.families, "preset": args.preset,
              "command": "python -m benchmarks.md_speed " + shlex.join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        common.write_json(args.json, result)
        plot(result, Path(args.json).with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
