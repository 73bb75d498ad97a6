"""Relax strained, rattled fcc crystals with an mlip model, from a script.

Shows ``mlip.relax`` on a pymatgen ``Structure`` and on an ASE ``Atoms`` (both come back as
the type given), then relaxes all crystals together with the batched FIRE of
``mlip.md.relax_batch`` (one model call per step for the whole batch) and checks that it agrees
with relaxing them one by one.

    python examples/relax_crystals.py                            # trains a small model first
    python examples/relax_crystals.py --model runs/quickstart/model.pt --fmax 0.01

Without ``--model`` it uses ``runs/quickstart/model.pt`` (relative to the current folder) if present
(``mlip train configs/quickstart.yaml``), else trains the quickstart model for ``--train-seconds``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _model import get_model  # examples/_model.py
from ase.build import bulk
from ase.io import write
from pymatgen.core import Lattice, Structure

import mlip
from mlip.md import relax_batch


def crystals(elements: list[str]) -> list:
    """Strained and rattled fcc cells of the model's elements (and a binary alloy)."""
    rng = np.random.default_rng(0)
    out = []
    for k, symbol in enumerate(elements):
        atoms = bulk(symbol, "fcc", cubic=True).repeat((2, 1, 1))
        strain = np.eye(3) + 0.03 * rng.normal(size=(3, 3))
        atoms.set_cell(np.asarray(atoms.cell) @ strain, scale_atoms=True)
        atoms.rattle(0.05, seed=k)
        out.append(atoms)
    if len(elements) >= 2:
        alloy = bulk(elements[0], "fcc", a=3.8, cubic=True).repeat((2, 1, 1))
        alloy.numbers[::2] = bulk(elements[1], "fcc").numbers[0]
        alloy.rattle(0.05, seed=99)
        out.append(alloy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: see above)")
    parser.add_argument("--fmax", type=float, default=0.02, help="eV/Å")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/examples/relax", help="output folder")
    parser.add_argument("--train-seconds", type=float, default=90.0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = mlip.load(get_model(args.model, out, args.train_seconds))
    from ase.data import chemical_symbols

    known = [chemical_symbols[z] for z in model.elements]
    metals = [s for s in ("Cu", "Ni", "Al", "Ag", "Au", "Pd", "Pt") if s in known][:3] or known[:1]

    # 1. a pymatgen Structure in, a pymatgen Structure out
    structure = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.9), [metals[0]], [[0, 0, 0]])
    relaxed = mlip.relax(structure, model, fmax=args.fmax, relax_cell=True, device=args.device, dtype="float64")
    print(f"pymatgen {structure.composition.reduced_formula}: a = {structure.lattice.a:.3f} -> "
          f"{relaxed.lattice.a:.3f} Å, E = {relaxed.properties['energy']:.4f} eV, "
          f"{relaxed.properties['relax_steps']} steps")

    # 2. an ASE Atoms in, an ASE Atoms out (BFGS, fixed cell)
    atoms = crystals(metals)[0]
    relaxed_atoms = mlip.relax(atoms, model, fmax=args.fmax, optimizer="BFGS", device=args.device, dtype="float64")
    print(f"ASE {atoms.get_chemical_formula()}: E = {relaxed_atoms.get_potential_energy():.4f} eV after "
          f"{relaxed_atoms.info['relax_steps']} BFGS steps, max force {relaxed_atoms.info['relax_fmax']:.4f} eV/Å")

    # 3. all crystals at once: one model call per FIRE step for the whole batch
    batch = crystals(metals)
    t0 = time.perf_counter()
    together = relax_batch(batch, model, fmax=args.fmax, relax_cell=True, device=args.device, dtype="float64")
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    one_by_one = [relax_batch([a], model, fmax=args.fmax, relax_cell=True, device=args.device, dtype="float64")[0]
                  for a in batch]
    t_single = time.perf_counter() - t0
    print(f"{'structure':<12}{'E (eV)':>12}{'V (Å³)':>10}{'steps':>7}  converged")
    for r, s in zip(together, one_by_one):
        assert abs(r.energy - s.energy) < 1e-6 and r.steps == s.steps, "batched and one-by-one disagree"
        print(f"{r.atoms.get_chemical_formula():<12}{r.energy:>12.4f}{r.volume:>10.2f}{r.steps:>7}  {r.converged}")
    print(f"batched: {t_batched:.2f} s, one by one: {t_single:.2f} s (same results)")
    write(out / "relaxed.extxyz", [r.atoms for r in together])
    print(f"wrote {out / 'relaxed.extxyz'}")


if __name__ == "__main__":
    main()
