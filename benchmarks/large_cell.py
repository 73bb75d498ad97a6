"""A crystal too large for an unchunked call, through ``MLIPCalculator`` with its memory budget.

Builds a rattled fcc Cu supercell (default 97,556 atoms: 29 x 29 x 29 cubic cells), predicts the peak memory of one unchunked energy + forces + stress call of the preset
(:mod:`mlip.calculator.memory`), then runs the call with ``max_memory_gb`` (default: 80 % of the free
memory), which chunks the edge work to fit. Reports the prediction, the chunk size, the peak resident
memory of this process and the CPU time::

    python -m benchmarks.large_cell --preset small
"""
from __future__ import annotations

import argparse
import json
import resource
import time

try:
    from benchmarks import _common as common
    from benchmarks import speed
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]
    import speed  # type: ignore[no-redef]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--atoms", type=int, default=97_556, help="4 k^3 (cubic fcc cells) or m^3 (primitive)")
    ap.add_argument("--max-memory-gb", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from mlip.calculator import MLIPCalculator
    from mlip.calculator.memory import GIB, MemoryModel, budget_bytes, plan_edge_chunks

    torch.set_num_threads(args.threads)
    engine = speed.MlipEngine({"kind": "mlip", "family": "equivariant", "preset": args.preset, "config": {},
                               "dtype": "float32"})
    atoms = common.make_structure(f"Cu-{args.atoms}")
    calc = MLIPCalculator(engine.model, device="cpu", dtype="float32", skin=0.0, max_memory_gb=args.max_memory_gb)
    atoms.calc = calc
    wall, cpu = time.perf_counter(), time.process_time()
    batch = calc.batch_from_atoms(atoms)
    memory = MemoryModel.measure(calc.model, calc.device, calc.dtype)
    budget = budget_bytes(args.max_memory_gb, calc.device)
    chunk = plan_edge_chunks(memory, batch.n_atoms, batch.n_edges, budget)
    predicted = memory.peak(batch.n_atoms, batch.n_edges)
    print(f"# {common.describe(common.environment())}; {args.preset} preset, float32, {args.threads} thread(s)")
    print(f"{batch.n_atoms} atoms, {batch.n_edges} edges: predicted unchunked peak {predicted / GIB:.1f} GiB, "
          f"budget {budget / GIB:.1f} GiB -> edge chunks of {chunk}", flush=True)
    del batch
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    out = {"preset": args.preset, "n_atoms": len(atoms), "predicted_unchunked_gib": predicted / GIB,
           "budget_gib": budget / GIB, "edge_chunk": chunk, "energy_eV": float(energy),
           "max_force_eV_A": float(abs(forces).max()), "stress_finite": bool(abs(stress).max() < 1e9),
           "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(json.dumps(out, indent=1))
    if args.json:
        common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
