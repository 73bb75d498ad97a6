"""Training-step throughput against MACE: structures and atoms per second of one optimisation step.

One step = energy and forces (and stress for crystals) with the graph kept for a second
differentiation, a loss on all of them, its backward (through the forces: a double backward), the
gradient clip, the optimiser step and the EMA update. Each code runs its own training-loop piece:

* mlip: :func:`mlip.train.loop.train_step` on a :class:`~mlip.train.loop.RunState` built as
  :func:`mlip.train.loop.train` builds it (its optimiser, schedule and EMA; loss
  :mod:`mlip.train.loss`), default optimiser settings (AdamW, clip 10, EMA 0.99);
* MACE: mace-torch's ``mace.tools.train.take_step`` with the loss, parameter groups and optimiser
  its ``run_train`` builds from its own argument parser (Adam with AMSGrad, clip 10, EMA 0.99;
  loss ``weighted``, or ``stress`` for crystals).

Loss weights: energy 1, forces 100, stress 100, on both sides. Models: the ``equivariant``
presets (``configs/equivariant-{small,medium}.yaml``) against a ``ScaleShiftMACE`` of the same
size (:func:`benchmarks.speed.mace_spec_like`: small = 64 channels, max_L 1, max_ell 2,
correlation 3, 2 interactions, r_max 5 Å, 8 Bessel functions, as ``benchmarks/accuracy.py`` trains
MACE; medium = MACE-MP-0 medium, 128x0e+128x1o, max_ell 3, r_max 6 Å), random initial weights,
float32, one torch thread per process. Data (random labels: speed does not depend on them), written
to extxyz once and read by each code's own reader and neighbour list, batches built before the
timing as a data loader with workers would:

* ``molecules 10x ethanol``: batches of 10 ethanol molecules (``ase.build.molecule('CH3CH2OH')``,
  every atom displaced by a seeded normal 0.1 Å), no stress;
* ``crystals 2x Si-64``: batches of 2 rattled 64-atom diamond Si cells, stress in the loss.

The two codes run in worker processes (MACE with its own venv's python) that take turns, one step
each, cycling over ``--batches`` different batches; reported: median process CPU time per step
(robust to other jobs on the cores), wall-clock, structures and atoms per CPU second::

    python -m benchmarks train_vs_mace --mace-python venv-mace/bin/python
    python -m benchmarks train_vs_mace --smoke      # seconds: a tiny model and tiny batches (tests)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

try:
    from benchmarks import _common as common
    from benchmarks import speed
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]
    import speed  # type: ignore[no-redef]

WEIGHTS = {"energy": 1.0, "forces": 100.0, "stress": 100.0}
#: label names in the written files (MACE's defaults; ASE would read plain ``energy`` as a calculator's)
KEYS = {"energy": "REF_energy", "forces": "REF_forces", "stress": "REF_stress"}
RESULTS = common.ROOT / "benchmarks" / "results" / "train_vs_mace.json"


# ------------------------------------------------------------------------------------------- data
def ethanols(n: int, rng: np.random.Generator) -> list[Any]:
    """``n`` ethanol molecules (9 atoms, no cell), every atom displaced by a normal 0.1 Å."""
    from ase.build import molecule

    out = []
    for _ in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        out.append(atoms)
    return out


def crystals(structure: str, n: int, rng: np.random.Generator) -> list[Any]:
    """``n`` copies of :func:`benchmarks._common.make_structure` ``(structure)``, each rattled by 0.05 Å more."""
    out = []
    for _ in range(n):
        atoms = common.make_structure(structure)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out.append(atoms)
    return out


def label(frames: list[Any], rng: np.random.Generator) -> None:
    """Random labels in :data:`KEYS`: energy (eV), forces [n, 3] (eV/Å), a symmetric stress [3, 3]
    (eV/Å³) for periodic frames only."""
    for atoms in frames:
        atoms.info[KEYS["energy"]] = float(rng.normal(scale=len(atoms)))
        atoms.arrays[KEYS["forces"]] = rng.normal(size=(len(atoms), 3))
        if atoms.pbc.any():
            s = rng.normal(scale=0.01, size=(3, 3))
            atoms.info[KEYS["stress"]] = (s + s.T) / 2


def shapes(smoke: bool) -> dict[str, dict[str, Any]]:
    """The data shapes: name -> builder of ``n`` frames and structures per batch."""
    if smoke:
        return {"molecules 2x ethanol": {"make": ethanols, "per_batch": 2},
                "crystals 1x Si-8": {"make": lambda n, rng: crystals("Si-8", n, rng), "per_batch": 1}}
    return {"molecules 10x ethanol": {"make": ethanols, "per_batch": 10},
            "crystals 2x Si-64": {"make": lambda n, rng: crystals("Si-64", n, rng), "per_batch": 2}}


def write_data(folder: Path, n_batches: int, smoke: bool) -> dict[str, dict[str, Any]]:
    """One extxyz file of ``n_batches`` batches per data shape; name -> ``{"path", "per_batch",
    "n_atoms"}`` (atoms per batch) and ``"keys"``: the labels written, as in :data:`KEYS`."""
    import ase.io

    rng = np.random.default_rng(0)
    out = {}
    for k, (name, shape) in enumerate(shapes(smoke).items()):
        frames = shape["make"](n_batches * shape["per_batch"], rng)
        label(frames, rng)
        path = folder / f"data{k}.xyz"
        ase.io.write(path, frames, format="extxyz")
        keys = {k: v for k, v in KEYS.items() if k != "stress" or frames[0].pbc.any()}
        out[name] = {"path": str(path), "per_batch": shape["per_batch"], "n_atoms": len(frames[0]) * shape["per_batch"],
                     "keys": keys}
    return out


# ====================================================================== worker side: the two steps
class MlipTrainer:
    """mlip's training step on the model of an ``mlip`` spec (see :func:`benchmarks.speed.mlip_config`)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from mlip.models.base import build_model
        from mlip.train import distributed as ddp
        from mlip.train import loop
        from mlip.train.config import TrainConfig
        from mlip.train.ema import EMA

        cfg = TrainConfig(dtype=spec.get("dtype", "float32"))
        cfg.loss.energy_weight, cfg.loss.forces_weight, cfg.loss.stress_weight = (
            WEIGHTS["energy"], WEIGHTS["forces"], WEIGHTS["stress"])
        model = build_model(spec["family"], speed.mlip_config(spec)).to(getattr(torch, cfg.dtype)).train()
        optimizer = loop._optimizer(cfg, model)
        schedule = loop.LRSchedule(optimizer, cfg.optim, total_steps=10_000)
        ema = EMA(model, cfg.optim.ema_decay)
        # no data splits: train_step reads only the batch it is given
        self.state = loop.RunState(cfg, None, model, model, optimizer, schedule, ema, ddp.DistInfo(),
                                   Path(tempfile.mkdtemp(prefix="mlip-train-bench-")))
        self.weights = loop.weights_at_epoch(cfg.loss, 0)
        self.params = sum(p.numel() for p in model.parameters())
        self.r_max = float(model.r_max)

    def batches(self, path: str, per_batch: int, keys: dict[str, str]) -> list[tuple[Any, int, int]]:
        """``(GraphBatch, atoms, edges)`` per batch of ``per_batch`` structures of the file, in order;
        ``keys``: label -> name in the file."""
        from mlip.data.datasets import open_dataset
        from mlip.data.formats import LabelKeys
        from mlip.data.graph import collate

        data = open_dataset(path, self.r_max, keys=LabelKeys(**keys), required=("energy", "forces"))
        graphs = [data[i] for i in range(len(data))]
        out = [collate(graphs[k:k + per_batch]) for k in range(0, len(graphs), per_batch)]
        return [(b, b.n_atoms, b.n_edges) for b in out]

    def step(self, batch: Any, stress: bool) -> None:
        """One :func:`~mlip.train.loop.train_step` (stress enters wherever the batch is labelled with it)."""
        from mlip.train import loop

        if loop.train_step(self.state, batch, True, self.weights) is None:
            raise RuntimeError("mlip skipped a step (non-finite loss or gradient): the timing would be wrong")


