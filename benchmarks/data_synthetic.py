"""Synthetic data of realistic shape for the data benchmarks and tests (nothing is downloaded).

* :func:`write_mptrj`: an MPTrj-layout JSON file (``{mp_id: {frame_id: frame}}``, frames with a
  pymatgen ``Structure.as_dict()`` structure, MPTrj's label names and units: eV, eV/Å, kBar with
  VASP's sign, μB) of a target size. Atoms per frame follow a broad distribution (1 to 100,
  mean about 21), 1 to 12 frames per material; labels are random numbers, not physics.
* :func:`write_omol_folder`: a folder of OMol25-layout ``.aselmdb`` files: molecules (3 to 60
  atoms) with energy and forces in the row's calculator results and ``charge`` / ``spin`` (total
  charge, multiplicity 2S+1, parity-consistent) in ``row.data``, as fairchem stores OMol25.
* :func:`crystal_frames`: canonical labelled crystals for large HDF5 sets.

Atoms sit on a jittered grid, at least 0.5 Å apart, so every frame passes mlip's checks.
Everything is seeded.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: elements drawn for crystals (common in MPTrj) and molecules (common in OMol25)
CRYSTAL_ELEMENTS = ("Li", "Na", "K", "Mg", "Ca", "Al", "Si", "P", "S", "O", "N", "C", "F", "Cl",
                    "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "Se", "Sr", "Y",
                    "Zr", "Nb", "Mo", "Sn", "Sb", "Ba", "La", "W", "Bi")
MOLECULE_ELEMENTS = ("H", "H", "H", "C", "C", "N", "O", "F", "S", "Cl", "P", "Br")


def _grid_positions(rng: np.random.Generator, n: int, spacing: float) -> np.ndarray:
    """``n`` points on a jittered cubic grid (nearest neighbours at least ``0.5 * spacing`` apart)."""
    k = int(np.ceil(n ** (1 / 3)))
    cells = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3)
    chosen = cells[rng.permutation(len(cells))[:n]].astype(np.float64)
    return (chosen + rng.uniform(-0.25, 0.25, size=(n, 3))) * spacing  # [n, 3]


def mptrj_n_atoms(rng: np.random.Generator) -> int:
    """Atoms per frame: log-uniform 1..100 (mean about 21.5, about 7 kB of JSON per frame as in
    the real MPTrj: 11 GB for 1.58 M frames), small cells most common."""
    return int(np.exp(rng.uniform(0.0, np.log(100.0))))


def mptrj_frame(rng: np.random.Generator, mp_id: str, n_atoms: int) -> dict:
    """One MPTrj frame: pymatgen-style structure dict plus MPTrj's labels (random values)."""
    k = int(np.ceil(n_atoms ** (1 / 3)))
    spacing = 2.3
    length = k * spacing
    # a slightly triclinic cell around the grid; fractional coordinates inside [0, 1)
    matrix = np.diag([length] * 3) + rng.uniform(-0.1, 0.1, size=(3, 3))
    cart = _grid_positions(rng, n_atoms, spacing) + 0.25 * spacing
    frac = np.linalg.solve(matrix.T, cart.T).T
    cart = frac @ matrix
    elements = rng.choice(CRYSTAL_ELEMENTS, size=n_atoms)
    magmoms = rng.uniform(0.0, 3.0, size=n_atoms).round(3)
    lengths = np.linalg.norm(matrix, axis=1)

    def angle(i: int, j: int) -> float:
        return float(np.degrees(np.arccos(matrix[i] @ matrix[j] / (lengths[i] * lengths[j]))))

    structure = {
        "@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
        "lattice": {"matrix": matrix.tolist(), "pbc": [True, True, True], "a": lengths[0], "b": lengths[1],
                    "c": lengths[2], "alpha": angle(1, 2), "beta": angle(0, 2), "gamma": angle(0, 1),
                    "volume": float(abs(np.linalg.det(matrix)))},
        "properties": {},
        "sites": [{"species": [{"element": str(el), "occu": 1}], "abc": f.tolist(),
                   "properties": {"magmom": float(m)}, "label": str(el), "xyz": c.tolist()}
                  for el, f, c, m in zip(elements, frac, cart, magmoms)],
    }
    energy = float(-5.0 * n_atoms + rng.normal())
    stress = rng.normal(scale=20.0, size=(3, 3))
    return {
        "structure": structure,
        "uncorrected_total_energy": energy,
        "corrected_total_energy": energy - 0.5,
        "energy_per_atom": energy / n_atoms,
        "ef_per_atom": float(rng.normal()),
        "e_per_atom_relaxed": energy / n_atoms - 0.01,
        "ef_per_atom_relaxed": float(rng.normal()),
        "force": rng.normal(scale=0.5, size=(n_atoms, 3)).tolist(),
        "stress": (0.5 * (stress + stress.T)).tolist(),
        "magmom": magmoms.tolist() if rng.random() < 0.7 else None,
        "bandgap": float(abs(rng.normal())),
        "mp_id": mp_id,
    }


