"""Dataset statistics: per-element reference energies (E0s), neighbour counts, label summaries.

E0s come either from isolated-atom frames (:func:`e0s_from_isolated_atoms`) or from a least-squares
fit of total energies on element counts (:func:`fit_e0s`). All energies are eV, forces eV/Å,
stress eV/Å³ (ASE sign). Functions taking ``atoms_list`` read canonical labels
(``atoms.info["energy"]`` ...; see :mod:`mlip.data.formats`); one head (level of theory) at a time.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from mlip import keys as K
from mlip.data.formats.labels import is_isolated_atom

__all__ = [
    "E0Table",
    "average_num_neighbors",
    "e0s_from_isolated_atoms",
    "fit_e0s",
    "fit_e0s_compositions",
    "format_summary",
    "summarize",
]

#: two isolated-atom energies of one element farther apart than this (eV) are a conflict
E0_CONFLICT_TOL = 1e-6


def _where(atoms: Atoms, i: int) -> str:
    return str(atoms.info.get(K.SOURCE, f"structure {i}"))


def _energy(atoms: Atoms) -> float:
    """The energy label in eV, NaN when missing."""
    value = atoms.info.get(K.ENERGY)
    return float("nan") if value is None else float(value)


class E0Table:
    """The compositions and energies of one head's structures, streamed: the one place E0s are taken.

    Both ways of taking E0s read from it: the isolated-atom energies (:meth:`from_isolated`) and
    the least-squares fit over every labelled structure (:meth:`fit`, see
    :func:`fit_e0s_compositions`). Only element counts and energies are kept, so a data set
    larger than memory can be streamed through :meth:`add`.

    >>> t = E0Table()
    >>> t.add([1], -13.6, isolated=True, where="H atom")
    >>> t.add([1, 1], -31.7, isolated=False, where="H2")
    >>> t.from_isolated()
    {1: -13.6}
    """

    def __init__(self) -> None:
        self.compositions: list[tuple[dict[int, int], float]] = []
        #: per entry of ``compositions``: an isolated-atom frame
        self.flags: list[bool] = []
        self.elements: set[int] = set()
        self.isolated: dict[int, tuple[float, str]] = {}
        self.unlabelled_isolated: dict[int, str] = {}

    def add(self, numbers: Iterable[int], energy: float, isolated: bool, where: str) -> None:
        """Record one structure (``energy`` in eV, NaN when unlabelled; ``where`` names it in errors).

        Raises:
            ValueError: an isolated-atom frame with more than one atom; an element whose
                isolated-atom energies differ by more than :data:`E0_CONFLICT_TOL`.
        """
        comp = dict(Counter(int(z) for z in numbers))
        energy = float(energy)
        self.elements.update(comp)
        self.compositions.append((comp, energy))
        self.flags.append(bool(isolated))
        if not isolated:
            return
        if sum(comp.values()) != 1:
            raise ValueError(f"{where}: marked as an isolated atom but has {sum(comp.values())} atoms")
        (z,) = comp
        if not math.isfinite(energy):
            self.unlabelled_isolated.setdefault(z, where)
            return
        if z in self.isolated and abs(self.isolated[z][0] - energy) > E0_CONFLICT_TOL:
            first, origin = self.isolated[z]
            raise ValueError(
                f"two different isolated-atom energies for {chemical_symbols[z]} (Z={z}): {first!r} eV "
                f"({origin}) and {energy!r} eV ({where}); split the data by head (level of theory) or remove one")
        self.isolated.setdefault(z, (energy, where))

    def structures(self) -> Iterator[tuple[dict[int, int], float]]:
        """``({Z: count}, energy)`` of every structure that is not an isolated-atom frame."""
        return (c for c, iso in zip(self.compositions, self.flags) if not iso)

    def covered(self, elements: Iterable[int] | None = None) -> bool:
        """Every element (default: every element seen) has an isolated-atom energy."""
        return set(self.elements if elements is None else elements) <= set(self.isolated)

    def from_isolated(self, elements: Iterable[int] | None = None) -> dict[int, float]:
        """``{Z: E0 in eV}`` from the isolated-atom frames, for ``elements`` (default: every element seen).

        Raises:
            ValueError: an element without an isolated-atom frame (or only unlabelled ones).
        """
        needed = sorted(self.elements if elements is None else {int(z) for z in elements})
        missing = [z for z in needed if z not in self.isolated]
        unlabelled = [z for z in missing if z in self.unlabelled_isolated]
        if unlabelled:
            z = unlabelled[0]
            raise ValueError(f"{self.unlabelled_isolated[z]}: isolated-atom frame of {chemical_symbols[z]} "
                             "has no energy label")
        if missing:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
            raise ValueError(f"no isolated-atom frame for {names}; add one per element or fit the E0s")
        return {z: self.isolated[z][0] for z in needed}

    def fit(self, elements: Sequence[int] | None = None) -> dict[int, float]:
        """Least-squares E0s over every labelled structure (:func:`fit_e0s_compositions`)."""
        return fit_e0s_compositions(self.compositions, elements)


def _table(atoms_list: Iterable[Atoms], fitted: Sequence[int] | None = None) -> E0Table:
    """An :class:`E0Table` of ``atoms_list``; a labelled frame with an element outside ``fitted``
    (when given) is an error naming the frame."""
    wanted = None if fitted is None else {int(z) for z in fitted}
    table = E0Table()
    for i, atoms in enumerate(atoms_list):
        energy = _energy(atoms)
        extra = set() if wanted is None or not math.isfinite(energy) else set(atoms.numbers.tolist()) - wanted
        if extra:
            raise ValueError(f"{_where(atoms, i)}: contains {[chemical_symbols[z] for z in sorted(extra)]}, not "
                             f"among the elements to fit {[chemical_symbols[z] for z in sorted(wanted)]}")
        table.add(atoms.numbers, energy, is_isolated_atom(atoms), _where(atoms, i))
    return table


def e0s_from_isolated_atoms(atoms_list: Iterable[Atoms], elements: Sequence[int] | None = None) -> dict[int, float]:
    """Per-element reference energies from isolated-atom frames (:meth:`E0Table.from_isolated`).

    Args:
        atoms_list: structures with canonical labels; the isolated-atom frames among them (see
            :func:`~mlip.data.formats.labels.is_isolated_atom`) give the E0s, the others say which
            elements are needed.
        elements: atomic numbers that need an E0 (default: every element of ``atoms_list``).

    Returns:
        ``{Z: E0 in eV}`` for every needed element, sorted by Z.

    Raises:
        ValueError: see :meth:`E0Table.add` and :meth:`E0Table.from_isolated`.

    >>> from ase import Atoms
    >>> frames = [Atoms("H", info={"energy": -13.6, "isolated_atom": True}), Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])]
    >>> e0s_from_isolated_atoms(frames)
    {1: -13.6}
    """
    return _table(atoms_list).from_isolated(elements)


def fit_e0s(atoms_list: Iterable[Atoms], elements: Sequence[int] | None = None) -> dict[int, float]:
    """Per-element energies by least squares, ``E_total ≈ Σ_Z n_Z · E0_Z``, over labelled frames.

    Frames without an energy label are skipped; two isolated-atom frames of one element that
    disagree are an error (:meth:`E0Table.add`). See :func:`fit_e0s_compositions` for the method
    and the rank-deficient case.

    Args:
        atoms_list: structures with ``info["energy"]`` in eV.
        elements: atomic numbers to fit (default: every element of the labelled frames); an
            element of a labelled frame that is not listed is an error.

    Returns:
        ``{Z: E0 in eV}``, sorted by Z.

    >>> from ase import Atoms
    >>> frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]], info={"energy": -2.0}),
    ...           Atoms("HO", positions=[[0, 0, 0], [0, 0, 1.0]], info={"energy": -5.0})]
    >>> {z: round(e, 9) for z, e in fit_e0s(frames).items()}
    {1: -1.0, 8: -4.0}
    """
    return _table(atoms_list, fitted=elements).fit(elements)


def fit_e0s_compositions(compositions: Iterable[tuple[dict[int, int], float]],
                         elements: Sequence[int] | None = None) -> dict[int, float]:
    """Least-squares per-element energies, ``E ≈ Σ_Z n_Z · E0_Z``, from ``({Z: count}, energy in eV)`` pairs.

    Pairs with a non-finite energy are skipped. When the compositions do not determine every
    E0 (e.g. a data set of water only fixes ``2 E0_H + E0_O``), the solution is the one closest
    to the mean per-atom energy ``μ`` in the undetermined directions: ``x = μ·1 + lstsq(A, y - A μ·1)``
    (the minimum-norm least-squares deviation from ``μ``), and a ``UserWarning`` names the
    elements whose E0 is not determined. The fit still reproduces every determined combination.

    Raises:
        ValueError: no labelled structure, or one containing an element outside ``elements``.

    Shapes:
        the design matrix A is [n_labelled, n_elements] element counts; y [n_labelled] eV.

    >>> e0s = fit_e0s_compositions([({1: 2}, -2.0), ({1: 1, 8: 1}, -5.0)], [1, 8])
    >>> {z: round(e, 9) for z, e in e0s.items()}
    {1: -1.0, 8: -4.0}
    """
    counts: list[dict[int, int]] = []
    energies: list[float] = []
    seen: set[int] = set()
    wanted = None if elements is None else {int(z) for z in elements}
    for k, (comp, energy) in enumerate(compositions):
        energy = float(energy)
        if not math.isfinite(energy):
            continue
        comp = {int(z): int(n) for z, n in comp.items() if n}
        if wanted is not None and set(comp) - wanted:
            extra = [chemical_symbols[z] for z in sorted(set(comp) - wanted)]
            raise ValueError(f"structure {k}: contains {extra}, not among the elements to fit "
                             f"{[chemical_symbols[z] for z in sorted(wanted)]}")
        seen.update(comp)
        counts.append(comp)
        energies.append(energy)
    if not energies:
        raise ValueError("fit_e0s: no structure carries an energy label")
    zs = sorted(seen if wanted is None else wanted)
    col = {z: k for k, z in enumerate(zs)}
    a = np.zeros((len(counts), len(zs)))  # [n_labelled, n_elements] element counts
    for row, comp in enumerate(counts):
        for z, n in comp.items():
            a[row, col[z]] = n
    y = np.asarray(energies, dtype=np.float64)  # [n_labelled] eV
    mu = float(y.sum() / a.sum())
    prior = np.full(len(zs), mu)
    delta, _, rank, _ = np.linalg.lstsq(a, y - a @ prior, rcond=None)
    solution = prior + delta
    if rank < len(zs):
        # null space of A: right singular vectors beyond the rank; an element is undetermined
        # when its unit vector is not in the row space, i.e. it has weight in the null space
        _, _, vt = np.linalg.svd(a, full_matrices=True)
        null = vt[rank:]  # [n_elements - rank, n_elements]
        loose = [z for z, k in col.items() if np.linalg.norm(null[:, k]) > 1e-8]
        names = ", ".join(chemical_symbols[z] for z in loose)
        warnings.warn(
            f"fit_e0s: the compositions of the {len(y)} labelled structures determine only {rank} of "
            f"{len(zs)} E0s (rank-deficient); E0s of {names} are not separable (these elements appear "
            f"only in fixed ratios, or never). Using the solution closest to the mean per-atom energy "
            f"{mu:.6g} eV in the undetermined directions. Add isolated-atom frames or structures of "
            "other compositions for physical E0s.",
            UserWarning, stacklevel=3,
        )
    return {z: float(solution[col[z]]) for z in zs}


def average_num_neighbors(dataset: Any) -> float:
    """Mean number of neighbours per atom (edges / atoms) over a dataset.

    Args:
        dataset: a :class:`~mlip.data.datasets.GraphDataset` (uses its cached ``n_edges`` /
            ``n_atoms``) or any sequence of :class:`~mlip.data.graph.AtomGraph`.

    Returns:
        ``Σ n_edges / Σ n_atoms`` (0 for an empty dataset).
    """
    n_edges = getattr(dataset, "n_edges", None)
    n_atoms = getattr(dataset, "n_atoms", None)
    if isinstance(n_edges, np.ndarray) and isinstance(n_atoms, np.ndarray):
        total_edges, total_atoms = int(n_edges.sum()), int(n_atoms.sum())
    else:
        total_edges = total_atoms = 0
        for i in range(len(dataset)):
            g = dataset[i]
            total_edges += g.n_edges
            total_atoms += g.n_atoms
    return total_edges / total_atoms if total_atoms else 0.0


class _Moments:
    """Running count, mean and sum of squared deviations (Welford), plus min/max."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        n_b, mean_b = values.size, float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.n + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d * d * self.n * n_b / n
        self.n = n
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")