class MaceTrainer:
    """mace-torch's training step (``take_step``) on the ``ScaleShiftMACE`` of a ``mace`` spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        from mace.tools import build_default_arg_parser
        from mace.tools.scripts_utils import get_optimizer, get_params_options
        from torch_ema import ExponentialMovingAverage

        dtype = getattr(torch, spec.get("dtype", "float32"))
        torch.set_default_dtype(dtype)  # MACE builds its buffers and reads its data in the default dtype
        torch.manual_seed(0)
        self.args = build_default_arg_parser().parse_args(
            ["--name=bench", "--train_file=unused.xyz", f"--energy_weight={WEIGHTS['energy']}",
             f"--forces_weight={WEIGHTS['forces']}", f"--stress_weight={WEIGHTS['stress']}", "--ema"])
        self.model = speed.mace_model(spec).to(dtype).train()
        self.optimizer = get_optimizer(self.args, get_params_options(self.args, self.model))
        self.ema = ExponentialMovingAverage(self.model.parameters(), decay=self.args.ema_decay)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.spec = spec
        self.loss: dict[bool, Any] = {}

    def batches(self, path: str, per_batch: int, keys: dict[str, str]) -> list[tuple[Any, int, int]]:
        """``(torch_geometric Batch, atoms, edges)`` per batch of ``per_batch`` structures of the file;
        ``keys``: label -> name in the file."""
        from mace import data
        from mace.tools import AtomicNumberTable, torch_geometric

        spec = data.KeySpecification.from_defaults().update(  # the defaults name the other labels MACE reads
            info_keys={k: v for k, v in keys.items() if k != "forces"}, arrays_keys={"forces": keys["forces"]})
        _, configs = data.load_from_xyz(path, spec)
        table = AtomicNumberTable(self.spec["elements"])
        graphs = [data.AtomicData.from_config(c, z_table=table, cutoff=self.spec["r_max"]) for c in configs]
        loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=per_batch, shuffle=False)
        return [(b, int(b.positions.shape[0]), int(b.edge_index.shape[1])) for b in loader]

    def step(self, batch: Any, stress: bool) -> None:
        import torch
        from mace.tools.scripts_utils import get_loss_fn
        from mace.tools.train import take_step

        if stress not in self.loss:
            self.args.loss = "stress" if stress else "weighted"
            self.loss[stress] = get_loss_fn(self.args, dipole_only=False, compute_dipole=False)
        take_step(self.model, self.loss[stress], batch, self.optimizer, self.ema,
                  {"forces": True, "virials": False, "stress": stress}, self.args.clip_grad, torch.device("cpu"))


def _handler():
    """The worker's command handler: ``setup`` (build the trainer), ``prepare`` (read a data shape's
    batches, warm up), ``run`` (time ``n`` steps, cycling over the batches)."""
    state: dict[str, Any] = {}

    def handle(command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "setup":
            import torch

            torch.set_num_threads(int(command.get("threads", 1)))
            spec = command["spec"]
            state["trainer"] = (MlipTrainer if spec["kind"] == "mlip" else MaceTrainer)(spec)
            return {"params": state["trainer"].params, "torch": torch.__version__, "rss_mb": common.peak_rss_mb()}
        trainer = state["trainer"]
        if cmd == "prepare":
            data = command["data"][command["structure"]]
            batches = trainer.batches(data["path"], data["per_batch"], data["keys"])
            position = [0]

            def step() -> None:
                batch = batches[position[0] % len(batches)][0]
                position[0] += 1
                trainer.step(batch, bool(command["stress"]))

            state["fn"] = step
            return {"n_atoms": statistics.mean(b[1] for b in batches), "n_edges": statistics.mean(b[2] for b in batches),
                    "structures": data["per_batch"], "batches": len(batches),
                    "warmup": speed._warm_up(step, command)}
        if cmd == "run":
            return common.timed(state["fn"], int(command.get("n", 1)))
        raise ValueError(f"unknown command {cmd!r}")

    return handle


# ============================================================================ driver side
def mlip_spec(preset: str, smoke: bool) -> dict[str, Any]:
    """The ``equivariant`` preset's spec (``--smoke``: 8 channels)."""
    return {"kind": "mlip", "family": "equivariant", "preset": preset,
            "config": {"num_channels": 8} if smoke else {}, "dtype": "float32"}