def write_mptrj(path: str | os.PathLike, target_bytes: int | None = None, n_frames: int | None = None,
                seed: int = 0) -> dict:
    """Write an MPTrj-layout JSON file of about ``target_bytes`` (or exactly ``n_frames`` frames).

    Written material by material, so memory stays small whatever the size.

    Returns:
        ``{"frames", "atoms", "bytes", "materials"}``.
    """
    if (target_bytes is None) == (n_frames is None):
        raise ValueError("give exactly one of target_bytes and n_frames")
    rng = np.random.default_rng(seed)
    frames = atoms = materials = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("{")
        while (n_frames is None or frames < n_frames) and (target_bytes is None or fh.tell() < target_bytes):
            mp_id = f"mp-{1000 + materials}"
            count = int(rng.integers(1, 13))
            if n_frames is not None:
                count = min(count, n_frames - frames)
            parts = []
            for j in range(count):
                n = mptrj_n_atoms(rng)
                parts.append(f'{json.dumps(f"{mp_id}-{j}-0")}: {json.dumps(mptrj_frame(rng, mp_id, n))}')
                atoms += n
            fh.write(("," if materials else "") + f'{json.dumps(mp_id)}: {{{", ".join(parts)}}}')
            frames += count
            materials += 1
        fh.write("}")
        size = fh.tell()
    return {"frames": frames, "atoms": atoms, "bytes": size, "materials": materials}


def omol_molecule(rng: np.random.Generator):
    """A molecule-like cluster (3 to 60 atoms, 1.4 Å grid) with a parity-consistent charge and spin."""
    from ase import Atoms

    n = int(rng.integers(3, 61))
    symbols = list(rng.choice(MOLECULE_ELEMENTS, size=n))
    atoms = Atoms(symbols, positions=_grid_positions(rng, n, 1.4))
    charge = int(rng.choice([-1, 0, 0, 0, 1]))
    n_electrons = int(atoms.numbers.sum()) - charge
    # multiplicity 2S+1 with n_electrons - (mult - 1) even: 1 or 3 for even counts, 2 for odd
    spin = (1 if rng.random() < 0.8 else 3) if n_electrons % 2 == 0 else 2
    return atoms, charge, spin


def write_omol_folder(folder: str | os.PathLike, n_molecules: int, n_files: int = 4, seed: int = 0) -> dict:
    """Write ``n_molecules`` molecules into ``n_files`` ``.aselmdb`` files in ``folder``.

    Returns:
        ``{"molecules", "atoms", "bytes", "files"}``.
    """
    import ase.db
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atoms_total = 0
    paths = []
    per_file = np.diff(np.linspace(0, n_molecules, n_files + 1).astype(int))
    for f, count in enumerate(per_file):
        path = folder / f"data{f:04d}.aselmdb"
        db = ase.db.connect(str(path), type="aselmdb")
        with db:  # one write transaction per file
            for _ in range(count):
                atoms, charge, spin = omol_molecule(rng)
                energy = float(-400.0 * len(atoms) + rng.normal())
                atoms.calc = SinglePointCalculator(atoms, energy=energy,
                                                   forces=rng.normal(scale=0.5, size=(len(atoms), 3)))
                db.write(atoms, data={"charge": charge, "spin": spin})
                atoms_total += len(atoms)
        paths.append(path)
    return {"molecules": int(n_molecules), "atoms": atoms_total, "files": [str(p) for p in paths],
            "bytes": sum(p.stat().st_size for p in paths)}


def crystal_frames(n: int, n_atoms: int, seed: int = 0, spacing: float = 2.3) -> Iterator:
    """``n`` canonical labelled crystals of ``n_atoms`` atoms each (Cu/Ag, random labels), streamed."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    k = int(np.ceil(n_atoms ** (1 / 3)))
    for i in range(n):
        numbers = rng.choice([29, 47], size=n_atoms)
        atoms = Atoms(numbers=numbers, positions=_grid_positions(rng, n_atoms, spacing),
                      cell=np.eye(3) * k * spacing, pbc=True)
        atoms.info["energy"] = float(-3.0 * n_atoms + rng.normal())
        atoms.arrays["forces"] = rng.normal(scale=0.3, size=(n_atoms, 3))
        stress = rng.normal(scale=0.01, size=(3, 3))
        atoms.info["stress"] = 0.5 * (stress + stress.T)
        atoms.info["source"] = f"synthetic crystal {i}"
        yield atoms
