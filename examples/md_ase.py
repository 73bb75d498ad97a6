"""Molecular dynamics of a copper crystal through mlip's ASE calculator.

Runs Nose-Hoover NVT to equilibrate, then NVE, with plain ASE integrators, reports the energy
drift and how often the neighbour list was rebuilt; then the same with one call to
``mlip.md.run_md`` (what ``mlip md`` does), which also writes a trajectory and a CSV log.

    python examples/md_ase.py                                   # trains a small model first
    python examples/md_ase.py --model runs/quickstart/model.pt --steps 2000 --size 4

Without ``--model`` it uses ``runs/quickstart/model.pt`` (relative to the current folder) if present
(``mlip train configs/quickstart.yaml``), else trains the quickstart model for ``--train-seconds``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _model import get_model  # examples/_model.py
from ase import units
from ase.build import bulk
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

import mlip
from mlip.calculator import MLIPCalculator
from mlip.md import run_md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: see above)")
    parser.add_argument("--steps", type=int, default=400, help="MD steps per stage")
    parser.add_argument("--size", type=int, default=3, help="supercell repeats of the 4-atom fcc cell")
    parser.add_argument("--temperature", type=float, default=600.0, help="K")
    parser.add_argument("--timestep", type=float, default=2.0, help="fs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/examples/md", help="output folder")
    parser.add_argument("--train-seconds", type=float, default=90.0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = mlip.load(get_model(args.model, out, args.train_seconds))

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(args.size)
    # float32 is the default dtype; float64 conserves energy more tightly at ~2x the cost
    calc = MLIPCalculator(model, device=args.device, dtype="float64", skin=0.5)
    atoms.calc = calc
    thermalize_momenta(atoms, args.temperature, rng=np.random.default_rng(0))
    Stationary(atoms)
    print(f"{len(atoms)} Cu atoms, {args.steps} NVT + {args.steps} NVE steps of {args.timestep} fs")

    nvt = NoseHooverChainNVT(atoms, timestep=args.timestep * units.fs, temperature_K=args.temperature,
                             tdamp=50 * args.timestep * units.fs)
    t0 = time.perf_counter()
    nvt.run(args.steps)
    print(f"NVT: T = {atoms.get_temperature():.0f} K after {args.steps} steps "
          f"({args.steps / (time.perf_counter() - t0):.1f} steps/s)")

    nve = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    e0 = atoms.get_total_energy()
    energies = []
    nve.attach(lambda: energies.append(atoms.get_total_energy()), interval=10)
    builds0, calls0 = calc.neighbors.n_builds, calc.neighbors.n_calls
    t0 = time.perf_counter()
    nve.run(args.steps)
    rate = args.steps / (time.perf_counter() - t0)
    drift = max(abs(e - e0) for e in energies) / len(atoms)
    print(f"NVE: T = {atoms.get_temperature():.0f} K, max |E_tot - E_tot(0)| = {drift:.2e} eV/atom, "
          f"{rate:.1f} steps/s, neighbour list rebuilt {calc.neighbors.n_builds - builds0} times "
          f"in {calc.neighbors.n_calls - calls0} evaluations")

    # the same through run_md: trajectory, CSV log, blow-up checks, progress bar
    result = run_md(atoms, calculator=calc, ensemble="nve", steps=args.steps, timestep=args.timestep,
                    out=str(out / "nve.extxyz"), log_every=10, progress=False)
    print(f"run_md: {result.steps} steps, max |drift| {result.max_abs_drift:.2e} eV/atom; "
          f"trajectory {result.trajectory}, log {result.log}")


if __name__ == "__main__":
    main()