class _Summary:
    """Running statistics of :func:`summarize`, one structure at a time."""

    def __init__(self) -> None:
        self.n_structures = self.n_atoms_total = 0
        self.atom_counts = _Moments()
        self.elements: Counter = Counter()
        self.element_structures: Counter = Counter()
        self.labels = {name: 0 for name in (K.ENERGY, K.FORCES, K.STRESS, K.CHARGE, K.SPIN, K.WEIGHT, K.HEAD)}
        self.periodic = self.molecular = self.partial = self.isolated = 0
        self.e_per_atom = _Moments()
        self.force_sq, self.force_n, self.force_max = 0.0, 0, 0.0
        self.stress = _Moments()
        self.tags: dict[str, Counter] = {name: Counter() for name in ("heads", "config_types", "charges", "spins")}

    def add(self, atoms: Atoms) -> None:
        n = len(atoms)
        self.n_structures += 1
        self.n_atoms_total += n
        self.atom_counts.add(np.array([n]))
        zs, cnt = np.unique(atoms.numbers, return_counts=True)
        for z, c in zip(zs.tolist(), cnt.tolist()):
            self.elements[z] += c
            self.element_structures[z] += 1
        pbc = np.asarray(atoms.pbc, dtype=bool)
        self.periodic += int(pbc.all())
        self.molecular += int(not pbc.any())
        self.partial += int(pbc.any() and not pbc.all())
        self.isolated += int(is_isolated_atom(atoms))
        for name in self.labels:
            present = name in atoms.arrays if name == K.FORCES else atoms.info.get(name) is not None
            self.labels[name] += int(present)
        self._add_labels(atoms, n)
        info = atoms.info
        self.tags["heads"][str(info.get(K.HEAD, "default"))] += 1
        for tag, key, cast in (("config_types", K.CONFIG_TYPE, str), ("charges", K.CHARGE, float),
                               ("spins", K.SPIN, float)):
            if info.get(key) is not None:
                self.tags[tag][cast(info[key])] += 1

    def _add_labels(self, atoms: Atoms, n: int) -> None:
        energy = _energy(atoms)
        if math.isfinite(energy):
            self.e_per_atom.add(np.array([energy / n]))
        if K.FORCES in atoms.arrays:
            f = np.asarray(atoms.arrays[K.FORCES], dtype=np.float64)
            self.force_sq += float((f**2).sum())
            self.force_n += f.size
            self.force_max = max(self.force_max, float(np.linalg.norm(f, axis=1).max()) if n else 0.0)
        if atoms.info.get(K.STRESS) is not None:
            self.stress.add(np.asarray(atoms.info[K.STRESS], dtype=np.float64))

    def result(self) -> dict[str, Any]:
        nan, some = float("nan"), self.n_structures > 0
        e, st = self.e_per_atom, self.stress
        return {
            "n_structures": self.n_structures,
            "n_atoms_total": self.n_atoms_total,
            "n_atoms_min": int(self.atom_counts.min) if some else 0,
            "n_atoms_max": int(self.atom_counts.max) if some else 0,
            "n_atoms_mean": self.atom_counts.mean if some else nan,
            "elements": {chemical_symbols[z]: self.elements[z] for z in sorted(self.elements)},
            "element_structures": {chemical_symbols[z]: self.element_structures[z]
                                   for z in sorted(self.element_structures)},
            "labels": self.labels,
            "n_periodic": self.periodic,
            "n_molecular": self.molecular,
            "n_partially_periodic": self.partial,
            "n_isolated_atoms": self.isolated,
            "energy_per_atom_mean": e.mean if e.n else nan,
            "energy_per_atom_std": e.std,
            "energy_per_atom_min": e.min if e.n else nan,
            "energy_per_atom_max": e.max if e.n else nan,
            "forces_rms": math.sqrt(self.force_sq / self.force_n) if self.force_n else nan,
            "forces_max": self.force_max if self.force_n else nan,
            "stress_min": st.min if st.n else nan,
            "stress_max": st.max if st.n else nan,
            **{tag: dict(sorted(c.items())) for tag, c in self.tags.items()},
        }


