"""The ``learned-equivariance`` family: speed against the ``equivariant`` family, and accuracy and
rotation error of learned equivariance against the rotation-augmentation baseline (equal budget).

Two parts, each printing a Markdown table and writing JSON to ``--out``::

    python benchmarks/learned_equivariance.py speed                # energy + forces, molecule and Cu crystals
    python benchmarks/learned_equivariance.py accuracy --steps 300 # learned vs augment vs none, same steps
    python benchmarks/learned_equivariance.py all

*speed*: the ``small`` presets (``configs/<family>-small.yaml``, elements H C O Cu), ``--dtype``,
eval mode; energy + forces through :func:`mlip.models.outputs.predict`, median of ``--repeats``
calls after one warm-up, neighbour list built once outside the timing; both wall-clock and process
CPU time are recorded (on a shared machine compare CPU time, with ``--threads 1``). Structures: a 27-atom
molecule (H, C, O) and rattled fcc Cu supercells of 64, 128, 256 and 512 atoms. Reported as µs per
atom per energy+forces call.

*accuracy*: the same small transformer (``--channels``, 2 blocks) trained on the first 128
molecules of ``data/xtb_molecules.xyz`` (charge and spin used) for the same number of Adam steps
(batches of 4 molecules, lr 3e-3, energy-per-atom + force MSE, seed 0) with ``symmetry_mode``
``learned`` (alignment loss weight ``--weight``), ``augment`` and ``none``; test on the last 48
molecules: energy MAE per atom, force MAE, and the relative rotation error of energy and forces
(as in ``tests/test_learned_equivariance.py``). Note that ``learned`` costs about twice the
forward work per step (two branches); the budget here is equal in steps and data, not wall clock.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = [1, 6, 8, 29]


def _preset(family: str, size: str = "small") -> dict:
    with open(ROOT / "configs" / f"{family}-{size}.yaml") as fh:
        section = dict(yaml.safe_load(fh)["model"])
    section.pop("family")
    return section


def _structures() -> dict:
    import ase
    import ase.build

    rng = np.random.default_rng(0)
    mol = ase.Atoms("C8O3H16", positions=rng.uniform(0, 7.0, size=(27, 3)))  # a dense random cluster
    while True:  # keep atoms at least 1 Å apart (the graph builder refuses near-overlaps)
        d = np.linalg.norm(mol.positions[:, None] - mol.positions[None], axis=-1) + 10 * np.eye(27)
        i = int(np.argmin(d.min(1)))
        if d.min() > 1.0:
            break
        mol.positions[i] = rng.uniform(0, 7.0, size=3)
    out = {"molecule (27 atoms)": mol}
    unit = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    for reps in ((2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8)):
        atoms = unit.repeat(reps)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out[f"Cu fcc ({len(atoms)} atoms)"] = atoms
    return out


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of ``fn()`` (CPU time is what to compare on
    a shared machine: it does not count time spent waiting for a core)."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def speed(args: argparse.Namespace) -> dict:
    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph
    from mlip.models.base import build_model
    from mlip.models.outputs import predict

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    rows = []
    for family in ("learned-equivariance", "equivariant"):
        cfg = {**_preset(family), "elements": ELEMENTS}
        model = build_model(family, cfg).to(dtype).eval()
        for name, atoms in _structures().items():
            batch = collate([atoms_to_graph(atoms, float(cfg["r_max"]))]).to(dtype=dtype)
            wall, cpu = _time(lambda: predict(model, batch, forces=True), args.repeats)
            rows.append({"family": family, "structure": name, "n_atoms": batch.n_atoms, "n_edges": batch.n_edges,
                         "wall_seconds": wall, "cpu_seconds": cpu, "cpu_us_per_atom": 1e6 * cpu / batch.n_atoms,
                         "wall_us_per_atom": 1e6 * wall / batch.n_atoms})
            print(f"{family:22s} {name:22s} cpu {1e6 * cpu / batch.n_atoms:9.1f} µs/atom, wall {1e6 * wall / batch.n_atoms:9.1f}",
                  flush=True)
    print("\n| structure | edges | learned-equivariance CPU µs/atom | equivariant CPU µs/atom | speed-up |")
    print("|---|---|---|---|---|")
    for name in _structures():
        a = next(r for r in rows if r["family"] == "learned-equivariance" and r["structure"] == name)
        b = next(r for r in rows if r["family"] == "equivariant" and r["structure"] == name)
        print(f"| {name} | {a['n_edges']} | {a['cpu_us_per_atom']:.0f} | {b['cpu_us_per_atom']:.0f} | "
              f"{b['cpu_seconds'] / a['cpu_seconds']:.2f}x |")
    return {"rows": rows, "dtype": args.dtype, "repeats": args.repeats}


def _relative_rotation_error(model, batch) -> tuple[float, float]:
    from mlip.train.equivariance import equivariance_error

    eq = equivariance_error(model, batch, n_rotations=4, seed=1)
    with torch.no_grad():
        e = model(batch, batch.edge_vectors())["energy"]
    element = model.embedding.index(batch.numbers)
    zero = torch.zeros(batch.n_atoms, dtype=e.dtype)
    e0 = model.atomic_energies(zero, element, torch.zeros_like(element))
    n = (batch.ptr[1:] - batch.ptr[:-1]).to(e.dtype)
    inter = (e - zero.new_zeros(batch.n_graphs).index_add_(0, batch.batch, e0)) / n
    return eq["energy_max"] / float(inter.square().mean().sqrt()), eq["forces_rel"]


def accuracy(args: argparse.Namespace) -> dict:
    from mlip.data.formats.extxyz import iter_extxyz
    from mlip.data.graph import collate
    from mlip.data.stats import e0s_from_isolated_atoms, is_isolated
    from mlip.data.transforms import atoms_to_graph
    from mlip.models.base import build_model
    from mlip.models.outputs import predict

    frames = list(iter_extxyz(ROOT / "data" / "xtb_molecules.xyz"))
    e0s = e0s_from_isolated_atoms(frames)
    mols = [a for a in frames if not is_isolated(a)]
    r_max = 4.0
    train = [atoms_to_graph(a, r_max) for a in mols[:128]]
    test = collate([atoms_to_graph(a, r_max) for a in mols[-48:]]).to(dtype=torch.float32)
    results = []
    for mode in ("learned", "augment", "none"):
        cfg = dict(elements=sorted(e0s), e0s=e0s, r_max=r_max, num_channels=args.channels, num_heads=4, num_layers=2,
                   readout_hidden=16, transform_hidden=args.channels, use_charge_spin=True, symmetry_mode=mode,
                   equivariance_loss_weight=args.weight if mode == "learned" else 0.0, seed=0)
        torch.manual_seed(0)
        model = build_model("learned-equivariance", cfg).float()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        model.train()
        for _ in range(args.steps):
            idx = torch.randperm(len(train), generator=order)[:4].tolist()
            b = collate([train[i] for i in idx]).to(dtype=torch.float32)
            out = predict(model, b, forces=True, create_graph=True)
            n = (b.ptr[1:] - b.ptr[:-1]).to(torch.float32)
            loss = ((out["energy"] - b.energy) / n).square().mean() + (out["forces"] - b.forces).square().mean()
            if "aux_loss" in out:
                loss = loss + out["aux_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - start
        model.eval()
        pred = predict(model, test, forces=True)
        n = (test.ptr[1:] - test.ptr[:-1]).to(torch.float32)
        e_mae = float(((pred["energy"].detach() - test.energy) / n).abs().mean())
        f_mae = float((pred["forces"].detach() - test.forces).abs().mean())
        e_rot, f_rot = _relative_rotation_error(model, test)
        row = {"mode": mode, "steps": args.steps, "train_seconds": seconds, "energy_mae_per_atom": e_mae,
               "forces_mae": f_mae, "energy_rotation_rel": e_rot, "forces_rotation_rel": f_rot}
        results.append(row)
        print(json.dumps(row), flush=True)
    print("\n| symmetry_mode | steps | train s | E MAE meV/atom | F MAE meV/Å | rel. rotation error E | rel. rotation error F |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['steps']} | {r['train_seconds']:.0f} | {1e3 * r['energy_mae_per_atom']:.1f} | "
              f"{1e3 * r['forces_mae']:.0f} | {r['energy_rotation_rel']:.4f} | {r['forces_rotation_rel']:.4f} |")
    return {"rows": results, "weight": args.weight, "channels": args.channels}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["speed", "accuracy", "all"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--weight", type=float, default=1000.0)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/learned_equivariance.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "command": " ".join(["python", "benchmarks/learned_equivariance.py"] + (argv or sys.argv[1:]))}
    result = {"meta": meta}
    if args.part in ("speed", "all"):
        result["speed"] = speed(args)
    if args.part in ("accuracy", "all"):
        result["accuracy"] = accuracy(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
