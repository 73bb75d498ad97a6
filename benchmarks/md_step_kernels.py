"""One MD step (energy + forces) of the ``equivariant`` model with ``kernel: triton`` vs ``kernel: torch``.

Run on a CUDA machine::

    python benchmarks/md_step_kernels.py                      # MACE-MP-medium-sized model, 1e3..1e5 atoms + largest
    python benchmarks/md_step_kernels.py --sizes 1000 8000 --no-largest

The model is sized like MACE-MP medium (128 channels, edge l=3, hidden features 0e+1o, 2 layers,
correlation 3, r_max 6 Å) unless overridden. Structures are rattled diamond Si supercells
(``8 k^3`` atoms, about 30 neighbours within 6 Å); the neighbour list is built once, outside the
timing, as in MD between list rebuilds. Each step is ``mlip.models.outputs.predict(forces=True)``,
timed as the median of ``--repeats`` CUDA-synchronised calls after warm-up (Triton autotunes on
the first calls), with the peak GPU memory. Before timing, the Triton model is checked against the
torch reference on a small structure (:func:`mlip.models.backend_check.check_backend`) and on the
timed structure itself (energy and forces). ``--largest`` doubles the system until the Triton step
runs out of memory and reports the largest that fit, for both backends. On a CPU-only machine the
script says so and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

ELEMENTS = [14]


def si_supercell(n_atoms: int):
    """Diamond Si with ``8 k^3 >= n_atoms`` atoms (k rounded), rattled by 0.05 Å."""
    import ase.build

    k = max(1, round((n_atoms / 8) ** (1 / 3)))
    atoms = ase.build.bulk("Si", "diamond", a=5.43, cubic=True).repeat(k)
    atoms.rattle(0.05, seed=1)
    return atoms


def build(kernel: str, args, dtype: torch.dtype):
    from mlip.models.base import build_model

    cfg = {"r_max": args.r_max, "elements": ELEMENTS, "num_channels": args.channels, "lmax": args.lmax,
           "hidden_lmax": args.hidden_lmax, "num_layers": args.layers, "correlation": args.correlation,
           "avg_num_neighbors": 30.0, "kernel": kernel}
    return build_model("equivariant", cfg).to(device="cuda", dtype=dtype).eval()


def make_batch(atoms, r_max: float, dtype: torch.dtype):
    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph

    backend = "vesin" if _has("vesin") else "torch"
    return collate([atoms_to_graph(atoms, r_max, backend=backend)]).to(device="cuda", dtype=dtype)


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def step_time(model, batch, repeats: int) -> tuple[float, float]:
    """Median ms of one energy+forces evaluation and the peak GPU memory (GiB) during it."""
    from mlip.models.outputs import predict

    for _ in range(3):
        predict(model, batch, forces=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(model, batch, forces=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def fits(model, batch) -> bool:
    from mlip.models.outputs import predict

    try:
        predict(model, batch, forces=True)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000, 27000, 64000, 125000])
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--lmax", type=int, default=3)
    ap.add_argument("--hidden-lmax", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--correlation", type=int, default=3)
    ap.add_argument("--r-max", type=float, default=6.0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--largest", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("md_step_kernels: no CUDA device; the Triton kernels need a GPU to be timed (CPU correctness: tests/test_kernels.py).")
        return 0
    import triton

    from mlip.models.backend_check import check_backend
    from mlip.models.outputs import predict

    dtype = getattr(torch, args.dtype)
    fast, slow = build("triton", args, dtype), build("torch", args, dtype)
    slow.load_state_dict(fast.state_dict())
    print(f"# device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; {args.dtype}")
    print(f"# model: C={args.channels} lmax={args.lmax} hidden_lmax={args.hidden_lmax} layers={args.layers} "
          f"correlation={args.correlation} r_max={args.r_max}")
    print(f"# load-time check: {check_backend(fast)}")
    print(f"{'atoms':>8} {'edges':>10} {'triton ms':>10} {'torch ms':>10} {'speed-up':>9} {'triton GiB':>11} "
          f"{'torch GiB':>10} {'max|dE|/atom':>13} {'max|dF|':>9}")
    for n in args.sizes:
        atoms = si_supercell(n)
        batch = make_batch(atoms, args.r_max, dtype)
        row = [f"{len(atoms):>8}", f"{batch.n_edges:>10}"]
        results = {}
        for name, model in (("triton", fast), ("torch", slow)):
            try:
                results[name] = step_time(model, batch, args.repeats)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                results[name] = None
        a, b = results["triton"], results["torch"]
        row += [f"{a[0]:10.2f}" if a else f"{'OOM':>10}", f"{b[0]:10.2f}" if b else f"{'OOM':>10}"]
        row.append(f"{b[0] / a[0]:9.2f}" if a and b else f"{'-':>9}")
        row += [f"{a[1]:11.2f}" if a else f"{'-':>11}", f"{b[1]:10.2f}" if b else f"{'-':>10}"]
        if a and b:
            pa, pb = predict(fast, batch, forces=True), predict(slow, batch, forces=True)
            de = float((pa["energy"] - pb["energy"]).detach().abs().max()) / len(atoms)
            df = float((pa["forces"] - pb["forces"]).detach().abs().max())
            row += [f"{de:13.2e}", f"{df:9.2e}"]
        print(" ".join(row))
        sys.stdout.flush()
        del batch
        torch.cuda.empty_cache()
    if args.largest:
        for name, model in (("triton", fast), ("torch", slow)):
            n, last_ok = max(args.sizes), None
            while True:
                atoms = si_supercell(n)
                try:
                    batch = make_batch(atoms, args.r_max, dtype)
                except torch.cuda.OutOfMemoryError:
                    break
                ok = fits(model, batch)
                del batch
                if not ok:
                    break
                last_ok = len(atoms)
                n = 2 * len(atoms)
            print(f"# largest system that fits, {name}: {last_ok} atoms (next try: {len(atoms)} atoms ran out of memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