def summarize(atoms_list: Iterable[Atoms]) -> dict[str, Any]:
    """Statistics of a data set for ``mlip data inspect``; streams (one structure at a time).

    Args:
        atoms_list: structures with canonical labels (a list or e.g. ``iter_read(path)``).

    Returns:
        A dict with ``n_structures``; ``n_atoms_total/min/max/mean``; ``elements``
        ``{symbol: n atoms}`` and ``element_structures`` ``{symbol: n structures containing it}``
        (ordered by Z); ``labels`` ``{energy, forces, stress, charge, spin, weight, head: n
        structures carrying it}``; ``n_periodic`` (all three directions periodic),
        ``n_molecular`` (none), ``n_partially_periodic``, ``n_isolated_atoms``;
        ``energy_per_atom_mean/std/min/max`` (eV/atom, over every structure with an energy,
        isolated atoms included), ``forces_rms`` (RMS of force components, eV/Å),
        ``forces_max`` (largest per-atom |F|, eV/Å), ``stress_min/max`` (component range, eV/Å³),
        ``heads``, ``config_types``, ``charges``, ``spins`` (value -> n structures). Statistics
        with no data are NaN.
    """
    summary = _Summary()
    for atoms in atoms_list:
        summary.add(atoms)
    return summary.result()


def format_summary(summary: dict[str, Any], title: str | None = None) -> str:
    """Plain-text table of a :func:`summarize` result."""
    n = summary["n_structures"]
    lines = [title] if title else []

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<26s} {value}")

    def num(v: float, fmt: str = ".6g") -> str:
        return "n/a" if not math.isfinite(v) else format(v, fmt)

    def counts(d: dict) -> str:
        return ", ".join(f"{k:g}: {v}" if isinstance(k, float) else f"{k}: {v}" for k, v in d.items()) or "-"

    row("structures", str(n))
    row("atoms total", str(summary["n_atoms_total"]))
    row("atoms per structure", f"min {summary['n_atoms_min']}, max {summary['n_atoms_max']}, "
                               f"mean {num(summary['n_atoms_mean'], '.2f')}")
    row("periodic / molecular", f"{summary['n_periodic']} / {summary['n_molecular']}"
        + (f" (+{summary['n_partially_periodic']} partially periodic)" if summary["n_partially_periodic"] else ""))
    row("isolated-atom frames", str(summary["n_isolated_atoms"]))
    lines.append("  elements (atoms, structures):")
    for sym, count in summary["elements"].items():
        lines.append(f"    {sym:<4s} {count:>10d} {summary['element_structures'][sym]:>8d}")
    lines.append("  label coverage (structures):")
    for name, count in summary["labels"].items():
        pct = 100.0 * count / n if n else 0.0
        lines.append(f"    {name:<8s} {count:>8d} / {n} ({pct:5.1f}%)")
    row("energy per atom [eV]", f"mean {num(summary['energy_per_atom_mean'])}, std {num(summary['energy_per_atom_std'])}, "
                                f"min {num(summary['energy_per_atom_min'])}, max {num(summary['energy_per_atom_max'])}")
    row("force RMS [eV/Å]", num(summary["forces_rms"]))
    row("max |F| [eV/Å]", num(summary["forces_max"]))
    row("stress range [eV/Å³]", f"{num(summary['stress_min'])} .. {num(summary['stress_max'])}")
    row("heads", counts(summary["heads"]))
    if summary["config_types"]:
        row("config types", counts(summary["config_types"]))
    if summary["charges"]:
        row("charges", counts(summary["charges"]))
    if summary["spins"]:
        row("spin multiplicities", counts(summary["spins"]))
    return "\n".join(lines)
