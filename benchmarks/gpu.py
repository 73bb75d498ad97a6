"""The GPU check: one prepared command that exercises the whole GPU path in minutes.

Run it first whenever a GPU is available, from the repository root::

    python -m benchmarks gpu                       # one GPU, under 8 minutes: benchmarks/results/gpu.json
    python -m benchmarks gpu --out FILE            # the JSON elsewhere
    python -m benchmarks gpu --smoke               # the same code path on the CPU (Triton's interpreter), tiny sizes

It runs, in this order (each part within its own time budget, so the whole stays under 8 minutes;
what a budget cuts is recorded as skipped, never dropped):

1. **Kernel parity** (``kernels.parity``): every fused Triton op (``conv_tp_spline``, ``conv_tp``,
   ``grid_product``) against the torch reference, float32 and float64, forward, backward and
   double backward, on random tensors at model sizes (C = 64 and 128, l up to 3, 10^5 and 10^6
   edges), through :func:`mlip.kernels.op_check.check_ops` with its tolerances (those of the CPU
   tests). A mismatch, an error or an out-of-memory is reported, and the rest goes on.
2. **Model** (``model``): energy + forces + stress of the ``equivariant`` small and medium presets
   (``configs/equivariant-*.yaml``), float32, µs per atom at about 10^3, 10^4 and 10^5 atoms of fcc
   Cu and diamond Si, ``kernel: torch`` against ``kernel: triton`` (same weights), with their
   largest energy and force differences.
3. **Largest cell** (``max_atoms``): per preset, the Triton model on a Si cell doubled until it
   runs out of GPU memory (caught).
4. **MD** (``md``): atoms·steps/s of velocity Verlet through the ASE calculator (one large cell)
   and batched through the TorchSim interface (many small cells), and the CUDA cell-list build
   time (``neighbor_list(backend="torch")``) at 10^4 and 10^5 atoms.
5. **Kernel timings** (``kernels.timings``): forward, forward+backward and
   forward+backward+double backward of the edge tensor product at MACE-medium shapes (C = 128,
   l = (1, 3, 3), 10^5 and 10^6 edges): Triton (``conv_tp`` and ``conv_tp_spline``), the torch
   reference and, where installed, e3nn, cuEquivariance and OpenEquivariance
   (:mod:`benchmarks.tp_kernels`; ``pip install -e ".[bench]"``).

The JSON (written after every part, so a run cut short keeps what it measured) holds
``environment`` (device, torch/triton/CUDA versions, date, command) and the sections ``kernels``,
``model``, ``max_atoms``, ``md``; a table of every figure is printed at the end. The exit status is
1 when a parity check failed. Keep the JSON of a GPU run under ``benchmarks/results/`` and copy the
table into ``docs/benchmarks.md``.

``--smoke`` runs all of it on the CPU with ``TRITON_INTERPRET=1`` at tiny sizes (and the presets'
channels cut to 4) in well under a minute, writing the same sections; ``tests/test_gpu_check.py``
runs it, so this script keeps working while no GPU is around. Without a GPU and without
``--smoke`` it says so and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
SMOKE_OUT = ROOT / "benchmarks" / "results" / "gpu_smoke.json"
ELEMENTS = [14, 29]  # one model for both test crystals: Si (diamond) and Cu (fcc)


# --------------------------------------------------------------------------------------------
# what to run: the GPU plan and the CPU smoke plan differ only in sizes and budgets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParityCase:
    """One op at one size: ``lmax`` is the degree of the harmonics and outputs, ``lmax_in`` of the
    convolution's node input (the model's layers: 0, then ``hidden_lmax``)."""

    op: str
    lmax_in: int
    lmax: int
    channels: int
    n_nodes: int
    n_edges: int
    dtypes: tuple[str, ...] = ("float32", "float64")


@dataclass(frozen=True)
class Plan:
    parity: tuple[ParityCase, ...]
    #: kernel timings: (lmax triple, channels, edges); nodes = edges / 30
    kernel_shapes: tuple[tuple[tuple[int, int, int], int, int], ...]
    kernel_peers: tuple[str, ...]
    repeats: int
    warmup: int
    #: stop repeating a timing once its timed calls took this long together (large systems)
    max_timing_s: float
    #: preset overrides (the smoke run cuts the channels)
    preset_overrides: dict[str, Any]
    presets: tuple[str, ...]
    model_sizes: tuple[int, ...]  # about this many atoms of each crystal
    max_atoms_start: int
    max_atoms_cap: int | None  # None: double until out of memory
    md_ase_atoms: int
    md_steps: int
    torchsim_cells: int
    torchsim_cell_atoms: int
    neighbor_sizes: tuple[int, ...]
    #: seconds per part; the whole run also stops starting new work at ``total_s``
    budgets: dict[str, float]
    total_s: float
    #: Triton interpreter block sizes (smoke only), for the parity checks (several edge and channel
    #: blocks per program) and for the rest (large edge blocks: the interpreter's cost is per block)
    interpret_blocks: dict[str, int] = field(default_factory=dict)
    interpret_blocks_model: dict[str, int] = field(default_factory=dict)


GPU_PLAN = Plan(
    parity=(
        # the medium preset's layers (C 128, harmonics l 3, hidden l 1): the fused-spline force path
        ParityCase("conv_tp_spline", 1, 3, 128, 3_334, 100_000),
        ParityCase("grid_product", 1, 1, 128, 30_000, 0),
        # the small preset's second layer (C 64, l 2) at 10^6 edges (its first, l_in 0, below)
        ParityCase("conv_tp_spline", 1, 2, 64, 33_334, 1_000_000, ("float32",)),
        ParityCase("conv_tp", 1, 3, 128, 3_334, 100_000),
        ParityCase("conv_tp_spline", 0, 3, 128, 3_334, 100_000),
        ParityCase("grid_product", 3, 3, 64, 10_000, 0),
        ParityCase("conv_tp_spline", 0, 2, 64, 33_334, 1_000_000, ("float32",)),
        ParityCase("conv_tp_spline", 1, 2, 64, 10_000, 300_000, ("float64",)),
    ),
    kernel_shapes=(((1, 3, 3), 128, 100_000), ((1, 3, 3), 128, 1_000_000)),
    kernel_peers=("e3nn", "cueq", "oeq"),
    repeats=5,
    warmup=2,
    max_timing_s=2.0,
    preset_overrides={},
    presets=("small", "medium"),
    model_sizes=(1_000, 10_000, 100_000),
    max_atoms_start=100_000,
    max_atoms_cap=None,
    md_ase_atoms=10_000,
    md_steps=20,
    torchsim_cells=128,
    torchsim_cell_atoms=32,
    neighbor_sizes=(10_000, 100_000),
    budgets={"parity": 150.0, "model": 110.0, "max_atoms": 60.0, "md": 45.0, "kernels": 75.0},
    total_s=465.0,
)

SMOKE_PLAN = Plan(
    parity=(
        ParityCase("conv_tp_spline", 1, 1, 6, 5, 24),
        ParityCase("conv_tp", 1, 1, 6, 5, 24),
        ParityCase("grid_product", 1, 1, 6, 5, 0),
    ),
    kernel_shapes=(((1, 1, 1), 4, 24),),
    kernel_peers=("e3nn", "cueq", "oeq"),
    repeats=1,
    warmup=1,
    max_timing_s=2.0,
    # the presets' code path at a size the interpreter runs in seconds: 4 channels, degree 1
    preset_overrides={"num_channels": 4, "spline_knots": 6, "lmax": 1, "hidden_lmax": 1},
    presets=("small", "medium"),
    model_sizes=(8,),
    max_atoms_start=8,
    max_atoms_cap=8,
    md_ase_atoms=32,
    md_steps=3,
    torchsim_cells=2,
    torchsim_cell_atoms=4,
    neighbor_sizes=(108, 500),
    budgets={"parity": 120.0, "model": 120.0, "max_atoms": 60.0, "md": 60.0, "kernels": 60.0},
    total_s=170.0,
    interpret_blocks={"BLOCK_E": 8, "BLOCK_C": 4},
    interpret_blocks_model={"BLOCK_E": 64, "BLOCK_C": 4},
)


# --------------------------------------------------------------------------------------------
# bookkeeping: time budgets, failures that are recorded and not raised
# --------------------------------------------------------------------------------------------
class Budget:
    """Seconds left for one part, never past the whole run's deadline."""

    def __init__(self, seconds: float, parent: Budget | None = None) -> None:
        end = time.monotonic() + seconds
        self.deadline = min(end, parent.deadline) if parent is not None else end

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(fn: Callable[[], dict[str, Any]], device, budget: Budget | None = None) -> dict[str, Any]:
    """``{"status": "ok", **fn()}``, or the reason it did not run or failed: ``skipped`` (time budget,
    an optional package not installed, a peer that runs on CUDA only), ``out of memory``, ``error``
    (with the exception). Never raises: the rest of the run goes on."""
    from benchmarks.tp_kernels import PeerUnavailable

    if budget is not None and budget.spent():
        return {"status": "skipped", "reason": "time budget"}
    try:
        return {"status": "ok", **fn()}
    except (ImportError, PeerUnavailable) as err:
        return {"status": "skipped", "reason": f"{type(err).__name__}: {str(err)[:200]}"}
    except _oom_types() as err:
        _free(device)
        return {"status": "out of memory", "reason": str(err).splitlines()[0][:200]}
    except Exception as err:  # noqa: BLE001 - recorded in the JSON and printed, then the run goes on
        _free(device)
        traceback.print_exc(file=sys.stderr)
        return {"status": "error", "reason": f"{type(err).__name__}: {str(err)[:300]}"}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# 1. kernel parity
