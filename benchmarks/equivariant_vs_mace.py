"""Time mlip's ``equivariant`` model against mace-torch's MACE of the same size on CPU.

Both models see the same structures and the same neighbour list (ASE, ``r_max``), and are timed
on energy + forces (and + stress for crystals), median of ``--repeats`` calls after warm-up; the
neighbour list is built once, outside the timing. MACE runs in its own virtual environment
(mace-torch pins its own e3nn) through a subprocess of this same script::

    python -m venv /work/venv-mace && /work/venv-mace/bin/pip install torch==2.13.0 mace-torch
    python benchmarks/equivariant_vs_mace.py --mace-python /work/venv-mace/bin/python

Sizes: ``--channels 128 --lmax 3 --hidden-lmax 1 --layers 2 --correlation 3 --r-max 6`` is
MACE-MP medium. Structures: a 27-atom molecule (H, C, O) and diamond-cubic Si supercells
(64, 216, 512, 1000 atoms).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ELEMENTS = [1, 6, 8, 14]


def structures(sizes: list[int], molecule: bool = True):
    """``(name, ase.Atoms)`` pairs: the 27-atom molecule and Si supercells of the given atom counts."""
    import ase
    import ase.build

    rng = np.random.default_rng(0)
    out = []
    # 27-atom molecule: 9 C, 4 O, 14 H placed with >= 1.1 Å separation in a 4.5 Å sphere
    symbols = ["C"] * 9 + ["O"] * 4 + ["H"] * 14
    pos: list[np.ndarray] = []
    while len(pos) < len(symbols):
        p = rng.uniform(-4.5, 4.5, size=3)
        if np.linalg.norm(p) < 4.5 and all(np.linalg.norm(p - q) > 1.1 for q in pos):
            pos.append(p)
    if molecule:
        out.append(("molecule-27", ase.Atoms(symbols, positions=np.array(pos))))
    for n in sizes:
        rep = round((n / 8) ** (1 / 3))
        if 8 * rep**3 != n:
            raise ValueError(f"crystal size {n} is not 8 * k^3")
        atoms = ase.build.bulk("Si", "diamond", a=5.43, cubic=True).repeat(rep)
        atoms.rattle(0.05, seed=1)
        out.append((f"Si-{n}", atoms))
    return out


def neighbors(atoms, r_max: float):
    from ase.neighborlist import neighbor_list

    i, j, S = neighbor_list("ijS", atoms, r_max)
    return i, j, S


def time_call(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU time (all threads) of ``fn()``, in ms.

    CPU time is reported too because the benchmark machine may be shared: time slices lost to
    other processes inflate wall time but not this process's CPU time.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000.0 * statistics.median(wall), 1000.0 * statistics.median(cpu)


def run_mlip(args) -> dict:
    import torch

    from mlip.data.graph import AtomGraph, collate
    from mlip.models.base import build_model
    from mlip.models.equivariant import num_parameters
    from mlip.models.outputs import predict

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = dict(elements=ELEMENTS, r_max=args.r_max, num_channels=args.channels, lmax=args.lmax,
               hidden_lmax=args.hidden_lmax, num_layers=args.layers, correlation=args.correlation,
               mixing=args.mixing, radial=args.radial, avg_num_neighbors=30.0, kernel="torch")
    model = build_model("equivariant", cfg).to(dtype).eval()
    results = {"params": num_parameters(model), "rows": []}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, atoms in structures(args.sizes, args.molecule):
        i, j, S = neighbors(atoms, args.r_max)
        graph = AtomGraph(
            positions=torch.tensor(atoms.positions), numbers=torch.tensor(atoms.numbers),
            cell=torch.tensor(atoms.cell.array), pbc=torch.tensor(atoms.pbc),
            edge_index=torch.tensor(np.stack([j, i])), unit_shifts=torch.tensor(S),
        )
        batch = collate([graph]).to(dtype=dtype)
        stress = bool(atoms.pbc.any()) and not args.no_stress
        ms, cpu = time_call(lambda: predict(model, batch, forces=True, stress=stress), args.warmup, args.repeats)
        results["rows"].append({"name": name, "n_atoms": len(atoms), "n_edges": len(i), "stress": stress, "ms": ms, "cpu": cpu})
    return results


def run_mace(args) -> dict:
    import torch

    # e3nn 0.4.4 (pinned by mace-torch) stores its constants with python slices; torch >= 2.6
    # loads weights_only by default, so allow exactly that type for this trusted package file
    torch.serialization.add_safe_globals([slice])
    from e3nn import o3
    from mace.modules import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
    from mace.modules.models import ScaleShiftMACE

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hidden = o3.Irreps("+".join(f"{args.channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(args.hidden_lmax + 1)))
    model = ScaleShiftMACE(
        r_max=args.r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=args.lmax,
        interaction_cls=RealAgnosticResidualInteractionBlock, interaction_cls_first=RealAgnosticInteractionBlock,
        num_interactions=args.layers, num_elements=len(ELEMENTS), hidden_irreps=hidden,
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(ELEMENTS)), avg_num_neighbors=30.0,
        atomic_numbers=ELEMENTS, correlation=args.correlation, gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    ).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    results = {"params": sum(p.numel() for p in model.parameters()), "rows": []}
    index = {z: k for k, z in enumerate(ELEMENTS)}
    for name, atoms in structures(args.sizes, args.molecule):
        i, j, S = neighbors(atoms, args.r_max)
        cell = torch.tensor(atoms.cell.array, dtype=dtype)
        one_hot = torch.zeros(len(atoms), len(ELEMENTS), dtype=dtype)
        one_hot[torch.arange(len(atoms)), torch.tensor([index[int(z)] for z in atoms.numbers])] = 1.0
        unit = torch.tensor(S, dtype=dtype)
        data = {
            "positions": torch.tensor(atoms.positions, dtype=dtype),
            "node_attrs": one_hot,
            "edge_index": torch.tensor(np.stack([i, j]), dtype=torch.long),  # MACE: vec = pos[1] - pos[0] + shift
            "shifts": unit @ cell,
            "unit_shifts": unit,
            "cell": cell,
            "batch": torch.zeros(len(atoms), dtype=torch.long),
            "ptr": torch.tensor([0, len(atoms)], dtype=torch.long),
        }
        stress = bool(atoms.pbc.any()) and not args.no_stress

        def call():
            d = {k: v.clone() if v.is_floating_point() else v for k, v in data.items()}
            return model(d, training=False, compute_force=True, compute_stress=stress)

        ms, cpu = time_call(call, args.warmup, args.repeats)
        results["rows"].append({"name": name, "n_atoms": len(atoms), "n_edges": len(i), "stress": stress, "ms": ms, "cpu": cpu})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mace-python", default="/work/venv-mace/bin/python", help="python of the venv with mace-torch")
    ap.add_argument("--sizes", default="64,216,512,1000", help="Si supercell atom counts (8 k^3)")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--lmax", type=int, default=3)
    ap.add_argument("--hidden-lmax", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--correlation", type=int, default=3)
    ap.add_argument("--r-max", type=float, default=6.0)
    ap.add_argument("--mixing", default="grid", choices=["grid", "none"])
    ap.add_argument("--radial", default="spline", choices=["spline", "mlp"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-stress", action="store_true", help="forces only, also for crystals")
    ap.add_argument("--worker", choices=["mlip", "mace"], help=argparse.SUPPRESS)
    ap.add_argument("--molecule", dest="molecule", action="store_true", default=True, help=argparse.SUPPRESS)
    ap.add_argument("--no-molecule", dest="molecule", action="store_false", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.worker == "mace":
        print(json.dumps(run_mace(args)))
        return
    if args.worker == "mlip":
        print(json.dumps(run_mlip(args)))
        return

    import torch

    print(f"# {os.uname().nodename}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{args.dtype}, {args.threads} CPU threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"channels={args.channels} lmax={args.lmax} hidden_lmax={args.hidden_lmax} layers={args.layers} "
          f"correlation={args.correlation} r_max={args.r_max} mixing={args.mixing} radial={args.radial}", flush=True)
    print(f"{'structure':<12} {'atoms':>6} {'edges':>8} {'stress':>6} {'mlip ms':>10} {'MACE ms':>10} {'ratio':>6} "
          f"{'mlip cpu ms':>12} {'MACE cpu ms':>12} {'ratio':>6}", flush=True)
    # one structure at a time, alternating the two codes, so a change in machine load hits both alike
    raw = sys.argv[1:]
    base = [a for k, a in enumerate(raw) if a != "--sizes" and not a.startswith("--sizes=")
            and not (k > 0 and raw[k - 1] == "--sizes")]
    for k, n in enumerate([0] + args.sizes):
        sizes = [] if n == 0 else [n]
        argv = [*base, "--sizes", ",".join(str(s) for s in sizes), "--molecule" if n == 0 else "--no-molecule"]
        rows = {}
        for worker, python in (("mlip", sys.executable), ("mace", args.mace_python)):
            proc = subprocess.run([python, os.path.abspath(__file__), *argv, "--worker", worker], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{worker} worker failed ({python}):\n{proc.stderr[-4000:]}")
            rows[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
        if k == 0:
            print(f"# parameters: mlip {rows['mlip']['params']:,}  MACE {rows['mace']['params']:,}", flush=True)
        for a, b in zip(rows["mlip"]["rows"], rows["mace"]["rows"]):
            assert a["n_edges"] == b["n_edges"], (a, b)
            print(f"{a['name']:<12} {a['n_atoms']:>6} {a['n_edges']:>8} {a['stress']!s:>6} {a['ms']:>10.1f} "
                  f"{b['ms']:>10.1f} {a['ms'] / b['ms']:>6.2f} {a['cpu']:>12.1f} {b['cpu']:>12.1f} "
                  f"{a['cpu'] / b['cpu']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
