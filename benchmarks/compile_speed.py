"""Eager against ``torch.compile`` (``MLIPCalculator(compile=True)``): compile time and time per call.

For each ``equivariant`` preset (``configs/equivariant-<preset>.yaml``, random weights, float32, one
torch thread) on a rattled crystal, two calculators evaluate energy, forces and stress; calls of the
two take turns (eager, compiled, eager, ...) on the same MD-like structures (each call moves the
atoms by a small random step, so the neighbour list is reused or rebuilt as in MD), and we report the
median per call of wall-clock and of process CPU time (robust to other processes sharing the cores).

The first compiled call traces and compiles (``compile s``: with an empty Inductor cache, in a fresh
temporary ``TORCHINDUCTOR_CACHE_DIR``; ``warm s``: a second calculator in the same process after
``torch._dynamo.reset()``, which reuses the on-disk cache, as a later run on the same machine does).
A call on a second structure of another size checks that the compiled function is reused (no new
trace, no recompilation: ``recompiled`` counts Dynamo's graphs beyond the first). ``break-even``
is the number of calls after which the compiled calculator has paid for its compilation::

    python -m benchmarks.compile_speed                         # small and medium on Si-216
    python -m benchmarks.compile_speed --presets medium:skip_per_element=false   # a model override
    python -m benchmarks.compile_speed --presets small --calls 20 --structure Si-216 --second Si-64
    python -m benchmarks.compile_speed --train --presets small --structure Si-64 --batch-structures 4
    python -m benchmarks.compile_speed --export --presets small --structure Cu-108

``--export`` times the AOTInductor package of ``mlip export`` (float32, CPU) against eager instead,
calls taking turns, with the export's wall time.

``--train`` times a training step instead: a batch of ``--batch-structures`` MD-like copies of
``--structure``, energy + forces + stress with ``create_graph`` (a double backward), a loss on all
three and its backward, eager against :class:`~mlip.models.compile.CompiledPotential` (training mode).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from benchmarks import _common as common
except ImportError:  # run as a script: python benchmarks/compile_speed.py
    import _common as common  # type: ignore[no-redef]


def build(preset: str, elements: list[int]) -> Any:
    """The preset's model with random weights (float32, eval mode), ``avg_num_neighbors`` set.

    ``preset`` may carry model overrides: ``medium:skip_per_element=false``.
    """
    import yaml

    from mlip.models.base import build_model

    preset, *overrides = preset.split(":")
    cfg = yaml.safe_load((common.ROOT / "configs" / f"equivariant-{preset}.yaml").read_text())["model"]
    cfg.pop("family")
    cfg.update(elements=elements, avg_num_neighbors=30.0)
    for item in overrides:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    model = build_model("equivariant", cfg).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def steps(atoms: Any, n: int, seed: int = 0) -> list[Any]:
    """``n`` MD-like structures: each moves every atom by a random 0.01 Å step from the previous one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = atoms.copy()
        atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
        out.append(atoms)
    return out


def call(calc: Any, atoms: Any) -> tuple[float, float, dict[str, np.ndarray]]:
    """Wall and CPU seconds of one energy + forces + stress evaluation, and its results."""
    atoms = atoms.copy()
    atoms.calc = calc
    t0, c0 = time.perf_counter(), time.process_time()
    res = {"energy": np.array(atoms.get_potential_energy()), "forces": atoms.get_forces(),
           "stress": atoms.get_stress()}
    return time.perf_counter() - t0, time.process_time() - c0, res