# --------------------------------------------------------------------------------------------
def run_parity(plan: Plan, device, budget: Budget) -> list[dict[str, Any]]:
    """Each case and dtype through ``check_ops(double_backward=True)``: errors per output/gradient."""
    import torch

    from mlip.kernels import BACKENDS
    from mlip.kernels.op_check import check_ops

    records = []
    # float32 first (the models' dtype: its kernels are compiled once for the parts after this one),
    # then float64; a time budget cuts float64 cases first
    order = [(case, d) for d in ("float32", "float64") for case in plan.parity if d in case.dtypes]
    for case, dtype_name in order:
        rec = {**dataclasses.asdict(case), "dtype": dtype_name}
        del rec["dtypes"]

        def one(case=case, dtype_name=dtype_name):
            t0 = time.perf_counter()
            (check,) = check_ops(BACKENDS["triton"], device, getattr(torch, dtype_name), lmax=case.lmax,
                                 lmax_in=case.lmax_in, channels=case.channels, ops=(case.op,),
                                 n_nodes=case.n_nodes, n_edges=max(case.n_edges, 1), double_backward=True)
            _sync(device)
            worst = max(check.errors, key=check.errors.get)
            return {"passed": check.ok, "tolerance": check.tolerance, "errors": check.errors,
                    "worst": worst, "worst_error": check.errors[worst], "seconds": time.perf_counter() - t0}

        rec.update(attempt(one, device, budget))
        if rec["status"] != "ok":
            rec["passed"] = False
        records.append(rec)
        _log(f"parity {case.op} l=({case.lmax_in},{case.lmax},{case.lmax}) C={case.channels} "
             f"E={case.n_edges} {dtype_name}: {rec['status']}"
             + (f", worst {rec['worst']} {rec['worst_error']:.1e}" if rec["status"] == "ok" else
                f" ({rec.get('reason', '')})"))
        _free(device)
    return records


