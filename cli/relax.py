"""``mlip relax``: relax crystals or molecules from CIF, POSCAR or (ext)xyz files."""
from __future__ import annotations

import csv
from pathlib import Path

import click

#: columns of the CSV written next to the relaxed structures
CSV_COLUMNS = (
    "structure", "formula", "n_atoms", "energy_eV", "energy_per_atom_eV", "volume_A3", "steps",
    "converged", "fmax_eV_A",
)


def read_structures(path: str) -> list[tuple[str, object]]:
    """``(name, ase.Atoms)`` for every structure in ``path``: CIF through pymatgen, POSCAR/CONTCAR
    through ASE's VASP reader, anything else (extxyz, xyz, traj, ...) through ``ase.io.read``.
    Files with several structures name them ``file@index``."""
    from ase.io import read

    p = Path(path)
    name = p.name
    suffix = p.suffix.lower()
    try:
        if suffix == ".cif":
            from pymatgen.io.ase import AseAtomsAdaptor
            from pymatgen.io.cif import CifParser

            frames = [AseAtomsAdaptor.get_atoms(s) for s in CifParser(str(p)).parse_structures(primitive=False)]
        elif name.upper().startswith(("POSCAR", "CONTCAR")) or suffix in (".vasp", ".poscar"):
            frames = [read(str(p), format="vasp")]
        else:
            frames = read(str(p), index=":")
    except Exception as err:
        raise click.ClickException(f"{path}: cannot read structures ({err})") from err
    if not frames:
        raise click.ClickException(f"{path}: no structures found")
    if len(frames) == 1:
        return [(name, frames[0])]
    return [(f"{name}@{i}", a) for i, a in enumerate(frames)]


def _write_native(atoms, name: str, path: Path, out_dir: Path) -> None:
    """Also write a relaxed CIF or POSCAR next to the CSV for a CIF or POSCAR input."""
    from ase.io import write

    if "@" in name:
        return
    suffix = path.suffix.lower()
    if suffix == ".cif":
        from pymatgen.io.ase import AseAtomsAdaptor
        from pymatgen.io.cif import CifWriter

        CifWriter(AseAtomsAdaptor.get_structure(atoms)).write_file(str(out_dir / f"{name}.relaxed.cif"))
    elif path.name.upper().startswith(("POSCAR", "CONTCAR")) or suffix in (".vasp", ".poscar"):
        write(out_dir / f"{name}.relaxed.vasp", atoms, format="vasp", direct=True)


@click.command("relax")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("structures", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--fmax", type=float, default=0.05, show_default=True,
              help="Threshold on atom forces and (with --relax-cell) FrechetCellFilter's cell forces, eV/Å.")
@click.option("--relax-cell/--fixed-cell", default=False, show_default=True,
              help="Relax the cell too (FrechetCellFilter's degrees of freedom, batched or sequential).")
@click.option("--optimizer", type=click.Choice(["fire", "bfgs", "lbfgs"], case_sensitive=False), default="fire",
              show_default=True, help="Optimiser for --sequential (batched relaxation always uses FIRE).")
@click.option("--batched/--sequential", default=None,
              help="Relax all structures together, one model call per step (default with FIRE), "
                   "or one after the other with an ASE optimiser.")
@click.option("--max-steps", type=int, default=500, show_default=True, help="Optimiser steps at most.")
@click.option("--pressure", type=float, default=0.0, show_default=True, help="External pressure, GPa (with --relax-cell).")
@click.option("--out", "out", type=click.Path(file_okay=False), default="relaxed", show_default=True,
              help="Output folder: relaxed.extxyz, relax.csv and a relaxed CIF/POSCAR per CIF/POSCAR input.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--max-memory-gb", type=float, default=None,
              help="Memory budget of one force call (batched: of all structures still relaxing), GiB "
                   "(default: 80 % of the free memory); above it the edge work is chunked (same results).")
