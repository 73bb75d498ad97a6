"""``build_data``: training/validation/test splits, dataset tags (heads), E0s and statistics.

Datasets stay map-style and lazy (``mlip.data.datasets``): a split is a dataset plus a list of
indices, so an HDF5 file larger than memory is read structure by structure while training.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlip.data.graph import AtomGraph
from mlip.train.config import ConfigError


@dataclass
class Entry:
    """One data file of the config with its dataset tag and weight multiplier."""

    path: str
    head: str | None
    weight: float = 1.0


class Split:
    """A view of ``dataset`` restricted to ``indices``; ``split[k]`` is an :class:`AtomGraph`.

    Shapes:
        n_atoms, n_edges: [len(indices)] per-structure sizes (for bounded batching).
    """

    def __init__(self, dataset: Any, indices: np.ndarray, n_atoms: np.ndarray, n_edges: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.n_atoms = np.asarray(n_atoms, dtype=np.int64)[self.indices]
        self.n_edges = np.asarray(n_edges, dtype=np.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> AtomGraph:
        return self.dataset[int(self.indices[k])]


class _Tagged:
    """Concatenation of datasets, each with a weight multiplier; optionally caches graphs.

    Caching keeps every built graph in memory (neighbour lists are then built once, not once
    per epoch); it is off for parts streamed from HDF5 unless asked for.
    """

    def __init__(self, parts: list[tuple[Any, float, bool]]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(d) for d, _, _ in parts])
        self.cache: dict[int, AtomGraph] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> AtomGraph:
        i = int(i)
        if i in self.cache:
            return self.cache[i]
        p = int(np.searchsorted(self.offsets, i, side="right") - 1)
        ds, w, cache = self.parts[p]
        g = ds[i - int(self.offsets[p])]
        if w != 1.0:
            g.weight = g.weight * w
        if cache:
            self.cache[i] = g
        return g


@dataclass
class Data:
    """Everything :func:`build_data` prepares for the model and the loop."""

    train: Split
    valid: Split | None
    test: Split | None
    heads: list[str]
    elements: list[int]
    e0s: dict[str, dict[int, float]] | None
    avg_num_neighbors: float | None
    shift: float | None = None
    scale: float | None = None
    #: every training structure carries a finite total charge and spin multiplicity (OMol25-style)
    charge_spin: bool = False

    def e0s_for_model(self) -> dict | None:
        """E0s in the model config's format: ``{Z: eV}`` for one head, ``{head: {Z: eV}}`` for several."""
        if self.e0s is None:
            return None
        if len(self.heads) == 1:
            return dict(self.e0s[self.heads[0]])
        return {h: dict(self.e0s[h]) for h in self.heads}


def entries(value: Any, default_head: str, what: str) -> list[Entry]:
    """Normalise a config value (path, list of paths, or ``{path, head, weight}`` mappings).

    A head given by the entry or by a non-default ``data.head`` overrides the files' own
    ``head`` tags; otherwise the files' tags (or ``"default"``) are kept.
    """
    fallback = None if default_head == "default" else default_head
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {"path", "head", "weight"}
            if unknown or "path" not in item:
                raise ConfigError(f"data.{what}: an entry must be a path or {{path, head, weight}}, got {item!r}")
            head = item.get("head", fallback)
            out.append(Entry(str(item["path"]), None if head is None else str(head), float(item.get("weight", 1.0))))
        else:
            out.append(Entry(str(item), fallback))
    return out


def _open(entry_list: list[Entry], cfg, r_max: float) -> tuple[Any, np.ndarray, np.ndarray]:  # noqa: ANN001
    """Open the entries as one :class:`_Tagged` dataset with per-structure atom and edge counts.

    Edge counts need a neighbour list per structure: they are computed here when graphs are
    cached (the pass fills the cache) or edge-bounded batches need them; otherwise (streamed
    HDF5 with atom-bounded batches) they stay zero and no extra pass over the file is made.
    """
    from mlip.data.datasets import open_dataset
    from mlip.data.formats import detect_format

    keys = None
    if cfg.data.keys:
        from mlip.data.formats import LabelKeys

        keys = LabelKeys(**cfg.data.keys)
    parts = []
    for e in entry_list:
        ds = open_dataset([e.path], r_max=r_max, keys=keys, head=e.head)
        streamed = detect_format(e.path) == "hdf5"
        cache = cfg.data.cache_graphs is True or (cfg.data.cache_graphs == "auto" and not streamed)
        parts.append((ds, e.weight, cache))
    ds = _Tagged(parts)
    n_atoms = np.concatenate([_n_atoms(d) for d, _, _ in parts]).astype(np.int64)
    if cfg.batch.max_edges is not None or all(c for _, _, c in parts):
        n_edges = np.array([ds[i].n_edges for i in range(len(ds))], dtype=np.int64)
    else:
        n_edges = np.zeros(len(ds), dtype=np.int64)
    return ds, n_atoms, n_edges