# --------------------------------------------------------------------------------------------
# 2./3. model: µs per atom, torch vs triton; the largest cell
# --------------------------------------------------------------------------------------------
def preset_config(name: str, overrides: dict[str, Any], kernel: str) -> dict[str, Any]:
    """The ``model`` section of ``configs/equivariant-<name>.yaml`` for a Si + Cu model."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / f"equivariant-{name}.yaml").read_text())["model"]
    cfg.pop("family")
    cfg.update({"elements": ELEMENTS, "avg_num_neighbors": 30.0, **overrides, "kernel": kernel})
    return cfg


_PAIRS: dict[str, dict] = {}


def build_pair(name: str, plan: Plan, device):
    """The preset built twice with the same weights, float32, eval: ``{"torch": m, "triton": m}``
    (built once per run: the model and largest-cell parts share it, and the Triton model's
    first-forward check against the reference runs once)."""
    if name in _PAIRS:
        return _PAIRS[name]
    import torch

    from mlip.models.base import build_model

    models = {}
    for kernel in ("torch", "triton"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            models[kernel] = build_model("equivariant", preset_config(name, plan.preset_overrides, kernel))
    models["triton"].load_state_dict(models["torch"].state_dict())
    _PAIRS[name] = {k: m.to(device=device, dtype=torch.float32).eval() for k, m in models.items()}
    return _PAIRS[name]


def crystal(element: str, n_atoms: int, seed: int = 1):
    """Rattled fcc Cu (4 atoms per cubic cell) or diamond Si (8) with about ``n_atoms`` atoms."""
    from benchmarks._common import crystal as exact_crystal

    per_cell = {"Cu": 4, "Si": 8}[element]
    k = max(1, round((n_atoms / per_cell) ** (1 / 3)))
    atoms = exact_crystal(element, per_cell * k**3)
    if seed != 1:
        atoms.rattle(0.05, seed=seed)
    return atoms


def make_batch(model, atoms, device):
    """The calculator's one-structure batch (edges from its neighbour list on ``device``)."""
    from mlip.calculator import MLIPCalculator

    return MLIPCalculator(model, device=device, dtype="float32").batch_from_atoms(atoms)