def take_turns(calcs: dict[str, Any], structures: list[Any]) -> dict[str, tuple[float, float]]:
    """Median wall and CPU seconds per call of each calculator, the calculators taking turns on each
    structure (A B A B ...: both see the same load)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calcs}
    for atoms in structures:
        for name, calc in calcs.items():
            times[name].append(call(calc, atoms)[:2])
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


def exported(model: Any, atoms: Any, n_calls: int) -> dict[str, Any]:
    """The AOTInductor package of ``model`` (``mlip export``, float32 CPU) against the eager model:
    export wall seconds, median CPU ms per call of each (calls taking turns), largest force difference."""
    from mlip.calculator import MLIPCalculator
    from mlip.export import export_model

    folder = Path(tempfile.mkdtemp(prefix="mlip-export-bench-"))
    t0 = time.perf_counter()
    export_model(model, folder / "model.pt2")
    export_s = time.perf_counter() - t0
    eager = MLIPCalculator(model, device="cpu", dtype="float32", compute_stress=True)
    package = MLIPCalculator(str(folder / "model.pt2"), device="cpu", compute_stress=True)
    _, _, ref = call(eager, atoms)
    _, _, got = call(package, atoms)
    med = {k: 1e3 * cpu for k, (_, cpu) in take_turns({"eager": eager, "exported": package},
                                                        steps(atoms, n_calls, seed=2)).items()}
    return {"export_s": export_s, "export_eager_cpu_ms": med["eager"], "exported_cpu_ms": med["exported"],
            "exported_forces_diff": float(np.abs(got["forces"] - ref["forces"]).max())}


def run(preset: str, structure: str, second: str, n_calls: int) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    from mlip.calculator import MLIPCalculator

    atoms = common.make_structure(structure)
    model = build(preset, sorted(set(atoms.numbers.tolist())))
    eager = MLIPCalculator(model, device="cpu", dtype="float32", compute_stress=True)
    compiled = MLIPCalculator(model, device="cpu", dtype="float32", compute_stress=True, compile=True)
    call(eager, atoms)  # warm-up (caches, allocator)
    torch._dynamo.reset()
    counters.clear()
    wall_first, cpu_first, first = call(compiled, atoms)
    _, _, ref = call(eager, atoms)
    if compiled.model.failed:  # eager fallback: record why and the eager time
        eager_cpu = statistics.median(call(eager, step)[1] for step in steps(atoms, n_calls))
        return {"preset": preset, "structure": structure, "n_atoms": len(atoms),
                "n_edges": eager.batch_from_atoms(atoms).n_edges, "eager_cpu_ms": 1e3 * eager_cpu,
                "failed": compiled.model.failed, "failed_after_s": wall_first}
    err = {k: float(np.abs(first[k] - ref[k]).max()) for k in ref}
    graphs = counters["stats"]["unique_graphs"]
    med = take_turns({"eager": eager, "compiled": compiled}, steps(atoms, n_calls))
    other = common.make_structure(second)
    wall_other, _, res_other = call(compiled, other)
    _, _, ref_other = call(eager, other)
    err_other = float(np.abs(res_other["forces"] - ref_other["forces"]).max())
    recompiled = counters["stats"]["unique_graphs"] - graphs
    # warm: a new compiled calculator, Dynamo's in-memory state reset, Inductor's disk cache kept
    torch._dynamo.reset()
    again = MLIPCalculator(model, device="cpu", dtype="float32", compute_stress=True, compile=True)
    wall_warm, _, _ = call(again, atoms)
    gain = med["eager"][1] - med["compiled"][1]
    batch = eager.batch_from_atoms(atoms)
    return {
        "preset": preset, "structure": structure, "n_atoms": len(atoms), "n_edges": batch.n_edges,
        "calls": n_calls, "compile_s": wall_first, "compile_cpu_s": cpu_first, "warm_compile_s": wall_warm,
        "eager_wall_ms": 1e3 * med["eager"][0], "eager_cpu_ms": 1e3 * med["eager"][1],
        "compiled_wall_ms": 1e3 * med["compiled"][0], "compiled_cpu_ms": 1e3 * med["compiled"][1],
        "speedup_cpu": med["eager"][1] / med["compiled"][1],
        "break_even_calls": (cpu_first / gain) if gain > 0 else None,
        "max_abs_diff": err, "second": second, "second_n_atoms": len(other), "second_call_s": wall_other,
        "second_forces_diff": err_other, "recompiled": recompiled, "n_compiled": compiled.model.n_compiled,
    }


def run_training(preset: str, structure: str, n_structures: int, n_steps: int) -> dict[str, Any]:
    """One training step (energy, forces and stress with ``create_graph``, a loss on all three, its
    backward) on a batch of ``n_structures`` rattled copies of ``structure``, eager against compiled."""

    from mlip.calculator import MLIPCalculator
    from mlip.data.graph import collate
    from mlip.models.compile import CompiledPotential
    from mlip.models.outputs import predict

    atoms = common.make_structure(structure)
    model = build(preset, sorted(set(atoms.numbers.tolist()))).train()
    for p in model.parameters():
        p.requires_grad_(True)
    graphs = []
    for step in steps(atoms, n_structures, seed=1):  # the calculator's graph of each structure
        graphs += MLIPCalculator(model, device="cpu", dtype="float32").batch_from_atoms(step).split()
    batch = collate(graphs)
    compiled = CompiledPotential(model, training=True, min_graphs=n_structures)

    def step_fn(fn: Any) -> None:
        model.zero_grad(set_to_none=True)
        out = fn(batch)
        loss = (out["energy"] ** 2).mean() + (out["forces"] ** 2).mean() + (out["stress"] ** 2).mean()
        loss.backward()

    eager = lambda b: predict(model, b, forces=True, stress=True, create_graph=True)
    comp = lambda b: compiled.predict(b, forces=True, stress=True, create_graph=True)
    step_fn(eager)
    t0, c0 = time.perf_counter(), time.process_time()
    step_fn(comp)
    wall_first, cpu_first = time.perf_counter() - t0, time.process_time() - c0
    if compiled.failed:
        raise RuntimeError(f"{preset}: training compilation failed: {compiled.failed}")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(n_steps):
        for name, fn in (("eager", eager), ("compiled", comp)):
            c0 = time.process_time()
            step_fn(fn)
            times[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    gain = med["eager"] - med["compiled"]
    return {"preset": preset, "structure": f"{n_structures} x {structure}", "n_atoms": batch.n_atoms,
            "n_edges": batch.n_edges, "compile_s": wall_first, "compile_cpu_s": cpu_first,
            "eager_step_cpu_ms": 1e3 * med["eager"], "compiled_step_cpu_ms": 1e3 * med["compiled"],
            "speedup_cpu": med["eager"] / med["compiled"], "break_even_steps": cpu_first / gain if gain > 0 else None}


def training_table(rows: list[dict[str, Any]]) -> str:
    header = ["preset", "batch", "atoms", "edges", "eager step CPU ms", "compiled step CPU ms", "speed-up",
              "compile s (cold)", "break-even steps"]
    out = [[r["preset"], r["structure"], r["n_atoms"], r["n_edges"], f"{r['eager_step_cpu_ms']:.0f}",
            f"{r['compiled_step_cpu_ms']:.0f}", f"{r['speedup_cpu']:.2f}x", f"{r['compile_s']:.0f}",
            "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"] for r in rows]
    return common.markdown_table(header, out)


def table(rows: list[dict[str, Any]]) -> str:
    header = ["preset", "structure", "atoms", "edges", "eager CPU ms", "compiled CPU ms", "speed-up",
              "compile s (cold)", "compile s (warm cache)", "break-even calls", "max |ΔF| eV/Å",
              "2nd size: s, recompiled"]
    out = []
    for r in rows:
        if "failed" in r:
            out.append([r["preset"], r["structure"], r["n_atoms"], r["n_edges"], f"{r['eager_cpu_ms']:.0f}",
                        "not compiled", "", f"refused after {r['failed_after_s']:.0f} s", "", "", "", r["failed"]])
            continue
        be = "never" if r["break_even_calls"] is None else f"{r['break_even_calls']:.0f}"
        out.append([r["preset"], r["structure"], r["n_atoms"], r["n_edges"], f"{r['eager_cpu_ms']:.0f}",
                    f"{r['compiled_cpu_ms']:.0f}", f"{r['speedup_cpu']:.2f}x", f"{r['compile_s']:.0f}",
                    f"{r['warm_compile_s']:.0f}", be, f"{r['max_abs_diff']['forces']:.1e}",
                    f"{r['second']} ({r['second_n_atoms']}): {r['second_call_s']:.2f} s, {r['recompiled']}"])
    return common.markdown_table(header, out)


def export_table(rows: list[dict[str, Any]]) -> str:
    header = ["preset", "structure", "atoms", "eager CPU ms", "exported CPU ms", "speed-up", "export s",
              "max |ΔF| eV/Å"]
    out = [[r["preset"], r["structure"], r["n_atoms"], f"{r['export_eager_cpu_ms']:.0f}",
            f"{r['exported_cpu_ms']:.0f}", f"{r['export_eager_cpu_ms'] / r['exported_cpu_ms']:.2f}x",
            f"{r['export_s']:.0f}", f"{r['exported_forces_diff']:.1e}"] for r in rows]
    return common.markdown_table(header, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,medium")
    ap.add_argument("--structure", default="Si-216")
    ap.add_argument("--second", default="Si-64", help="a structure of another size, for the reuse check")
    ap.add_argument("--calls", type=int, default=10, help="timed calls per calculator")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/compile_speed.json")
    ap.add_argument("--train", action="store_true",
                    help="time a training step (forces in the loss: double backward) instead of calculator calls")
    ap.add_argument("--batch-structures", type=int, default=4, help="with --train: structures per batch")
    ap.add_argument("--export", action="store_true",
                    help="time the AOTInductor package (mlip export) against eager instead of torch.compile")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the usual Inductor cache (the first compile may then be warm)")
    args = ap.parse_args()
    if not args.keep_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlip-compile-bench-")
    import torch

    torch.set_num_threads(args.threads)
    env = common.environment()
    rows = []
    for preset in args.presets.split(","):
        if args.train:
            rows.append(run_training(preset, args.structure, args.batch_structures, args.calls))
        elif args.export:
            atoms = common.make_structure(args.structure)
            model = build(preset, sorted(set(atoms.numbers.tolist())))
            rows.append({"preset": preset, "structure": args.structure, "n_atoms": len(atoms),
                         **exported(model, atoms, args.calls)})
        else:
            rows.append(run(preset, args.structure, args.second, args.calls))
        print(json.dumps(rows[-1]), flush=True)
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(training_table(rows) if args.train else export_table(rows) if args.export else table(rows))
    print(f"\n{common.describe(env)}; load average at the end {env['load_average_end']}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