def run_preset(preset: str, data: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both codes' steps on every data shape, interleaved (:func:`benchmarks.speed.compare`), fresh workers."""
    ours = mlip_spec(preset, args.smoke)
    specs = {"mlip": ours, **({"MACE": speed.mace_spec_like(ours)} if args.mace_python else {})}
    workers = speed.start_workers(specs, args.mace_python, module="benchmarks.train_vs_mace")
    try:
        rows = speed.compare(workers, list(data), {"task": "train", "stress": True, "data": data},
                             repeats=args.repeats, warmup=args.warmup, budget_s=args.budget, max_call_s=1e9,
                             max_mem_mb=1e9, n_atoms_of=lambda name: data[name]["n_atoms"])
        for r in rows:
            r.update(preset=preset, params=workers[r["engine"]].info["params"])
    finally:
        for w in workers.values():
            w.close()
    return rows


def _cells(r: dict[str, Any] | None) -> list[str]:
    """Edges, CPU ms per step, structures/s, atoms/s (per CPU second) and wall ms of a row; dashes for none."""
    if r is None:
        return ["—"] * 5
    cpu = r["cpu_median_s"]
    return [f"{r['n_edges']:,.0f}", f"{1e3 * cpu:,.0f}", f"{r['structures'] / cpu:.3g}", f"{r['n_atoms'] / cpu:,.0f}",
            f"{1e3 * r['wall_median_s']:,.0f}"]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per preset and data shape, CPU ms per step, structures and atoms per CPU second, the
    CPU-time ratio mlip/MACE and wall-clock ms per step."""
    by = {(r["preset"], r["engine"], r["structure"]): r for r in rows}
    out = []
    for preset, name in dict.fromkeys((r["preset"], r["structure"]) for r in rows):
        a, b = by[(preset, "mlip", name)], by.get((preset, "MACE", name))
        ca, cb = _cells(a), _cells(b)
        ratio = "—" if b is None else f"{a['cpu_median_s'] / b['cpu_median_s']:.2f}"
        out.append([preset, name, f"{a['n_atoms']:.0f}", f"{ca[0]} / {cb[0]}", ca[1], cb[1], f"{ca[2]} / {cb[2]}",
                    f"{ca[3]} / {cb[3]}", ratio, f"{ca[4]} / {cb[4]}", a["rounds"]])
    return common.markdown_table(
        ["preset", "batch", "atoms", "edges mlip / MACE", "mlip CPU ms/step", "MACE CPU ms/step",
         "structures/s mlip / MACE", "atoms/s mlip / MACE", "CPU ratio mlip/MACE", "wall ms mlip / MACE", "rounds"], out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks train_vs_mace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mace-python", default=speed.MACE_PYTHON, help="python with mace-torch ('' to skip MACE)")
    ap.add_argument("--presets", default="small,medium", help="configs/equivariant-<preset>.yaml")
    ap.add_argument("--batches", type=int, default=4, help="different batches per data shape, cycled through")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per code and data shape")
    ap.add_argument("--repeats", type=int, default=15, help="rounds of one step per code (fewer if slow: --budget)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per preset and data shape (about)")
    ap.add_argument("--json", default=None, help=f"write the results here (default: {RESULTS.relative_to(common.ROOT)}; "
                                                 "with --smoke, nowhere)")
    ap.add_argument("--smoke", action="store_true",
                    help="a seconds-long run: small preset at 8 channels, 2 tiny batches per shape, 1 warm-up step, 2 rounds")
    args = ap.parse_args(argv)
    if args.smoke:
        args.presets, args.batches, args.warmup, args.repeats = "small", 2, 1, 2
    if args.mace_python and not Path(args.mace_python).exists():
        print(f"# no MACE python at {args.mace_python}: MACE skipped", flush=True)
        args.mace_python = ""
    env = common.environment()
    print(f"# {common.describe(env)}; float32, 1 torch thread per process; training steps", flush=True)
    with tempfile.TemporaryDirectory(prefix="mlip-train-bench-") as folder:
        data = write_data(Path(folder), args.batches, args.smoke)
        rows = [r for preset in args.presets.split(",") for r in run_preset(preset, data, args)]
    end = common.environment()["load_average"]
    print(f"\nload average at the end {end}")
    print(table(rows), flush=True)
    result = {"env": env, "load_average_end": end, "smoke": args.smoke, "weights": WEIGHTS,
              "data": {k: {"per_batch": v["per_batch"], "batches": args.batches} for k, v in data.items()}, "rows": rows}
    path = args.json or (None if args.smoke else RESULTS)
    if path:
        common.write_json(path, result)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        common.serve(_handler())
    else:
        main()