def time_model(model, batch, plan: Plan, device, keep: dict) -> dict[str, Any]:
    """Median energy + forces + stress time of ``model`` on ``batch`` and the peak GPU memory; the
    energy and forces of the last call go to ``keep``."""
    from benchmarks.tp_kernels import time_ms
    from mlip.models.outputs import predict

    def call():
        out = predict(model, batch, forces=True, stress=True)
        keep.update(energy=out["energy"].detach(), forces=out["forces"].detach())

    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    ms, _ = time_ms(call, plan.repeats, plan.warmup, device, max_s=plan.max_timing_s)
    out = {"ms": ms, "us_per_atom": 1e3 * ms / batch.n_atoms}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def model_structure(pair: dict, preset: str, element: str, size: int, plan: Plan, device,
                    budget: Budget) -> list[dict[str, Any]]:
    """Both backends on one crystal: timings, and the Triton result's largest differences from torch."""
    atoms = crystal(element, size)
    got = attempt(lambda: {"batch": make_batch(pair["triton"], atoms, device)}, device)
    if got["status"] != "ok":
        return [{"preset": preset, "structure": element, "n_atoms": len(atoms), **got}]
    batch = got["batch"]
    results, outputs = {}, {}
    for kernel, model in pair.items():
        rec = {"preset": preset, "structure": element, "n_atoms": batch.n_atoms, "n_edges": batch.n_edges,
               "backend": kernel}
        outputs[kernel] = {}
        rec.update(attempt(lambda model=model, kernel=kernel: time_model(model, batch, plan, device, outputs[kernel]),
                           device, budget))
        results[kernel] = rec
        _log(f"model {preset} {element} {batch.n_atoms} atoms {kernel}: {rec['status']}"
             + (f", {rec['us_per_atom']:.2f} us/atom" if rec["status"] == "ok" else ""))
    if all(r["status"] == "ok" for r in results.values()):
        a, b = outputs["triton"], outputs["torch"]
        results["triton"].update(max_abs_dE_per_atom=float((a["energy"] - b["energy"]).abs().max()) / batch.n_atoms,
                                 max_abs_dF=float((a["forces"] - b["forces"]).abs().max()))
    return list(results.values())


def run_model(plan: Plan, device, budget: Budget) -> list[dict[str, Any]]:
    """Sizes in ascending order, both presets at each: a time budget cuts the largest systems first."""
    records = []
    for size in plan.model_sizes:
        for preset in plan.presets:
            pair = build_pair(preset, plan, device)
            for element in ("Cu", "Si"):
                if budget.spent():
                    records.append({"preset": preset, "structure": element, "target_atoms": size,
                                    "status": "skipped", "reason": "time budget"})
                    continue
                records += model_structure(pair, preset, element, size, plan, device, budget)
                _free(device)
    return records


