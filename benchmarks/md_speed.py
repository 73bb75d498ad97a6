"""MD speed through the ASE calculator: steps/s and atoms*steps/s for fcc Cu crystals.

Times velocity-Verlet NVE steps (2 fs, from 300 K) of ``MLIPCalculator`` with a full neighbour
rebuild every step (``skin=0``) and with skin reuse (``--skin``, rebuild only when an atom moved
more than skin/2), next to MACE's ``MACECalculator`` with a MACE model of the same size
(channels, lmax, layers, correlation, r_max; random weights: speed does not depend on them).
MACE runs in its own virtual environment through a subprocess of this same script::

    python benchmarks/md_speed.py --sizes 108,500,2048,4000,10976 --steps 10
    python benchmarks/md_speed.py --mace-python /work/venv-mace/bin/python   # default; skipped if absent

Also reported: the time of one neighbour-list build (what skin reuse saves per step) and how
many builds the timed steps needed. Sizes are fcc conventional cells repeated k^3 (4 k^3 atoms).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ELEMENTS = [29]


def crystal(n_atoms: int):
    """Rattled fcc Cu with ``n_atoms = 4 k^3`` atoms and 300 K velocities (seeded)."""
    from ase.build import bulk
    from ase.md.velocitydistribution import Stationary

    k = round((n_atoms / 4) ** (1 / 3))
    if 4 * k**3 != n_atoms:
        raise ValueError(f"size {n_atoms} is not 4 k^3 (try 108, 500, 2048, 4000, 10976)")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(k)
    atoms.rattle(0.02, seed=1)
    rng = np.random.default_rng(0)
    masses = atoms.get_masses()[:, None]
    kT = 300.0 * 8.617333262e-5
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * kT))
    Stationary(atoms)
    return atoms


def time_md(atoms, calc, steps: int, warmup: int) -> float:
    """Seconds per velocity-Verlet step (after ``warmup`` steps)."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    dyn.run(warmup)
    t0 = time.perf_counter()
    dyn.run(steps)
    return (time.perf_counter() - t0) / steps


