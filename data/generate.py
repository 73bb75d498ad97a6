"""Generate mlip's bundled example data sets (deterministic: fixed seed).

    python data/generate.py                 # both files into data/
    python data/generate.py --only emt      # EMT crystals only (needs only ASE)
    python data/generate.py --only xtb      # GFN2-xTB molecules (needs `pip install tblite`)

Writes extended XYZ with canonical mlip keys (eV, Å, eV/Å, eV/Å³ with ASE's sign):

* ``emt_crystals.xyz``: fcc metals Cu, Ag, Au, Ni, Pd, Pt, Al and random binary alloys of them,
  labelled by ASE's EMT calculator: energy, forces, stress; strained, rattled, some sheared
  (triclinic); plus one isolated-atom frame per element (``config_type=IsolatedAtom``).
* ``xtb_molecules.xyz``: small organic molecules, rattled, neutral and singly ionised, labelled
  by GFN2-xTB (tblite): energy, forces, ``charge`` and ``spin`` (multiplicity 2S+1); plus
  neutral isolated atoms of H, C, N, O in their high-spin ground-state multiplicity.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import reference_states
from ase.io import write

SEED = 20261123
HERE = os.path.dirname(os.path.abspath(__file__))

METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
#: (cubic conventional cell?, repeat): 2..32 atoms per cell
CELLS = (
    (False, (2, 1, 1)), (False, (2, 2, 1)), (False, (3, 1, 1)), (False, (2, 2, 2)),
    (False, (3, 2, 1)), (False, (3, 3, 1)), (False, (3, 3, 3)), (True, (1, 1, 1)),
    (True, (2, 1, 1)), (True, (3, 1, 1)), (True, (2, 2, 1)), (True, (2, 2, 2)),
)
PURE_PER_ELEMENT = 26
ALLOYS_PER_PAIR = 11
MAX_STRAIN = 0.03      # symmetric strain components, uniform in [-3%, 3%]
MAX_SHEAR = 0.08       # extra shear (off-diagonal) of "sheared" frames
SHEARED_FRACTION = 0.3
RATTLE = (0.05, 0.10)  # Å, Gaussian width drawn uniformly in this range (crystals)
MOLECULE_RATTLE = (0.02, 0.06)  # Å, the same for molecules (stiffer bonds to H)

MOLECULES = ("H2O", "CH4", "NH3", "C2H6", "CH3OH", "C2H4", "C2H2", "HCN", "CO2", "H2CO",
             "HCOOH", "H3CNH2", "CH3CN", "CH3CHO")
NEUTRAL_PER_MOLECULE = 8
IONS_PER_CHARGE = 3
#: ground-state spin multiplicity of the neutral isolated atoms
ATOM_MULTIPLICITY = {"H": 2, "C": 3, "N": 4, "O": 3}


def _labelled(atoms: Atoms, calc, **info) -> Atoms:
    """Round positions to what extxyz stores (8 decimals), compute labels, attach them."""
    atoms.positions = np.round(atoms.positions, 8)
    atoms.calc = calc
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces())
    stress = np.array(atoms.get_stress(voigt=False)) if atoms.pbc.all() else None
    out = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    results = {"energy": energy, "forces": forces}
    if stress is not None:
        results["stress"] = stress
    out.calc = SinglePointCalculator(out, **results)
    out.info.update(info)
    return out


def _strain(rng: np.random.Generator, sheared: bool) -> np.ndarray:
    """Deformation gradient: I + symmetric strain (+ a non-symmetric shear if ``sheared``)."""
    e = rng.uniform(-MAX_STRAIN, MAX_STRAIN, size=(3, 3))
    f = np.eye(3) + (e + e.T) / 2
    if sheared:
        f += np.triu(rng.uniform(-MAX_SHEAR, MAX_SHEAR, size=(3, 3)), k=1)
    return f


def _crystal(rng: np.random.Generator, species: tuple[str, ...], sheared: bool) -> Atoms:
    cubic, repeat = CELLS[rng.integers(len(CELLS))]
    atoms = bulk(species[0], "fcc", a=1.0, cubic=cubic).repeat(repeat)
    if len(species) > 1:
        # random site occupation at a random composition, both elements present
        fractions = rng.dirichlet(np.ones(len(species)))
        while True:
            symbols = rng.choice(species, size=len(atoms), p=fractions)
            if len(set(symbols)) == len(species):
                break
        atoms.set_chemical_symbols(list(symbols))
    # lattice constant: Vegard's law over the actual composition (reference fcc lattice constants)
    a0 = float(np.mean([reference_states[z]["a"] for z in atoms.numbers]))
    atoms.set_cell(atoms.cell[:] * a0, scale_atoms=True)
    atoms.set_cell(atoms.cell[:] @ _strain(rng, sheared).T, scale_atoms=True)
    atoms.positions += rng.normal(scale=rng.uniform(*RATTLE), size=atoms.positions.shape)
    return atoms


def generate_emt(path: str, seed: int = SEED) -> int:
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for symbol in METALS:
        for _ in range(PURE_PER_ELEMENT):
            sheared = bool(rng.random() < SHEARED_FRACTION)
            atoms = _crystal(rng, (symbol,), sheared)
            frames.append(_labelled(atoms, EMT(), config_type="pure_sheared" if sheared else "pure"))
    for pair in itertools.combinations(METALS, 2):
        for _ in range(ALLOYS_PER_PAIR):
            sheared = bool(rng.random() < SHEARED_FRACTION)
            atoms = _crystal(rng, pair, sheared)
            frames.append(_labelled(atoms, EMT(), config_type="alloy_sheared" if sheared else "alloy"))
    for symbol in METALS:
        atom = Atoms(symbol, positions=[[10.0, 10.0, 10.0]], cell=[20.0, 20.0, 20.0], pbc=False)
        frames.append(_labelled(atom, EMT(), config_type="IsolatedAtom"))
    write(path, frames, format="extxyz")
    return len(frames)


def generate_xtb(path: str, seed: int = SEED) -> int:
    try:
        from tblite.ase import TBLite
    except ImportError as err:
        raise SystemExit(f"xtb_molecules.xyz needs tblite (pip install tblite): {err}") from err

    def calc(charge: int, multiplicity: int):
        return TBLite(method="GFN2-xTB", charge=charge, multiplicity=multiplicity, verbosity=0)

    rng = np.random.default_rng(seed + 1)
    frames = []
    for name in MOLECULES:
        plan = [(0, 1)] * NEUTRAL_PER_MOLECULE + [(1, 2)] * IONS_PER_CHARGE + [(-1, 2)] * IONS_PER_CHARGE
        for charge, mult in plan:
            atoms = molecule(name)
            atoms.positions += rng.normal(scale=rng.uniform(*MOLECULE_RATTLE), size=atoms.positions.shape)
            kind = {0: "neutral", 1: "cation", -1: "anion"}[charge]
            frames.append(_labelled(atoms, calc(charge, mult), config_type=kind, molecule=name,
                                    charge=float(charge), spin=float(mult)))
    for symbol, mult in ATOM_MULTIPLICITY.items():
        atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        frames.append(_labelled(atom, calc(0, mult), config_type="IsolatedAtom", charge=0.0, spin=float(mult)))
    write(path, frames, format="extxyz")
    return len(frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("emt", "xtb"), help="generate one file only")
    parser.add_argument("--out-dir", default=HERE, help="output folder (default: this folder)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    jobs = {"emt": ("emt_crystals.xyz", generate_emt), "xtb": ("xtb_molecules.xyz", generate_xtb)}
    for key, (name, fn) in jobs.items():
        if args.only and args.only != key:
            continue
        path = os.path.join(args.out_dir, name)
        t0 = time.perf_counter()
        n = fn(path, args.seed)
        print(f"{path}: {n} frames, {os.path.getsize(path) / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