@click.option("--dispersion", default=None, metavar="FUNCTIONAL",
              help="Add D3(BJ) dispersion with this functional's parameters, e.g. pbe (needs mlip[d3]).")
def relax(model: str, structures: tuple[str, ...], fmax: float, relax_cell: bool, optimizer: str,
          batched: bool | None, max_steps: int, pressure: float, out: str, device: str, dtype: str,
          max_memory_gb: float | None, dispersion: str | None) -> None:
    """Relax every structure in STRUCTURES (CIF, POSCAR, extxyz, ...) with MODEL.

    Writes OUT/relaxed.extxyz (energy, forces, stress attached), OUT/relax.csv (energy, volume,
    steps, convergence per structure) and, for CIF/POSCAR inputs, a relaxed file in the same format.
    MODEL may be a model.pt or an exported model.pt2.

    Example:

        mlip relax runs/quickstart/model.pt data/structures/*.cif --relax-cell --fmax 0.02
    """
    from ase.io import write

    from mlip.md.relaxation import relax as relax_one
    from mlip.md.relaxation import relax_batch

    optimizer = optimizer.lower()
    if batched is None:
        batched = optimizer == "fire"
    if batched and optimizer != "fire":
        raise click.UsageError("--batched relaxation uses FIRE; pass --sequential to use BFGS or LBFGS")
    items: list[tuple[str, Path, object]] = []
    for path in structures:
        for name, atoms in read_structures(path):
            items.append((name, Path(path), atoms))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if batched:
            click.echo(f"relaxing {len(items)} structure(s) together (batched FIRE, fmax={fmax} eV/Å)")
            results = relax_batch([a for _, _, a in items], model, fmax=fmax, relax_cell=relax_cell,
                                  max_steps=max_steps, pressure=pressure, device=device, dtype=dtype,
                                  dispersion=dispersion, max_memory_gb=max_memory_gb)
            relaxed = [r.atoms for r in results]
        else:
            from mlip.calculator import MLIPCalculator

            calc = MLIPCalculator(model, device=device, dtype=dtype, dispersion=dispersion, max_memory_gb=max_memory_gb)
            relaxed = []
            for name, _, atoms in items:
                click.echo(f"relaxing {name} ({optimizer.upper()}, fmax={fmax} eV/Å)")
                relaxed.append(relax_one(atoms, fmax=fmax, relax_cell=relax_cell, optimizer=optimizer,
                                         max_steps=max_steps, pressure=pressure, calculator=calc))
    except (ValueError, FileNotFoundError, ImportError, MemoryError) as err:
        raise click.ClickException(str(err)) from err

    rows = []
    for (name, path, _), atoms in zip(items, relaxed):
        n = len(atoms)
        energy = float(atoms.get_potential_energy())
        volume = float(abs(atoms.cell.volume)) if atoms.cell.rank == 3 else 0.0
        rows.append({
            "structure": name, "formula": atoms.get_chemical_formula(), "n_atoms": n, "energy_eV": energy,
            "energy_per_atom_eV": energy / max(n, 1), "volume_A3": volume, "steps": atoms.info["relax_steps"],
            "converged": bool(atoms.info["relax_converged"]), "fmax_eV_A": atoms.info["relax_fmax"],
        })
        atoms.info["name"] = name
        _write_native(atoms, name, path, out_dir)
    write(out_dir / "relaxed.extxyz", relaxed, format="extxyz")
    with open(out_dir / "relax.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    n_conv = sum(r["converged"] for r in rows)
    for r in rows:
        flag = "" if r["converged"] else "  NOT CONVERGED"
        click.echo(f"{r['structure']:<24} {r['formula']:<12} E={r['energy_eV']:.6f} eV  V={r['volume_A3']:.3f} Å³  "
                   f"steps={r['steps']}{flag}")
    click.echo(f"{n_conv}/{len(rows)} converged; wrote {out_dir / 'relaxed.extxyz'} and {out_dir / 'relax.csv'}")