def run_neighbors(args) -> list[dict]:
    """Per-step neighbour cost: a full build at ``r_max`` (what ``skin=0`` pays every step) against
    the skin path on a reuse step (displacement test + filtering the ``r_max + skin`` list)."""
    import torch

    from mlip.calculator import NeighborCache
    from mlip.data.neighbors import neighbor_list

    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        atoms = crystal(n)
        pos = torch.tensor(atoms.positions)
        cell = torch.tensor(np.asarray(atoms.cell))
        pbc = torch.tensor(atoms.pbc)
        numbers = torch.tensor(atoms.numbers)
        reps = 3
        t0 = time.perf_counter()
        for _ in range(reps):
            neighbor_list(pos, cell, pbc, args.r_max)
        t_build = (time.perf_counter() - t0) / reps
        cache = NeighborCache(args.r_max, skin=args.skin)
        cache(pos, cell, pbc, numbers)  # the one build with r_max + skin
        moved = pos + 0.01 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(0), dtype=pos.dtype)
        t0 = time.perf_counter()
        for _ in range(reps):
            cache(moved, cell, pbc, numbers)
        t_reuse = (time.perf_counter() - t0) / reps
        assert cache.n_builds == 1
        rows.append({"n_atoms": n, "build_s": t_build, "reuse_s": t_reuse})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run_mlip(args) -> dict:
    import torch

    from mlip.calculator import MLIPCalculator
    from mlip.data.neighbors import neighbor_list
    from mlip.models.base import build_model

    torch.set_num_threads(args.threads)
    cfg = {"elements": ELEMENTS, "r_max": args.r_max, "num_channels": args.channels, "lmax": args.lmax,
           "hidden_lmax": args.hidden_lmax, "num_layers": args.layers, "correlation": args.correlation,
           "avg_num_neighbors": 40.0, "e0s": {29: -3.5}, "scale": 0.3}
    model = build_model("equivariant", cfg).eval()
    out = {"params": sum(p.numel() for p in model.parameters()), "rows": []}
    for n in args.sizes:
        atoms = crystal(n)
        pos = torch.tensor(atoms.positions)
        cell = torch.tensor(np.asarray(atoms.cell))
        pbc = torch.tensor(atoms.pbc)
        t0 = time.perf_counter()
        edges, _ = neighbor_list(pos, cell, pbc, args.r_max)
        t_nl = time.perf_counter() - t0
        row = {"n_atoms": n, "n_edges": int(edges.shape[1]), "nl_build_s": t_nl}
        for label, skin in (("rebuild", 0.0), ("skin", args.skin)):
            calc = MLIPCalculator(model, device=args.device, dtype=args.dtype, skin=skin, compute_stress=False)
            sec = time_md(crystal(n), calc, args.steps, args.warmup)
            row[f"{label}_steps_per_s"] = 1.0 / sec
            row[f"{label}_builds"] = calc.neighbors.n_builds
            row[f"{label}_calls"] = calc.neighbors.n_calls
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def run_mace(args) -> dict:
    import torch

    torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4 constants (trusted package file)
    from e3nn import o3
    from mace.calculators import MACECalculator
    from mace.modules import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
    from mace.modules.models import ScaleShiftMACE

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)  # MACE builds its model in the default dtype
    hidden = o3.Irreps("+".join(f"{args.channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(args.hidden_lmax + 1)))
    model = ScaleShiftMACE(
        r_max=args.r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=args.lmax,
        interaction_cls=RealAgnosticResidualInteractionBlock, interaction_cls_first=RealAgnosticInteractionBlock,
        num_interactions=args.layers, num_elements=len(ELEMENTS), hidden_irreps=hidden,
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.full(len(ELEMENTS), -3.5), avg_num_neighbors=40.0,
        atomic_numbers=ELEMENTS, correlation=args.correlation, gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64], atomic_inter_scale=0.3, atomic_inter_shift=0.0,
    ).to(dtype).eval()
    out = {"params": sum(p.numel() for p in model.parameters()), "rows": []}
    calc = MACECalculator(models=model, device=args.device if args.device != "auto" else "cpu", default_dtype=args.dtype)
    for n in args.sizes:
        sec = time_md(crystal(n), calc, args.steps, args.warmup)
        row = {"n_atoms": n, "mace_steps_per_s": 1.0 / sec}
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="108,500,2048", help="atom counts, each 4 k^3")
    ap.add_argument("--steps", type=int, default=10, help="timed MD steps per size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skin", type=float, default=0.5, help="Å, for the skin-reuse column")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--lmax", type=int, default=2)
    ap.add_argument("--hidden-lmax", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--correlation", type=int, default=2)
    ap.add_argument("--r-max", type=float, default=4.5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 2)))
    ap.add_argument("--mace-python", default="/work/venv-mace/bin/python", help="python with mace-torch ('' to skip)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--neighbors-only", action="store_true",
                    help="only time the neighbour list per step: full build vs skin reuse")
    ap.add_argument("--worker", choices=["mace"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.worker == "mace":
        print(json.dumps(run_mace(args)))
        return

    if args.neighbors_only:
        print(f"\nneighbour list per MD step, fcc Cu, r_max={args.r_max} Å, skin={args.skin} Å, {args.threads} thread(s)")
        print(f"{'atoms':>7} {'full build s':>12} {'skin reuse s':>12} {'speed-up':>8}")
        for r in run_neighbors(args):
            print(f"{r['n_atoms']:>7} {r['build_s']:>12.4g} {r['reuse_s']:>12.4g} {r['build_s'] / r['reuse_s']:>8.1f}")
        return

    ours = run_mlip(args)
    mace = None
    if args.mace_python and os.path.exists(args.mace_python):
        cmd = [args.mace_python, os.path.abspath(__file__), "--worker", "mace", "--mace-python", "",
               "--sizes", ",".join(map(str, args.sizes))]
        for key in ("steps", "warmup", "channels", "lmax", "hidden_lmax", "layers", "correlation", "r_max",
                    "dtype", "device", "threads"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            mace = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            print(f"MACE run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    else:
        print("no MACE environment (--mace-python); MACE columns left empty", file=sys.stderr)
    mace_rows = {r["n_atoms"]: r for r in (mace or {}).get("rows", [])}

    print(f"\nMD speed, velocity Verlet NVE, fcc Cu, {args.dtype}, {args.threads} thread(s), device {args.device}")
    print(f"model: channels={args.channels} lmax={args.lmax} hidden_lmax={args.hidden_lmax} layers={args.layers} "
          f"correlation={args.correlation} r_max={args.r_max}; mlip {ours['params']} params"
          + (f", MACE {mace['params']} params" if mace else ""))
    head = (f"{'atoms':>7} {'edges':>8} {'NL build s':>10} | {'rebuild st/s':>12} {'at*st/s':>9} | "
            f"{'skin st/s':>9} {'at*st/s':>9} {'builds':>7} | {'MACE st/s':>9} {'at*st/s':>9}")
    print(head)
    print("-" * len(head))
    for r in ours["rows"]:
        n = r["n_atoms"]
        m = mace_rows.get(n)
        mace_cols = f"{m['mace_steps_per_s']:>9.3g} {n * m['mace_steps_per_s']:>9.3g}" if m else f"{'-':>9} {'-':>9}"
        print(f"{n:>7} {r['n_edges']:>8} {r['nl_build_s']:>10.3g} | {r['rebuild_steps_per_s']:>12.3g} "
              f"{n * r['rebuild_steps_per_s']:>9.3g} | {r['skin_steps_per_s']:>9.3g} {n * r['skin_steps_per_s']:>9.3g} "
              f"{r['skin_builds']:>3}/{r['skin_calls']:<3} | {mace_cols}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "mlip": ours, "mace": mace}, fh, indent=2)


if __name__ == "__main__":
    main()