def _n_atoms(ds: Any) -> np.ndarray:
    if hasattr(ds, "n_atoms"):
        return np.asarray(ds.n_atoms)
    return np.array([ds[i].n_atoms for i in range(len(ds))])


def build_data(cfg, r_max: float, log: logging.Logger | None = None) -> Data:  # noqa: ANN001
    """Open the configured files, split by fraction or by file, collect heads, elements,
    E0s (isolated atoms, else a least-squares fit) and the average neighbour count.

    Single-atom structures (isolated-atom reference energies) always stay in the training
    split: they set the E0s and would say nothing as validation data.
    """
    d = cfg.data
    train_e = entries(d.train, d.head, "train")
    ds, n_atoms, n_edges = _open(train_e, cfg, r_max)
    if len(ds) == 0:
        raise ConfigError(f"data.train ({[e.path for e in train_e]}) holds no structures")
    isolated = np.flatnonzero(n_atoms == 1)
    rest = np.flatnonzero(n_atoms != 1)
    order = rest[np.random.default_rng(d.split_seed).permutation(len(rest))]
    n_valid = int(round(d.valid_fraction * len(rest))) if d.valid is None else 0
    n_test = int(round(d.test_fraction * len(rest))) if d.test is None else 0
    if n_valid + n_test >= len(rest):
        raise ConfigError(f"data.train has {len(rest)} structures: too few to split off {n_valid} valid + {n_test} test")
    valid = Split(ds, np.sort(order[:n_valid]), n_atoms, n_edges) if n_valid else None
    test = Split(ds, np.sort(order[n_valid:n_valid + n_test]), n_atoms, n_edges) if n_test else None
    train = Split(ds, np.sort(np.concatenate([order[n_valid + n_test:], isolated])), n_atoms, n_edges)
    for name in ("valid", "test"):
        value = getattr(d, name)
        if value is not None:
            sds, sa, se = _open(entries(value, d.head, name), cfg, r_max)
            split = Split(sds, np.arange(len(sds)), sa, se)
            valid, test = (split, test) if name == "valid" else (valid, split)

    heads, elements, e0s, avg, shift, scale, from_isolated, charge_spin = _statistics(train, cfg, log)
    if from_isolated and len(isolated):
        # they define the E0s (exactly, as the model's per-element constants); as MACE does,
        # they are not fitted again, so they cannot pull on the interaction energy
        train = Split(ds, np.sort(order[n_valid + n_test:]), n_atoms, n_edges)
        if log is not None:
            log.info("%d isolated-atom structures set the E0s and are left out of the training loss", len(isolated))
    return Data(train, valid, test, heads, elements, e0s, avg, shift, scale, charge_spin)


