"""Materials properties from any ASE calculator: equation of state, elastic constants, phonons.

Units: eV, Å, Å³ for energies and volumes; GPa for moduli and elastic constants; THz for phonon
frequencies. Use a float64 calculator (``MLIPCalculator(..., dtype="float64")``): finite
differences of forces and stresses amplify float32 round-off.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import GPa

__all__ = ["VOIGT", "elastic_constants", "eos", "frequencies_at", "phonons"]

#: Voigt order of ASE's stress (xx yy zz yz xz xy) as Cartesian index pairs
VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _periodic(atoms: Atoms, what: str) -> None:
    if not bool(np.all(atoms.pbc)) or atoms.cell.rank != 3:
        raise ValueError(f"{what} needs a crystal: a cell periodic in all three directions (pbc={atoms.pbc.tolist()})")


def eos(atoms: Atoms, calc: Calculator, strain: float = 0.04, n_points: int = 9,
        kind: str = "birchmurnaghan") -> dict[str, Any]:
    """Energy-volume curve of ``atoms`` scaled isotropically, fitted by ASE's ``EquationOfState``.

    Args:
        atoms: a crystal (left unmodified); its shape and fractional positions are kept.
        calc: any ASE calculator.
        strain: largest linear strain of the scan (volumes from ``(1 - strain)^3`` to ``(1 + strain)^3``).
        n_points: volumes in the scan.
        kind: an ``ase.eos`` form (``"birchmurnaghan"``, ``"murnaghan"``, ``"sj"``, ...).

    Returns:
        ``v0`` (Å³), ``e0`` (eV), ``bulk_modulus`` (GPa) of the cell as given, and the scan:
        ``volumes`` [n_points] Å³, ``energies`` [n_points] eV.
    """
    from ase.eos import EquationOfState

    _periodic(atoms, "eos")
    if n_points < 5:
        raise ValueError(f"n_points must be at least 5 for a fit, got {n_points}")
    volumes, energies = [], []
    for s in np.linspace(1.0 - strain, 1.0 + strain, n_points):
        scaled = atoms.copy()
        scaled.set_cell(np.asarray(atoms.cell) * s, scale_atoms=True)
        scaled.calc = calc
        volumes.append(scaled.get_volume())
        energies.append(scaled.get_potential_energy())
    v0, e0, b = EquationOfState(volumes, energies, eos=kind).fit()
    return {"v0": float(v0), "e0": float(e0), "bulk_modulus": float(b / GPa),
            "volumes": np.array(volumes), "energies": np.array(energies)}


def _strained(atoms: Atoms, voigt: int, amount: float) -> Atoms:
    """``atoms`` under the Voigt strain component ``voigt`` of size ``amount`` (engineering shear)."""
    eps = np.zeros((3, 3))
    i, j = VOIGT[voigt]
    eps[i, j] += amount if i == j else amount / 2
    if i != j:
        eps[j, i] += amount / 2
    out = atoms.copy()
    out.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + eps), scale_atoms=True)  # rows: a' = a (1 + ε)
    return out


def _stress_after_relaxing_ions(atoms: Atoms, calc: Calculator, fmax: float, relax_ions: bool) -> np.ndarray:
    """Voigt stress (eV/Å³) once the atoms (not the cell) are relaxed to ``fmax``."""
    from ase.optimize import BFGS

    atoms.calc = calc
    if relax_ions and len(atoms) > 1:
        BFGS(atoms, logfile=None).run(fmax=fmax, steps=200)
    return atoms.get_stress(voigt=True)


def elastic_constants(atoms: Atoms, calc: Calculator, delta: float = 0.005, relax: bool = True,
                      fmax: float = 1e-4, relax_ions: bool = True) -> dict[str, Any]:
    """Elastic constants from stresses at finite strains, after relaxing the cell.

    Each of the six Voigt strains ``±delta`` (shear as engineering strain) is applied to the relaxed
    cell, the ions relax at fixed cell (relaxed-ion constants), and ``C_ij = dσ_i/dε_j`` by central
    differences of ASE's stress (positive = tensile, so ``σ = C ε``); the matrix is symmetrised.

    Args:
        atoms: a crystal (left unmodified).
        calc: any ASE calculator (float64 for an mlip model).
        delta: strain step.
        relax: relax positions and cell first (``FrechetCellFilter``, BFGS, to ``fmax``).
        fmax: force threshold of the relaxations, eV/Å.
        relax_ions: relax the atoms in every strained cell.

    Returns:
        ``C11``, ``C12``, ... ``C66`` (every ``i <= j``) and ``matrix`` [6, 6], in GPa; bulk and shear
        moduli (GPa) in the Voigt, Reuss and Hill (``bulk_modulus``, ``shear_modulus``) averages;
        ``atoms``: the relaxed structure the strains were applied to.
    """
    from mlip.md.relaxation import relax as relax_structure

    _periodic(atoms, "elastic_constants")
    ref = atoms.copy()
    if relax:
        ref = relax_structure(ref, calculator=calc, relax_cell=True, fmax=fmax, optimizer="BFGS", max_steps=1000)
    c = np.zeros((6, 6))
    for j in range(6):
        plus = _stress_after_relaxing_ions(_strained(ref, j, delta), calc, fmax, relax_ions)
        minus = _stress_after_relaxing_ions(_strained(ref, j, -delta), calc, fmax, relax_ions)
        c[:, j] = (plus - minus) / (2 * delta) / GPa
    c = 0.5 * (c + c.T)
    out: dict[str, Any] = {f"C{i + 1}{j + 1}": float(c[i, j]) for i in range(6) for j in range(i, 6)}
    out.update(_moduli(c))
    out["matrix"] = c
    out["atoms"] = ref
    return out


def _moduli(c: np.ndarray) -> dict[str, float]:
    """Voigt, Reuss and Hill bulk and shear moduli (GPa) of a 6x6 stiffness matrix in GPa."""
    k_v = (c[0, 0] + c[1, 1] + c[2, 2] + 2 * (c[0, 1] + c[0, 2] + c[1, 2])) / 9
    g_v = (c[0, 0] + c[1, 1] + c[2, 2] - (c[0, 1] + c[0, 2] + c[1, 2]) + 3 * (c[3, 3] + c[4, 4] + c[5, 5])) / 15
    s = np.linalg.inv(c)
    k_r = 1.0 / (s[0, 0] + s[1, 1] + s[2, 2] + 2 * (s[0, 1] + s[0, 2] + s[1, 2]))
    g_r = 15.0 / (4 * (s[0, 0] + s[1, 1] + s[2, 2]) - 4 * (s[0, 1] + s[0, 2] + s[1, 2]) + 3 * (s[3, 3] + s[4, 4] + s[5, 5]))
    return {"bulk_modulus_voigt": float(k_v), "bulk_modulus_reuss": float(k_r), "bulk_modulus": float((k_v + k_r) / 2),
            "shear_modulus_voigt": float(g_v), "shear_modulus_reuss": float(g_r), "shear_modulus": float((g_v + g_r) / 2)}


def _phonopy() -> Any:
    try:
        import phonopy
    except ImportError as err:
        raise ImportError("phonons need phonopy: pip install 'mlip[phonons]' (or pip install phonopy)") from err
    return phonopy


def phonons(atoms: Atoms, calc: Calculator, supercell: tuple[int, int, int] = (3, 3, 3), displacement: float = 0.01,
            mesh: tuple[int, int, int] = (12, 12, 12), band_points: int = 51,
            plot: str | os.PathLike | None = None) -> dict[str, Any]:
    """Harmonic phonons by finite displacements (phonopy), forces from ``calc``.

    Args:
        atoms: the unit cell (primitive or conventional: phonopy finds the primitive cell); relax it first.
        calc: any ASE calculator (float64 for an mlip model).
        supercell: repeats of ``atoms`` for the force constants.
        displacement: atomic displacement, Å.
        mesh: q-point mesh of the density of states.
        band_points: q-points of the band structure (along ASE's special-point path of the primitive cell).
        plot: save a band-structure + DOS figure here (matplotlib).

    Returns:
        ``gamma_thz`` [3 n_prim] frequencies at Γ (THz; acoustic ones near 0); ``band``: ``distances``
        [n_q], ``frequencies`` [n_q, 3 n_prim] THz, ``path`` (labels), ``label_distances``;
        ``dos``: ``frequencies`` [n_f] THz and ``dos`` [n_f] (states/THz per primitive cell);
        ``phonopy``: the ``Phonopy`` object (force constants, thermal properties, ...).
    """
    phonopy = _phonopy()
    from phonopy.structure.atoms import PhonopyAtoms

    _periodic(atoms, "phonons")
    unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell),
                        scaled_positions=atoms.get_scaled_positions())
    ph = phonopy.Phonopy(unit, supercell_matrix=np.diag(supercell), primitive_matrix="auto")
    ph.generate_displacements(distance=displacement)
    forces = []
    for sc in ph.supercells_with_displacements:
        displaced = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        displaced.calc = calc
        f = displaced.get_forces()
        forces.append(f - f.mean(axis=0))  # the net force of a finite-difference step is numerical noise
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    gamma = frequencies_at(ph, [[0.0, 0.0, 0.0]])[0]
    band = _band_structure(ph, band_points)
    ph.run_mesh(list(mesh), is_gamma_center=True)  # keeps the point-group symmetry of the mesh
    ph.run_total_dos()
    dos = ph.total_dos
    out = {"gamma_thz": gamma, "band": band,
           "dos": {"frequencies": np.asarray(dos.frequency_points), "dos": np.asarray(dos.dos)},
           "phonopy": ph}
    if plot is not None:
        _plot(out, plot)
    return out


def frequencies_at(ph: Any, qpoints: Any) -> np.ndarray:
    """Phonon frequencies (THz; imaginary ones negative) at ``qpoints`` [n_q, 3] (reduced coordinates of
    the primitive cell's reciprocal lattice) of a ``Phonopy`` object with force constants -> [n_q, n_modes]."""
    ph.run_qpoints(np.asarray(qpoints, dtype=float))
    return np.asarray(ph.qpoints.frequencies)


def _band_structure(ph: Any, n_points: int) -> dict[str, Any]:
    """Frequencies along ASE's special-point path of the primitive cell (q in its reduced coordinates)."""
    from ase.cell import Cell

    path = Cell(ph.primitive.cell).bandpath(npoints=n_points)
    ph.run_band_structure([path.kpts])
    x, special, labels = path.get_linear_kpoint_axis()
    return {"distances": np.asarray(x), "frequencies": np.asarray(ph.band_structure.frequencies[0]), "path": path.path,
            "label_distances": np.asarray(special), "labels": list(labels)}


def _plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    band, dos = result["band"], result["dos"]
    fig, (ax_b, ax_d) = plt.subplots(1, 2, figsize=(8, 4), sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    ax_b.plot(band["distances"], band["frequencies"], color="C0", lw=1)
    ax_b.set_xticks(band["label_distances"], [lab.replace("G", "Γ") for lab in band["labels"]])
    for x in band["label_distances"]:
        ax_b.axvline(x, color="0.8", lw=0.5)
    ax_b.axhline(0.0, color="0.5", lw=0.5)
    ax_b.set_xlim(band["distances"][0], band["distances"][-1])
    ax_b.set_ylabel("frequency (THz)")
    ax_d.plot(dos["dos"], dos["frequencies"], color="C1")
    ax_d.set_xlabel("DOS (1/THz)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