def fits(model, atoms, device) -> dict[str, Any]:
    """Energy + forces + stress of ``atoms`` (raises when out of memory): sizes, time, peak memory."""
    from mlip.models.outputs import predict

    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    batch = make_batch(model, atoms, device)
    t0 = time.perf_counter()
    predict(model, batch, forces=True, stress=True)
    _sync(device)
    out = {"n_atoms": batch.n_atoms, "n_edges": batch.n_edges, "seconds": time.perf_counter() - t0}
    if device.type == "cuda":
        import torch

        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def largest_cell(model, preset: str, plan: Plan, device, budget: Budget) -> dict[str, Any]:
    """Double a Si cell (its shortest axis, so it stays compact) until it does not fit."""
    base = crystal("Si", plan.max_atoms_start)
    reps, largest, stop, tried = [1, 1, 1], None, "", None
    while True:
        atoms = base.repeat(reps)
        if plan.max_atoms_cap is not None and len(atoms) > plan.max_atoms_cap:
            stop = f"size cap {plan.max_atoms_cap} (smoke run)"
            break
        if budget.spent():
            stop = "time budget"
            break
        tried = len(atoms)
        got = attempt(lambda atoms=atoms: fits(model, atoms, device), device)
        if got["status"] != "ok":
            stop = got["status"] + (f": {got['reason']}" if got.get("reason") else "")
            break
        largest = got
        _log(f"max_atoms {preset}: {got['n_atoms']} atoms fit ({got['seconds']:.2f} s)")
        reps[reps.index(min(reps))] *= 2
    rec = {"preset": preset, "backend": "triton", "structure": "Si", "stopped_by": stop, "next_tried": tried}
    if largest is None:
        return {**rec, "status": "error", "reason": f"not even the first cell fits ({stop})"}
    return {**rec, "status": "ok", "largest_atoms": largest["n_atoms"], "largest_edges": largest["n_edges"],
            "seconds": largest["seconds"], **({"peak_gib": largest["peak_gib"]} if "peak_gib" in largest else {})}


def run_max_atoms(plan: Plan, device, budget: Budget) -> list[dict[str, Any]]:
    """Per preset: the Triton model's energy + forces + stress on a Si cell doubled from about
    ``max_atoms_start`` atoms until it runs out of memory, the time budget ends or (smoke) the size
    cap is passed."""
    records = [largest_cell(build_pair(preset, plan, device)["triton"], preset, plan, device, budget)
               for preset in plan.presets]
    _PAIRS.clear()  # the last part that uses them
    _free(device)
    return records


# --------------------------------------------------------------------------------------------
# 4. MD
# --------------------------------------------------------------------------------------------
def md_model(plan: Plan, device):
    """The small preset with ``kernel: auto`` (Triton on a GPU, the reference on the CPU), float32."""
    import torch

    from mlip.models.base import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("equivariant", preset_config("small", plan.preset_overrides, "auto"))
    return model.to(device=device, dtype=torch.float32).eval()