def _statistics(train: Split, cfg, log: logging.Logger | None):  # noqa: ANN001, ANN202
    """One streaming pass over the training split: heads, elements, E0s, average neighbour
    count, the mean per-atom energy left after E0s (``shift``, eV) and the force RMS (``scale``,
    eV/Å), as MACE scales its atomic energies.

    Only per-structure compositions and energies are kept, so this works on datasets larger
    than memory.
    """
    comps: dict[str, list[tuple[dict[int, int], float]]] = {}
    elements: set[int] = set()
    n_edges = n_nodes = 0
    isolated: dict[str, dict[int, float]] = {}
    f_sq, f_n = 0.0, 0
    charge_spin = len(train) > 0
    for k in range(len(train)):
        g = train[k]
        charge_spin = charge_spin and bool(torch.isfinite(g.charge)) and bool(torch.isfinite(g.spin))
        if g.n_atoms > 1:
            ok = torch.isfinite(g.forces)
            f_sq += float(g.forces[ok].double().square().sum())
            f_n += int(ok.sum())
        zs, counts = np.unique(g.numbers.numpy(), return_counts=True)
        comp = {int(z): int(c) for z, c in zip(zs, counts)}
        elements.update(comp)
        if g.n_atoms > 1:  # isolated atoms would only dilute the neighbour count
            n_edges += g.n_edges
            n_nodes += g.n_atoms
        energy = float(g.energy)
        comps.setdefault(g.head, []).append((comp, energy))
        if g.n_atoms == 1 and math.isfinite(energy):
            isolated.setdefault(g.head, {})[int(g.numbers[0])] = energy
    heads = sorted(comps)
    avg = n_edges / max(n_nodes, 1)
    spec = cfg.data.e0s
    e0s: dict[str, dict[int, float]] | None
    from_isolated = False
    if isinstance(spec, dict):
        e0s = _explicit_e0s(spec, heads)
    elif spec == "none":
        e0s = None
    else:
        e0s = {}
        from_isolated = True
        for h in heads:
            need = sorted({z for comp, _ in comps[h] for z in comp})
            have = isolated.get(h, {})
            if spec == "isolated" or (spec == "auto" and set(need) <= set(have)):
                missing = set(need) - set(have)
                if missing:
                    from ase.data import chemical_symbols

                    raise ConfigError(
                        f"data.e0s: isolated: head {h!r} of data.train has no single-atom structure with an "
                        f"energy for {[chemical_symbols[z] for z in sorted(missing)]}; add them, give data.e0s "
                        f"as a mapping, or use fit")
                e0s[h] = {z: have[z] for z in need}
                how = "isolated atoms"
            else:
                e0s[h] = fit_e0s(comps[h], need)
                how = "a least-squares fit"
                from_isolated = False
            if log is not None:
                log.info("E0s for head %r from %s: %s", h, how, {z: round(v, 6) for z, v in e0s[h].items()})
    residuals = [
        (energy - sum(c * (e0s[h].get(z, 0.0) if e0s else 0.0) for z, c in comp.items())) / sum(comp.values())
        for h in heads for comp, energy in comps[h] if math.isfinite(energy) and sum(comp.values()) > 1
    ]
    shift = float(np.mean(residuals)) if residuals else None
    scale = math.sqrt(f_sq / f_n) if f_n and f_sq > 0 else None
    if log is not None:
        log.info("average neighbours %.3f, mean per-atom energy after E0s %s eV, force RMS %s eV/Å", avg,
                 f"{shift:.4f}" if shift is not None else "n/a", f"{scale:.4f}" if scale is not None else "n/a")
    return heads, sorted(elements), e0s, avg, shift, scale, from_isolated, charge_spin


def _explicit_e0s(spec: dict, heads: list[str]) -> dict[str, dict[int, float]]:
    from ase.data import atomic_numbers

    def table(t: dict) -> dict[int, float]:
        out = {}
        for k, v in t.items():
            z = atomic_numbers.get(k) if isinstance(k, str) and not k.isdigit() else int(k)
            if z is None:
                raise ConfigError(f"data.e0s: unknown element {k!r}")
            out[int(z)] = float(v)
        return out

    if all(isinstance(v, dict) for v in spec.values()):
        missing = set(heads) - set(spec)
        if missing:
            raise ConfigError(f"data.e0s gives no table for head(s) {sorted(missing)}")
        return {h: table(spec[h]) for h in heads}
    return {h: table(spec) for h in heads}


def fit_e0s(compositions: list[tuple[dict[int, int], float]], elements: list[int]) -> dict[int, float]:
    """Least-squares per-element energies, ``E ≈ Σ_Z n_Z · E0_Z``, over labelled structures.

    Args:
        compositions: ``({Z: count}, energy in eV)`` per structure (NaN energy = unlabelled).
        elements: atomic numbers to fit.

    >>> fit_e0s([({1: 2}, -2.0), ({1: 1, 8: 1}, -5.0)], [1, 8])
    {1: -1.0, 8: -4.0}
    """
    col = {z: i for i, z in enumerate(elements)}
    rows, ys = [], []
    for comp, energy in compositions:
        if not math.isfinite(energy):
            continue
        row = np.zeros(len(elements))
        for z, c in comp.items():
            row[col[z]] += c
        rows.append(row)
        ys.append(energy)
    if not rows:
        return {z: 0.0 for z in elements}
    sol, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    return {z: round(float(v), 12) for z, v in zip(elements, sol)}
