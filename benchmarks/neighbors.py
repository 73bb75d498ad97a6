"""Neighbour-list build time: our torch cell list vs ASE (and vesin / matscipy when installed).

Run ``python benchmarks/neighbors.py`` (10^3, 10^4, 10^5 atoms) or, for a quick check,
``python benchmarks/neighbors.py --sizes 1000 10000``. Systems are fcc Cu supercells
(a = 3.61 Å) with r_max = 5 Å; each time is the median of ``--repeats`` builds after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ase.build import bulk

from mlip.data.neighbors import available_backends, neighbor_list


def fcc_supercell(n_atoms: int, a: float = 3.61) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cubic fcc Cu supercell with about ``n_atoms`` atoms (4 per conventional cell), rattled."""
    reps = max(1, round((n_atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((reps, reps, reps))
    atoms.rattle(0.01, seed=0)  # break exact lattice ties at the cutoff
    return (
        torch.from_numpy(atoms.positions.copy()),
        torch.from_numpy(atoms.cell.array.copy()),
        torch.tensor(atoms.pbc),
    )


def time_backend(
    backend: str, pos, cell, pbc, r_max: float, repeats: int, budget_s: float
) -> tuple[float, int]:
    """Median wall time (s) of ``repeats`` builds; fewer repeats if one build exceeds ``budget_s``."""
    sync = torch.cuda.synchronize if pos.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    ei, _ = neighbor_list(pos, cell, pbc, r_max, backend=backend)  # warm-up
    sync()
    first = time.perf_counter() - t0
    times = [first]
    if first < budget_s:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            neighbor_list(pos, cell, pbc, r_max, backend=backend)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), int(ei.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000], help="approximate atom counts"
    )
    parser.add_argument("--r-max", type=float, default=5.0, help="cutoff (Å)")
    parser.add_argument("--repeats", type=int, default=5, help="timed builds per cell (median reported)")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    parser.add_argument("--device", default="cpu", help="device for the torch backend (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="skip repeats when one build takes longer (s)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends or available_backends()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {args.device}, r_max {args.r_max} Å"
    )
    header = f"{'atoms':>8} {'edges':>10} " + " ".join(f"{b + ' (ms)':>14} {'vs ase':>7}" for b in backends)
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        pos, cell, pbc = fcc_supercell(size)
        row, ref, n_edges = {}, None, None
        for b in backends:
            dev = args.device if b == "torch" else "cpu"
            t, e = time_backend(
                b, pos.to(dev), cell.to(dev), pbc.to(dev), args.r_max, args.repeats, args.budget
            )
            if n_edges is None:
                n_edges = e
            elif e != n_edges:
                raise RuntimeError(f"backend {b} found {e} edges, expected {n_edges}")
            row[b] = t
        ref = row.get("ase")
        cells = []
        for b in backends:
            ratio = f"{ref / row[b]:6.2f}x" if ref else "    n/a"
            cells.append(f"{1e3 * row[b]:14.1f} {ratio:>7}")
        print(f"{pos.shape[0]:>8} {n_edges:>10} " + " ".join(cells), flush=True)
    print("'vs ase' = ASE time / backend time (higher is faster).")


if __name__ == "__main__":
    main()