def ase_md(model, plan: Plan, device) -> dict[str, Any]:
    """Velocity Verlet through :class:`~mlip.calculator.MLIPCalculator` on one Cu cell."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from benchmarks._common import with_velocities
    from mlip.calculator import MLIPCalculator

    atoms = with_velocities(crystal("Cu", plan.md_ase_atoms))
    atoms.calc = MLIPCalculator(model, device=device, dtype="float32")
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(2)  # warm-up: first neighbour list, kernel compilation, the backend's self-check
    _sync(device)
    t0 = time.perf_counter()
    dyn.run(plan.md_steps)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"n_atoms": len(atoms), "steps": plan.md_steps, "seconds": dt,
            "atom_steps_per_s": len(atoms) * plan.md_steps / dt, "neighbor_builds": atoms.calc.neighbors.n_builds}


def torchsim_md(model, plan: Plan, device) -> dict[str, Any]:
    """TorchSim's batched NVE integrator through :class:`~mlip.calculator.torchsim.MLIPTorchSimModel`
    on many small Cu cells (one model call per step for all of them)."""
    import torch
    import torch_sim as ts

    from benchmarks._common import with_velocities
    from mlip.calculator.torchsim import MLIPTorchSimModel

    systems = [with_velocities(crystal("Cu", plan.torchsim_cell_atoms, seed=2 + i)) for i in range(plan.torchsim_cells)]
    ts_model = MLIPTorchSimModel(model, device=device, dtype=torch.float32)

    def run(n_steps: int):
        return ts.integrate(system=systems, model=ts_model, integrator=ts.nve, n_steps=n_steps, temperature=300.0,
                            timestep=0.001)

    run(2)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    run(plan.md_steps)
    _sync(device)
    dt = time.perf_counter() - t0
    n_atoms = sum(len(a) for a in systems)
    return {"n_systems": len(systems), "n_atoms": n_atoms, "steps": plan.md_steps, "seconds": dt,
            "atom_steps_per_s": n_atoms * plan.md_steps / dt}


def neighbor_build(n_atoms: int, plan: Plan, device, budget: Budget) -> dict[str, Any]:
    """Median build time of the torch cell list on ``device`` (:mod:`benchmarks.neighbors`)."""
    from benchmarks.neighbors import fcc_supercell, time_backend

    pos, cell, pbc = (t.to(device) for t in fcc_supercell(n_atoms))
    seconds, n_edges = time_backend("torch", pos, cell, pbc, 5.0, plan.repeats, budget_s=max(budget.left(), 1.0))
    return {"n_atoms": int(pos.shape[0]), "n_edges": n_edges, "r_max": 5.0, "ms": 1e3 * seconds}


def run_md(plan: Plan, device, budget: Budget) -> dict[str, Any]:
    model = md_model(plan, device)
    out: dict[str, Any] = {"backend": model.kernel_backend.name}
    out["ase"] = attempt(lambda: ase_md(model, plan, device), device, budget)
    _log(f"md ase: {out['ase']['status']} {out['ase'].get('reason', '')}")
    out["torchsim"] = attempt(lambda: torchsim_md(model, plan, device), device, budget)
    _log(f"md torchsim: {out['torchsim']['status']} {out['torchsim'].get('reason', '')}")
    out["neighbors"] = []
    for n in plan.neighbor_sizes:
        rec = {"backend": "torch", "target_atoms": n, **attempt(lambda n=n: neighbor_build(n, plan, device, budget),
                                                                device, budget)}
        out["neighbors"].append(rec)
        _log(f"md neighbours {n}: {rec['status']}")
    return out


# --------------------------------------------------------------------------------------------
# 5. kernel timings
# --------------------------------------------------------------------------------------------
def kernel_shape(lmax: tuple[int, int, int], c: int, n_edges: int, plan: Plan, device,
                 budget: Budget) -> list[dict[str, Any]]:
    """The three passes of every implementation at one shape."""
    import torch

    from benchmarks import tp_kernels as tk

    dtype = torch.float32
    n_nodes = max(4, round(n_edges / 30))
    shape = {"lmax": list(lmax), "channels": c, "n_edges": n_edges, "n_nodes": n_nodes, "dtype": "float32"}
    x, y, w, sender, receiver = tk.random_problem(lmax, n_nodes, n_edges, c, dtype, device)
    vals, idx, table = tk.spline_problem(lmax, n_edges, c, dtype, device)
    builders = tk.peer_builders(lmax, n_nodes, sender, receiver, c, dtype)
    # (label, () -> (conv, its radial input)): peers take edge_weights, the spline rows spline values
    impls: list[tuple[str, Callable[[], tuple[Callable, Any]]]] = [
        ("triton", lambda: (tk.impl_ours(lmax, n_nodes, sender, receiver, "triton"), w)),
        ("torch", lambda: (tk.impl_ours(lmax, n_nodes, sender, receiver, "torch"), w)),
        ("triton spline", lambda: (tk.impl_spline(lmax, n_nodes, sender, receiver, idx, table, "triton"), vals)),
        ("torch spline", lambda: (tk.impl_spline(lmax, n_nodes, sender, receiver, idx, table, "torch"), vals)),
    ] + [(peer, lambda peer=peer: (builders[peer]()[0], w)) for peer in plan.kernel_peers]
    records = []
    for label, make in impls:
        built = attempt(lambda make=make: dict(zip(("conv", "radial"), make())), device, budget)
        if built["status"] != "ok":
            records.append({**shape, "impl": label, "pass": "all", **built})
            _log(f"kernels {label}: {built['status']} ({built.get('reason', '')})")
            continue
        for pname, work in tk.passes(built["conv"], x, y, built["radial"]).items():
            def timed(work=work):
                ms, mib = tk.time_ms(work, plan.repeats, plan.warmup, device, max_s=plan.max_timing_s)
                return {"ms": ms, **({"peak_mib": mib} if not math.isnan(mib) else {})}

            rec = {**shape, "impl": label, "pass": pname, **attempt(timed, device, budget)}
            records.append(rec)
            _log(f"kernels {label} {pname} E={n_edges}: {rec['status']}"
                 + (f" {rec['ms']:.3f} ms" if rec["status"] == "ok" else ""))
        built.clear()
        _free(device)
    return records


def run_kernel_timings(plan: Plan, device, budget: Budget) -> list[dict[str, Any]]:
    """The three passes of each implementation at each shape (:mod:`benchmarks.tp_kernels`)."""
    records = []
    for lmax, c, n_edges in plan.kernel_shapes:
        got = attempt(lambda lmax=lmax, c=c, n_edges=n_edges: {"records": kernel_shape(lmax, c, n_edges, plan, device,
                                                                                      budget)}, device, budget)
        if got["status"] == "ok":
            records += got["records"]
        else:
            records.append({"lmax": list(lmax), "channels": c, "n_edges": n_edges, "impl": "all", **got})
        _free(device)
    return records


# --------------------------------------------------------------------------------------------
# the run, the JSON and the table
# --------------------------------------------------------------------------------------------
def environment(device, smoke: bool) -> dict[str, Any]:
    import torch

    from benchmarks._common import environment as host_environment

    env = host_environment()
    env["smoke"] = smoke
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({env['cpu']})"
    env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


def _fmt(v: Any, spec: str = ".3g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def table(result: dict[str, Any]) -> str:
    """Markdown tables of every figure (the docs/benchmarks.md GPU section prints these)."""
    from benchmarks._common import markdown_table

    out = [f"Device: {result['environment']['device']}; torch {result['environment'].get('torch')}, "
           f"triton {result['environment'].get('triton')}, CUDA {result['environment'].get('cuda')}; "
           f"{result['environment']['date']}" + (" (smoke run: CPU, interpreter, tiny sizes)" if result['environment']['smoke'] else "")]
    k = result.get("kernels", {})
    rows = [[r["op"], f"({r['lmax_in']},{r['lmax']},{r['lmax']})", r["channels"], r["n_edges"] or r["n_nodes"], r["dtype"],
             r["status"] if r["status"] != "ok" else ("pass" if r["passed"] else "FAIL"),
             f"{r.get('worst', '')} {_fmt(r.get('worst_error', ''), '.1e')}".strip(), _fmt(r.get("tolerance", ""), ".0e")]
            for r in k.get("parity", [])]
    out += ["", "Kernel parity (forward, backward, double backward vs the torch reference)", "",
            markdown_table(["op", "l", "C", "edges (rows)", "dtype", "result", "worst error", "tolerance"], rows)]
    rows = []
    for r in result.get("model", []):
        if r.get("backend") != "triton" and r["status"] != "skipped":
            continue
        torch_rec = next((t for t in result["model"] if t.get("backend") == "torch" and t["preset"] == r["preset"]
                          and t["structure"] == r["structure"] and t.get("n_atoms") == r.get("n_atoms")), {})
        tt, tr = torch_rec.get("us_per_atom"), r.get("us_per_atom")
        rows.append([r["preset"], r["structure"], r.get("n_atoms", r.get("target_atoms")), r.get("n_edges", ""),
                     _fmt(tt) if tt else torch_rec.get("status", "-"), _fmt(tr) if tr else r["status"],
                     _fmt(tt / tr, ".2f") if tt and tr else "-", _fmt(r.get("max_abs_dF", "-"), ".1e")])
    out += ["", "Model: energy + forces + stress, float32, µs per atom", "",
            markdown_table(["preset", "crystal", "atoms", "edges", "torch", "triton", "speed-up", "max |dF| eV/Å"], rows)]
    rows = [[r["preset"], r.get("largest_atoms", "-"), r.get("largest_edges", "-"), _fmt(r.get("peak_gib", "-")),
             r.get("stopped_by", r.get("reason", ""))] for r in result.get("max_atoms", [])]
    out += ["", "Largest Si cell that fits (Triton, float32, energy + forces + stress)", "",
            markdown_table(["preset", "atoms", "edges", "peak GiB", "stopped by"], rows)]
    md = result.get("md", {})
    rows = []
    for name in ("ase", "torchsim"):
        r = md.get(name, {})
        rows.append([name, r.get("n_atoms", "-"), r.get("n_systems", 1 if r.get("n_atoms") else "-"),
                     _fmt(r["atom_steps_per_s"]) if r.get("status") == "ok" else r.get("status", "-")])
    out += ["", f"MD (velocity Verlet, small preset, kernel {md.get('backend', '?')})", "",
            markdown_table(["through", "atoms", "systems", "atoms·steps/s"], rows)]
    rows = [[r.get("n_atoms", r["target_atoms"]), r.get("n_edges", "-"), _fmt(r["ms"]) if r["status"] == "ok" else r["status"]]
            for r in md.get("neighbors", [])]
    out += ["", "Cell-list neighbour build (backend torch, r_max 5 Å, fcc Cu)", "",
            markdown_table(["atoms", "edges", "ms"], rows)]
    rows = [[f"{tuple(r['lmax'])}", r["n_edges"], r["impl"], r.get("pass", ""),
             _fmt(r["ms"]) if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:50]}",
             _fmt(r.get("peak_mib", "-"), ".0f")] for r in k.get("timings", [])]
    out += ["", "Edge tensor product timings (float32, ms)", "",
            markdown_table(["l", "edges", "impl", "pass", "ms", "peak MiB"], rows)]
    return "\n".join(out)


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT.relative_to(ROOT)}; "
                    f"--smoke: {SMOKE_OUT.relative_to(ROOT)})")
    ap.add_argument("--smoke", action="store_true", help="the same code path on the CPU under TRITON_INTERPRET=1, tiny sizes")
    args = ap.parse_args(argv)
    started = time.monotonic()
    if args.smoke:
        # the interpreter must be on before triton is first imported (e3nn imports it, too)
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("gpu --smoke: triton was imported before TRITON_INTERPRET=1 could be set; "
                     "run it as its own process (python -m benchmarks gpu --smoke)")
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"  # a GPU run times the real kernels, never the interpreter
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu: no CUDA device; run python -m benchmarks gpu --smoke for the same code path on the CPU.")
        return 0
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    device = torch.device("cpu" if args.smoke else "cuda")
    out_path = args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)
    from mlip.kernels.triton import conv

    conv.INTERPRET_BLOCKS.update(plan.interpret_blocks)
    total = Budget(plan.total_s)
    result: dict[str, Any] = {"environment": environment(device, args.smoke),
                              "kernels": {"parity": [], "timings": []}, "model": [], "max_atoms": [], "md": {}}
    result["environment"]["budgets_s"] = {**plan.budgets, "total": plan.total_s}
    parts = (
        ("parity", lambda b: result["kernels"].__setitem__("parity", run_parity(plan, device, b))),
        ("model", lambda b: result.__setitem__("model", run_model(plan, device, b))),
        ("max_atoms", lambda b: result.__setitem__("max_atoms", run_max_atoms(plan, device, b))),
        ("md", lambda b: result.__setitem__("md", run_md(plan, device, b))),
        ("kernels", lambda b: result["kernels"].__setitem__("timings", run_kernel_timings(plan, device, b))),
    )
    for name, run in parts:
        if plan.interpret_blocks_model and name == "model":
            conv.INTERPRET_BLOCKS.update(plan.interpret_blocks_model)
        _log(f"{name}: start ({total.left():.0f} s left in all)")
        t0 = time.monotonic()
        try:
            run(Budget(plan.budgets[name], total))
        except Exception as err:  # noqa: BLE001 - a part that breaks is recorded; the others still run
            traceback.print_exc(file=sys.stderr)
            result.setdefault("part_errors", {})[name] = f"{type(err).__name__}: {err}"
        result["environment"].setdefault("part_seconds", {})[name] = time.monotonic() - t0
        result["environment"]["wall_s"] = time.monotonic() - started
        _write(out_path, result)
    print(table(result))
    print(f"\nwrote {out_path} ({result['environment']['wall_s']:.0f} s)")
    failed = [r for r in result["kernels"]["parity"] if r["status"] in ("ok", "error") and not r["passed"]]
    if failed or result.get("part_errors"):
        print(f"gpu: {len(failed)} parity check(s) failed; part errors: {result.get('part_errors', {})}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
