"""Speed suite: energy + forces (+ stress) per structure for every mlip family and for MACE of the
same size, from a molecule to ~10^4 atoms on CPU, with peak memory and the cost-vs-atoms exponent.

    python -m benchmarks speed                          # the suite (this module's main)
    python -m benchmarks speed --structures molecule-27,Cu-108,Cu-500 --repeats 3
    python -m benchmarks speed --no-md                  # static calls only, skip the MD part

Each code runs in its own worker subprocess with one torch thread (MACE in its own venv,
``--mace-python``); structures go from small to large, and for each one every worker first does
``--warmup`` calls, then the workers take turns, one call each (A B C A B C ...), ``--repeats``
rounds (fewer when one call is slow, see ``--budget``). We report the median wall-clock time and the
median *process CPU time* per call (robust to other processes sharing the cores), and the worker's
peak resident memory after that size (sizes run in ascending order, so it is the peak of the
largest structure so far). The neighbour list (ASE, same edges for every code) is built once per
structure outside the timing. The exponent ``b`` of ``cost ~ n_atoms^b`` is fitted on the crystals
of 500 atoms or more. Output: ``<out>/speed.json``, ``<out>/speed.png`` and a Markdown table; with
MD (default), ``<out>/md_speed.json`` from :mod:`benchmarks.md_speed`.

The engines a worker can build (``spec["kind"]``):

* ``mlip``: a family preset ``configs/<family>-<preset>.yaml`` (with ``config`` overrides), or a
  full ``config`` when ``preset`` is None; timed through :func:`mlip.models.outputs.predict`.
* ``mace``: mace-torch ``ScaleShiftMACE`` with the same channels, ``lmax`` (edge harmonics),
  ``hidden_lmax`` (node features), interactions, correlation and ``r_max`` as the mlip model it is
  compared with (:func:`mace_spec_like`), 8 Bessel functions, radial MLP [64, 64, 64]; random
  weights (speed does not depend on them).
* ``e3nn``: a minimal NequIP-style baseline written with e3nn only (:class:`E3nnBaseline`).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    from benchmarks import _common as common
except ImportError:  # run as a script: python benchmarks/speed.py
    import _common as common  # type: ignore[no-redef]

ELEMENTS = [1, 6, 8, 14, 29]  # H C O Si Cu: every structure the benchmarks build
DEFAULT_STRUCTURES = "molecule-27,Cu-108,Cu-500,Cu-2048,Cu-4000,Cu-10976"
MACE_PYTHON = common.MACE_PYTHON


# ========================================================================== worker side: engines
def _preset(family: str, preset: str) -> dict[str, Any]:
    import yaml

    with open(common.ROOT / "configs" / f"{family}-{preset}.yaml") as fh:
        section = dict(yaml.safe_load(fh)["model"])
    section.pop("family", None)
    return section


def mlip_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The full model config of an ``mlip`` spec: preset, then overrides, then elements."""

    from mlip.models.base import config_fields

    fields = set(config_fields(spec["family"]))
    base = _preset(spec["family"], spec["preset"]) if spec.get("preset") else {}
    # a normalisation the training data would set; a fixed value keeps the runs comparable
    cfg = {**({"avg_num_neighbors": 30.0} if "avg_num_neighbors" in fields else {}), **base, **spec.get("config", {})}
    cfg["elements"] = spec.get("elements", ELEMENTS)
    return cfg


class MlipEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from mlip.models.base import build_model

        self.torch = torch
        self.dtype = getattr(torch, spec.get("dtype", "float32"))
        self.model = build_model(spec["family"], mlip_config(spec)).to(self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.r_max = float(self.model.r_max)
        self.spec = spec

    def static(self, atoms, stress: bool):
        torch = self.torch
        from mlip.data.graph import AtomGraph, collate
        from mlip.models.outputs import predict

        i, j, S = common.ase_edges(atoms, self.r_max)
        graph = AtomGraph(
            positions=torch.tensor(atoms.positions), numbers=torch.tensor(atoms.numbers),
            cell=torch.tensor(atoms.cell.array), pbc=torch.tensor(atoms.pbc),
            edge_index=torch.tensor(np.stack([j, i])), unit_shifts=torch.tensor(S),  # (sender, receiver)
        )
        batch = collate([graph]).to(dtype=self.dtype)
        self.info = {}
        if hasattr(self.model, "frames"):  # frame-averaged: how many frames this structure averages over
            frames = self.model.frames(batch, batch.edge_vectors())
            self.info = {"frames": int(frames.n_frames), "degeneracy": int(frames.degeneracy[0])}
        return (lambda: predict(self.model, batch, forces=True, stress=stress)), len(i)

    def md(self, atoms, skin: float):
        from mlip.calculator import MLIPCalculator

        # MACECalculator always computes stress; do the same work here
        calc = MLIPCalculator(self.model, device="cpu", dtype=self.spec.get("dtype", "float32"), skin=skin,
                              compute_stress=True)
        seen: list[int] = []  # frame-averaged: frames averaged over at each step (recorded, not changed)
        if hasattr(calc.model, "frames"):
            frames = type(calc.model).frames.__get__(calc.model)  # the class method, never a wrapper

            def counted(*args, **kwargs):
                out = frames(*args, **kwargs)
                seen.append(int(out.n_frames))
                return out

            calc.model.frames = counted

        reported = [0]  # steps already covered by an earlier answer

        def extra() -> dict[str, Any]:
            out = {"nl_builds": calc.neighbors.n_builds, "nl_calls": calc.neighbors.n_calls}
            if seen:  # over every step so far (warm-up included), and over the steps of this sample
                recent = seen[reported[0]:] or seen[-1:]
                reported[0] = len(seen)
                out.update(frames_min=min(seen), frames_max=max(seen), frames_sample=sorted(set(recent)))
            return out

        return calc, extra


def mace_model(spec: dict[str, Any]):
    """mace-torch ScaleShiftMACE of the size in ``spec`` (random weights, default dtype of the spec)."""
    import torch
    from e3nn import o3
    from mace.modules import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
    from mace.modules.models import ScaleShiftMACE

    elements = spec.get("elements", ELEMENTS)
    hidden = o3.Irreps("+".join(f"{spec['channels']}x{l}{'e' if l % 2 == 0 else 'o'}"
                                for l in range(spec["hidden_lmax"] + 1)))
    return ScaleShiftMACE(
        r_max=spec["r_max"], num_bessel=8, num_polynomial_cutoff=5, max_ell=spec["lmax"],
        interaction_cls=RealAgnosticResidualInteractionBlock, interaction_cls_first=RealAgnosticInteractionBlock,
        num_interactions=spec["layers"], num_elements=len(elements), hidden_irreps=hidden,
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(elements)),
        avg_num_neighbors=spec.get("avg_num_neighbors", 30.0), atomic_numbers=elements,
        correlation=spec["correlation"], gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64],
        atomic_inter_scale=spec.get("scale", 1.0), atomic_inter_shift=0.0,
    )


class MaceEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        # e3nn 0.4.4 (pinned by mace-torch) keeps python slices in its constants; torch >= 2.6 loads
        # weights_only by default, so allow exactly that type for this trusted package file
        torch.serialization.add_safe_globals([slice])
        self.torch = torch
        self.spec = spec
        self.dtype = getattr(torch, spec.get("dtype", "float32"))
        torch.set_default_dtype(self.dtype)  # MACE builds its buffers in the default dtype
        self.model = mace_model(spec).to(self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.elements = spec.get("elements", ELEMENTS)

    def static(self, atoms, stress: bool):
        torch, dtype = self.torch, self.dtype
        i, j, S = common.ase_edges(atoms, self.spec["r_max"])
        index = {z: k for k, z in enumerate(self.elements)}
        cell = torch.tensor(atoms.cell.array, dtype=dtype)
        one_hot = torch.zeros(len(atoms), len(self.elements), dtype=dtype)
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

        def call():
            d = {k: v.clone() if v.is_floating_point() else v for k, v in data.items()}
            return self.model(d, training=False, compute_force=True, compute_stress=stress)

        return call, len(i)

    def md(self, atoms, skin: float):
        import os
        import tempfile

        from mace.calculators import MACECalculator

        # the calculator loads a saved model file, as a user would; we save the one built here
        path = os.path.join(tempfile.mkdtemp(prefix="mlip-bench-"), "mace.model")
        self.torch.save(self.model, path)
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # our own file; MACE pickles whole modules
        calc = MACECalculator(model_paths=path, device="cpu", default_dtype=self.spec.get("dtype", "float32"))
        return calc, dict


class E3nnBaseline:
    """A NequIP-style potential written with e3nn only, the "plain e3nn" baseline.

    Per layer: ``o3.Linear`` on node features, a ``o3.TensorProduct`` of sender features with edge
    spherical harmonics (``uvu`` paths, weights from an e3nn ``FullyConnectedNet`` of the Bessel
    radial basis), sum at the receiver, ``o3.Linear``, e3nn ``Gate``, residual. Energy: linear
    readout of the scalars, summed. Same channels, ``lmax``, ``hidden_lmax``, ``layers`` and
    ``r_max`` as the model it is compared with; no body-order contraction.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        from e3nn import nn as enn
        from e3nn import o3

        self.torch, self.o3 = torch, o3
        self.spec = spec
        self.dtype = getattr(torch, spec.get("dtype", "float32"))
        c, lmax, hl = spec["channels"], spec["lmax"], spec["hidden_lmax"]
        self.elements = spec.get("elements", ELEMENTS)
        self.sh = o3.Irreps.spherical_harmonics(lmax)
        hidden = o3.Irreps([(c, (l, (-1) ** l)) for l in range(hl + 1)])
        torch.manual_seed(0)
        layers = torch.nn.ModuleList()
        irreps_in = o3.Irreps(f"{c}x0e")
        for _ in range(spec["layers"]):
            mid, instructions = [], []
            for i1, (mul, ir_in) in enumerate(irreps_in):
                for i2, (_, ir_edge) in enumerate(self.sh):
                    for ir_out in ir_in * ir_edge:
                        if ir_out in hidden:
                            instructions.append((i1, i2, len(mid), "uvu", True))
                            mid.append((mul, ir_out))
            tp = o3.TensorProduct(irreps_in, self.sh, o3.Irreps(mid), instructions,
                                  shared_weights=False, internal_weights=False)
            scalars = o3.Irreps([(m, ir) for m, ir in hidden if ir.l == 0])
            gated = o3.Irreps([(m, ir) for m, ir in hidden if ir.l > 0])
            gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
            gate = enn.Gate(scalars, [torch.nn.functional.silu], gates, [torch.sigmoid] * len(gates), gated)
            layer = torch.nn.ModuleDict({
                "pre": o3.Linear(irreps_in, irreps_in),
                "radial": enn.FullyConnectedNet([8, 64, 64, tp.weight_numel], torch.nn.functional.silu),
                "tp": tp,
                "post": o3.Linear(o3.Irreps(mid), gate.irreps_in),
                "gate": gate,
                "self": o3.Linear(irreps_in, gate.irreps_out),
            })
            layers.append(layer)
            irreps_in = gate.irreps_out
        self.layers = layers
        self.embed = torch.nn.Embedding(len(self.elements), c)
        self.readout = o3.Linear(irreps_in, o3.Irreps("0e"))
        self.model = torch.nn.ModuleList([layers, self.embed, self.readout]).to(self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = sum(p.numel() for p in self.model.parameters())

    def energy(self, pos, species, edge_index, shifts):
        torch = self.torch
        sender, receiver = edge_index
        vec = pos[sender] - pos[receiver] + shifts  # [n_edges, 3]
        length = vec.norm(dim=-1)
        r_max = self.spec["r_max"]
        n = torch.arange(1, 9, dtype=pos.dtype)
        x = length[:, None] / r_max
        bessel = math.sqrt(2.0 / r_max) * torch.sin(math.pi * n * x) / length[:, None]
        envelope = (1 - x) ** 2 * (1 + 2 * x) * (x < 1)  # smooth cubic cutoff
        radial = bessel * envelope
        sh = self.o3.spherical_harmonics(self.sh, vec, normalize=True, normalization="component")
        h = self.embed(species)
        for layer in self.layers:
            w = layer["radial"](radial)
            msg = layer["tp"](layer["pre"](h)[sender], sh, w)
            agg = torch.zeros(h.shape[0], msg.shape[1], dtype=h.dtype).index_add_(0, receiver, msg) / 30.0
            h = layer["gate"](layer["post"](agg)) + layer["self"](h)
        return self.readout(h).sum()

    def static(self, atoms, stress: bool):
        torch, dtype = self.torch, self.dtype
        i, j, S = common.ase_edges(atoms, self.spec["r_max"])
        index = {z: k for k, z in enumerate(self.elements)}
        species = torch.tensor([index[int(z)] for z in atoms.numbers])
        cell = torch.tensor(atoms.cell.array, dtype=dtype)
        positions = torch.tensor(atoms.positions, dtype=dtype)
        unit = torch.tensor(S, dtype=dtype)
        edge_index = torch.tensor(np.stack([j, i]))

        def call():
            pos = positions.clone().requires_grad_(True)
            eps = torch.zeros(3, 3, dtype=dtype, requires_grad=stress)
            sym = (eps + eps.T) / 2
            p = pos + pos @ sym
            shifts = unit @ (cell + cell @ sym)
            e = self.energy(p, species, edge_index, shifts)
            leaves = [pos, eps] if stress else [pos]
            return torch.autograd.grad(e, leaves)

        return call, len(i)

    def md(self, atoms, skin: float):
        raise NotImplementedError("the e3nn baseline is timed on static calls only")


ENGINES = {"mlip": MlipEngine, "mace": MaceEngine, "e3nn": E3nnBaseline}


def calculator_call(engine: Any, atoms: Any):
    """One MD-like step's evaluation through the engine's ASE calculator (neighbour list rebuilt):
    the atoms move by a seeded ±1e-3 Å displacement (alternating, so they stay put on average), then
    energy, forces and stress."""
    calc, _ = engine.md(atoms, 0.0)
    atoms.calc = calc
    step = np.random.default_rng(0).normal(scale=1e-3, size=atoms.positions.shape)
    sign = [1.0]

    def call():
        atoms.positions = atoms.positions + sign[0] * step
        sign[0] = -sign[0]
        atoms.get_potential_energy()
        atoms.get_forces()
        atoms.get_stress()

    return call


def _warm_up(fn, command: dict[str, Any]) -> list[dict[str, float]]:
    """``command["warmup"]`` untimed calls, fewer once they took ``warmup_budget_s`` (at least one).

    MACE's TorchScript'ed e3nn code re-profiles for new shapes: its first 2-3 calls on a new
    structure are slower; at large sizes that overhead is negligible next to one call.
    """
    warm: list[dict[str, float]] = []
    while len(warm) < max(1, int(command.get("warmup", 1))):
        warm.append(common.timed(fn))
        if sum(w["wall"] for w in warm) > float(command.get("warmup_budget_s", 30.0)):
            break
    return warm


def _handler():
    """The worker's command handler (state: the engine, the current task)."""
    state: dict[str, Any] = {}

    def handle(command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "setup":
            import torch

            torch.set_num_threads(int(command.get("threads", 1)))
            spec = command["spec"]
            state["engine"] = ENGINES[spec["kind"]](spec)
            return {"params": state["engine"].params, "torch": torch.__version__, "rss_mb": common.peak_rss_mb()}
        engine = state["engine"]
        if cmd == "prepare":
            atoms = common.make_structure(command["structure"])
            if command["task"] == "static":
                fn, n_edges = engine.static(atoms, bool(command.get("stress", False)))
                state["fn"], state["extra"] = fn, dict
                return {"n_atoms": len(atoms), "n_edges": n_edges, "warmup": _warm_up(fn, command),
                        **getattr(engine, "info", {})}
            if command["task"] == "calculator":
                n_edges = len(common.ase_edges(atoms, getattr(engine, "r_max", None) or engine.spec["r_max"])[0])
                state["fn"], state["extra"] = calculator_call(engine, atoms), dict
                return {"n_atoms": len(atoms), "n_edges": n_edges, "warmup": _warm_up(state["fn"], command)}
            if command["task"] == "md":
                from ase import units
                from ase.md.verlet import VelocityVerlet

                if command.get("rattle"):  # Å, seeded: off the perfect lattice (whose frames are degenerate)
                    atoms.rattle(stdev=float(command["rattle"]), seed=0)
                common.with_velocities(atoms)
                calc, extra = engine.md(atoms, float(command.get("skin", 0.0)))
                atoms.calc = calc
                dyn = VelocityVerlet(atoms, timestep=command.get("dt_fs", 2.0) * units.fs)
                state["fn"], state["extra"] = (lambda: dyn.run(1)), extra
                return {"n_atoms": len(atoms), "n_edges": None, "warmup": _warm_up(state["fn"], command)}
            raise ValueError(f"unknown task {command['task']!r}")
        if cmd == "run":
            out = common.timed(state["fn"], int(command.get("n", 1)))
            out.update(state["extra"]())
            return out
        raise ValueError(f"unknown command {cmd!r}")

    return handle


# ============================================================================ driver side
def mace_spec_like(spec: dict[str, Any]) -> dict[str, Any]:
    """A ``mace`` spec of the same size as the ``equivariant`` mlip spec ``spec``."""
    cfg = mlip_config(spec)
    lmax = int(cfg["lmax"])
    hidden = cfg.get("hidden_lmax")
    return {"kind": "mace", "channels": int(cfg["num_channels"]), "lmax": lmax,
            "hidden_lmax": lmax if hidden is None else int(hidden), "layers": int(cfg["num_layers"]),
            "correlation": int(cfg["correlation"]), "r_max": float(cfg["r_max"]),
            "avg_num_neighbors": float(cfg.get("avg_num_neighbors") or 30.0), "scale": float(cfg.get("scale", 1.0)),
            "elements": cfg["elements"], "dtype": spec.get("dtype", "float32")}


def e3nn_spec_like(spec: dict[str, Any]) -> dict[str, Any]:
    """An ``e3nn`` baseline spec of the same size as the ``equivariant`` mlip spec ``spec``."""
    return {**mace_spec_like(spec), "kind": "e3nn"}


def start_workers(specs: dict[str, dict[str, Any]], mace_python: str, threads: int = 1,
                  module: str = "benchmarks.speed") -> dict[str, common.Worker]:
    """One worker per labelled spec (MACE specs under ``mace_python``), served by ``module``'s
    ``--worker`` mode; prints their sizes."""
    workers = {}
    for label, spec in specs.items():
        python = mace_python if spec["kind"] == "mace" else sys.executable
        workers[label] = common.Worker(spec, python=python, threads=threads, module=module)
    for label in specs:
        print(f"# {label}: {workers[label].info['params']:,} parameters", flush=True)
    return workers


def compare(workers: dict[str, common.Worker], structures: list[str], task: dict[str, Any], repeats: int = 5,
            warmup: int = 1, budget_s: float = 120.0, max_call_s: float = 120.0, max_mem_mb: float = 6000.0,
            steps: int = 1, per_worker_task: dict[str, dict[str, Any]] | None = None,
            n_atoms_of: Callable[[str], int] | None = None) -> list[dict[str, Any]]:
    """Time every worker on every structure, interleaving single calls (A B A B ...).

    Args:
        workers: label -> started worker.
        structures: names for :func:`benchmarks._common.make_structure`, smallest first.
        task: the ``prepare`` command body, e.g. ``{"task": "static", "stress": True}``; a crystal
            (periodic) structure gets ``stress`` as given, a molecule never.
        repeats: rounds of calls (each round: one call per worker) when the calls are fast.
        warmup: untimed calls per worker and structure before the rounds.
        budget_s: the rounds of one structure are cut so that they take about this long in all
            (never fewer than 1 round).
        max_call_s: a worker whose predicted call time (its last time scaled linearly in atoms)
            exceeds this skips the structure (recorded with ``"skipped"``).
        max_mem_mb: likewise for the worker's peak memory, predicted linearly in atoms from its
            growth over the memory after setup (large cells of the equivariant models need tens of GB).
        steps: calls (MD steps) per timed sample.
        per_worker_task: extra ``prepare`` fields per worker label (e.g. a skin per MD variant).
        n_atoms_of: atoms of a structure name, for the predictions (default: the structure
            :func:`benchmarks._common.make_structure` builds); names the workers resolve
            otherwise, such as training batches, need their own.

    Returns:
        One row per worker and structure: ``n_atoms``, ``n_edges``, ``wall_s`` and ``cpu_s`` (per call,
        one entry per round), ``rss_mb`` (peak so far), and the answers' extra fields.
    """
    rows: list[dict[str, Any]] = []
    last: dict[str, tuple[int, float, float]] = {}  # label -> (atoms, wall s per call, peak RSS MiB)
    for name in structures:
        periodic = not name.startswith("molecule")
        active, prepared = {}, {}
        n_atoms = n_atoms_of(name) if n_atoms_of else len(common.make_structure(name))
        for label, worker in workers.items():
            reason = None
            if label in last:
                n0, t0, m0 = last[label]
                base = worker.info["rss_mb"]
                t_pred, m_pred = t0 * n_atoms / n0, base + (m0 - base) * n_atoms / n0
                if t_pred > max_call_s:
                    reason = f"predicted {t_pred:.0f} s per call > {max_call_s:.0f} s"
                elif m_pred > max_mem_mb:
                    reason = f"predicted peak memory {m_pred / 1024:.1f} GiB > {max_mem_mb / 1024:.1f} GiB"
            if reason:
                rows.append({"engine": label, "structure": name, "n_atoms": n_atoms, "skipped": reason})
                print(f"{label:<34} {name:<12} skipped ({reason})", flush=True)
                continue
            body = {**task, **(per_worker_task or {}).get(label, {})}
            body["stress"] = bool(body.get("stress", False)) and periodic
            prepared[label] = worker.call({"cmd": "prepare", "structure": name, "warmup": warmup, **body})
            active[label] = worker
        if not active:
            continue
        slowest = max(p["warmup"][-1]["wall"] for p in prepared.values())
        rounds = max(1, min(repeats, int(budget_s / max(slowest * steps * len(active), 1e-9))))
        samples: dict[str, list[dict[str, Any]]] = {label: [] for label in active}
        for _ in range(rounds):
            for label, worker in active.items():
                samples[label].append(worker.call({"cmd": "run", "n": steps}))
        for label in active:
            s = samples[label]
            row = {"engine": label, "structure": name, "n_atoms": prepared[label]["n_atoms"],
                   "n_edges": prepared[label]["n_edges"], "stress": bool(task.get("stress", False)) and periodic,
                   "rounds": rounds, "wall_s": [x["wall"] / steps for x in s], "cpu_s": [x["cpu"] / steps for x in s],
                   "warmup_wall_s": [w["wall"] for w in prepared[label]["warmup"]], "rss_mb": s[-1]["rss_mb"]}
            row.update({k: v for k, v in s[-1].items() if k not in ("wall", "cpu", "rss_mb")})
            row.update({k: v for k, v in prepared[label].items() if k not in ("n_atoms", "n_edges", "warmup")})
            row["wall_median_s"] = statistics.median(row["wall_s"])
            row["cpu_median_s"] = statistics.median(row["cpu_s"])
            rows.append(row)
            last[label] = (row["n_atoms"], row["wall_median_s"], row["rss_mb"])
            print(f"{label:<34} {name:<12} {row['n_atoms']:>6} atoms  wall {1e3 * row['wall_median_s']:10.1f} ms  "
                  f"cpu {1e3 * row['cpu_median_s']:10.1f} ms  ({rounds} rounds)  peak RSS {row['rss_mb']:.0f} MiB", flush=True)
    return rows


def fit_exponent(rows: list[dict[str, Any]], engine: str, min_atoms: int = 500, key: str = "cpu_median_s") -> float:
    """Slope ``b`` of ``log(time) = a + b log(n_atoms)`` over the periodic structures of ``engine``
    with at least ``min_atoms`` atoms (NaN with fewer than two)."""
    pts = [(r["n_atoms"], r[key]) for r in rows
           if r["engine"] == engine and "skipped" not in r and r["n_atoms"] >= min_atoms and r.get("stress", True)]
    if len(pts) < 2:
        return float("nan")
    n, t = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(n, t, 1)[0])


def speed_table(rows: list[dict[str, Any]], engines: list[str]) -> str:
    """Markdown: one line per engine, one column per structure, median CPU ms per call (wall ms)."""
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    by = {(r["engine"], r["structure"]): r for r in rows}
    sizes = {r["structure"]: r for r in rows if "skipped" not in r}
    header = ["code"] + [f"{s} ({sizes[s]['n_atoms']} at., {sizes[s].get('n_edges')} edges)" for s in structures]
    out = []
    for e in engines:
        line = [e]
        for s in structures:
            r = by.get((e, s))
            line.append("—" if r is None or "skipped" in r else
                        f"{1e3 * r['cpu_median_s']:.0f} ({1e3 * r['wall_median_s']:.0f})")
        out.append(line)
    return common.markdown_table(header, out)


def per_atom_table(rows: list[dict[str, Any]], engines: list[str]) -> str:
    """Markdown: CPU µs per atom per call, peak RSS, and the fitted exponent per engine."""
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    by = {(r["engine"], r["structure"]): r for r in rows}
    header = ["engine"] + [f"{s} µs/atom" for s in structures] + ["peak RSS (MiB), largest", "exponent b"]
    out = []
    for e in engines:
        line = [e]
        for s in structures:
            r = by.get((e, s))
            line.append("—" if r is None or "skipped" in r else f"{1e6 * r['cpu_median_s'] / r['n_atoms']:.0f}")
        done = [r for r in rows if r["engine"] == e and "skipped" not in r]
        line.append(f"{done[-1]['rss_mb']:.0f} ({done[-1]['n_atoms']} atoms)" if done else "—")
        line.append(f"{fit_exponent(rows, e):.2f}")
        out.append(line)
    return common.markdown_table(header, out)


def plot(rows: list[dict[str, Any]], engines: list[str], path: Path, title: str) -> None:
    """Log-log plots of CPU time per call, per atom, and peak memory against atoms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for e in engines:
        pts = sorted((r["n_atoms"], r["cpu_median_s"], r["rss_mb"]) for r in rows
                     if r["engine"] == e and "skipped" not in r)
        if not pts:
            continue
        n = np.array([p[0] for p in pts])
        t = np.array([p[1] for p in pts])
        m = np.array([p[2] for p in pts])
        b = fit_exponent(rows, e)
        axes[0].loglog(n, 1e3 * t, "o-", label=e if math.isnan(b) else f"{e} (b = {b:.2f})")
        axes[1].semilogx(n, 1e6 * t / n, "o-", label=e)
        axes[2].loglog(n, m, "o-", label=e)
    axes[0].set_ylabel("CPU ms per energy+forces(+stress) call")
    axes[1].set_ylabel("CPU µs per atom per call")
    axes[2].set_ylabel("peak RSS of the worker (MiB)")
    for ax in axes:
        ax.set_xlabel("atoms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def suite_specs(families: list[str], preset: str, dtype: str, mace: bool, e3nn: bool) -> dict[str, dict[str, Any]]:
    """Labelled specs of the suite: each family's preset, frame-averaged also with one stochastic
    frame, and MACE / the e3nn baseline sized like the equivariant preset."""
    specs: dict[str, dict[str, Any]] = {}
    for family in families:
        spec = {"kind": "mlip", "family": family, "preset": preset, "dtype": dtype}
        if family == "frame-averaged":
            specs[f"mlip {family}-{preset} (full averaging)"] = spec
            specs[f"mlip {family}-{preset} (1 random frame)"] = {**spec, "config": {"eval_averaging": "stochastic"}}
        else:
            specs[f"mlip {family}-{preset}"] = spec
    like = {"kind": "mlip", "family": "equivariant", "preset": preset, "dtype": dtype}
    if mace:
        specs[f"MACE ({preset}-sized)"] = mace_spec_like(like)
    if e3nn:
        specs[f"e3nn baseline ({preset}-sized)"] = e3nn_spec_like(like)
    return specs


def with_overrides(specs: dict[str, dict[str, Any]], items: list[str]) -> dict[str, dict[str, Any]]:
    """Add ``KEY=VALUE`` config overrides (values parsed as YAML) to the ``mlip`` specs whose family
    config has ``KEY``; those specs' labels get `` [KEY=VALUE ...]``. Other specs are unchanged."""

    import yaml

    from mlip.models.base import config_fields

    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), yaml.safe_load(value)))
    out: dict[str, dict[str, Any]] = {}
    for label, spec in specs.items():
        if spec["kind"] == "mlip":
            fields = set(config_fields(spec["family"]))
            extra = {k: v for k, v in pairs if k in fields}
            if extra:
                spec = {**spec, "config": {**spec.get("config", {}), **extra}}
                label = f"{label} [{' '.join(f'{k}={v}' for k, v in extra.items())}]"
        out[label] = spec
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="equivariant,frame-averaged,learned-equivariance")
    ap.add_argument("--preset", default="small", help="configs/<family>-<preset>.yaml")
    ap.add_argument("--structures", default=DEFAULT_STRUCTURES,
                    help="molecule-27, Cu-<4k^3>, Si-<8k^3>; smallest first")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (MACE needs ~3)")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds of timed rounds per structure (about)")
    ap.add_argument("--max-call", type=float, default=90.0, help="skip a code at sizes predicted slower than this (s)")
    ap.add_argument("--max-mem", type=float, default=6000.0,
                    help="skip a code at sizes predicted to need more memory than this (MiB, per process)")
    ap.add_argument("--mace-python", default=MACE_PYTHON, help="python with mace-torch ('' to skip MACE)")
    ap.add_argument("--no-e3nn", action="store_true", help="skip the e3nn-only baseline")
    ap.add_argument("--no-md", action="store_true", help="skip the MD part (benchmarks/md_speed.py)")
    ap.add_argument("--md-sizes", default="108,500,2048,4000,10976")
    ap.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results"))
    ap.add_argument("--plot-only", action="store_true", help="redraw <out>/speed.png from <out>/speed.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override (YAML value) for every mlip family with that field, "
                         "e.g. --set edge_chunk_size=20000; repeatable")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        saved = json.loads((out / "speed.json").read_text())
        title = (f"energy+forces(+stress), {saved['dtype']}, 1 thread, {common.describe(saved['env'])}")
        plot(saved["rows"], list(saved["specs"]), out / "speed.png", title)
        return saved
    structures = [s for s in args.structures.split(",") if s]
    mace = bool(args.mace_python) and Path(args.mace_python).exists()
    if args.mace_python and not mace:
        print(f"# no MACE python at {args.mace_python}: MACE skipped", flush=True)
    specs = suite_specs([f for f in args.families.split(",") if f], args.preset, args.dtype, mace, not args.no_e3nn)
    if args.set:
        specs = with_overrides(specs, args.set)
    env = common.environment()
    print(f"# {common.describe(env)}; {args.dtype}, 1 torch thread per worker", flush=True)
    workers = start_workers(specs, args.mace_python)
    try:
        params = {label: w.info["params"] for label, w in workers.items()}
        rows = compare(workers, structures, {"task": "static", "stress": True}, repeats=args.repeats,
                       warmup=args.warmup, budget_s=args.budget, max_call_s=args.max_call, max_mem_mb=args.max_mem)
    finally:
        for w in workers.values():
            w.close()
    env_end = common.environment()
    engines = list(specs)
    result = {"env": env, "load_average_end": env_end["load_average"], "dtype": args.dtype, "threads": 1,
              "specs": specs, "params": params, "rows": rows,
              "exponents": {e: fit_exponent(rows, e) for e in engines}}
    (out / "speed.json").write_text(json.dumps(result, indent=1))
    title = f"energy+forces(+stress), {args.dtype}, 1 thread, {common.describe(env)}"
    plot(rows, engines, out / "speed.png", title)
    print()
    print(speed_table(rows, engines))
    print()
    print(per_atom_table(rows, engines))
    print("\nparameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
    print(f"load average at the end: {env_end['load_average']}")
    print(f"wrote {out / 'speed.json'} and {out / 'speed.png'}", flush=True)
    if not args.no_md:
        try:
            from benchmarks import md_speed
        except ImportError:  # run as a script
            import md_speed  # type: ignore[no-redef]
        md_speed.main(["--sizes", args.md_sizes, "--json", str(out / "md_speed.json"), "--dtype", args.dtype]
                      + ([] if mace else ["--mace-python", ""]))
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        common.serve(_handler())
    else:
        main()
