"""``build_data``: training/validation/test splits, dataset tags (heads), E0s and statistics.

Datasets stay map-style and lazy (``mlip.data.datasets``): a split is a dataset plus a list of
indices, so an HDF5 file (or shard folder, or folder of ``.aselmdb`` files) larger than memory
is read structure by structure while training. Under DDP the one pass over the training data
that the statistics need is split between the ranks (each reads a strided share, the per-
structure results are gathered in index order), so no rank reads the whole data set.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from mlip.data.graph import AtomGraph
from mlip.data.split import isolated_indices, split_indices
from mlip.data.stats import E0Table
from mlip.train import distributed as ddp
from mlip.train.config import ConfigError

T = TypeVar("T")


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

    def __init__(self, parts: list[tuple[Any, float, bool]], paths: list[str]) -> None:
        self.parts = parts
        self.paths = paths
        self.offsets = np.cumsum([0] + [len(d) for d, _, _ in parts])
        self.cache: dict[int, AtomGraph] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def where(self, i: int) -> str:
        """``"<file> frame <k>"`` of structure ``i`` (for error messages)."""
        p = int(np.searchsorted(self.offsets, int(i), side="right") - 1)
        return f"{self.paths[p]} frame {int(i) - int(self.offsets[p])}"

    def __getitem__(self, i: int) -> AtomGraph:
        i = int(i)
        if i in self.cache:
            return self.cache[i]
        p = int(np.searchsorted(self.offsets, i, side="right") - 1)
        ds, w, cache = self.parts[p]
        g = _finite_cell(ds[i - int(self.offsets[p])])
        if w != 1.0:
            g.weight = g.weight * w
        if cache:
            self.cache[i] = g
        return g


def _finite_cell(g: AtomGraph) -> AtomGraph:
    """A molecule (no periodic direction) gets a finite dummy cell in place of a zero one.

    Its cell enters nothing but the stress, ``(1/V) dE/dε``, whose label a molecule lacks (NaN,
    masked). With ``V = 0`` that prediction is ``inf``/NaN, and when a batch mixes molecules with
    stress-labelled crystals, backpropagating through the masked division turns the gradient into
    NaN. A finite cell (a cube around the atoms) keeps it finite; energy and forces do not change.
    """
    if bool(g.pbc.any()) or bool(torch.linalg.det(g.cell).abs() > 0):
        return g
    extent = float((g.positions.max(0).values - g.positions.min(0).values).max()) if g.n_atoms else 0.0
    g.cell = torch.eye(3, dtype=g.cell.dtype) * (extent + 10.0)
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
    #: the heads whose every training structure carries a finite total charge and spin multiplicity
    #: (OMol25-style), in ``heads`` order
    charge_spin_heads: list[str] = field(default_factory=list)

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


def _open(entry_list: list[Entry], cfg, r_max: float, dist: ddp.DistInfo | None = None  # noqa: ANN001
          ) -> tuple[Any, np.ndarray, np.ndarray]:
    """Open the entries as one :class:`_Tagged` dataset with per-structure atom and edge counts.

    An entry's path may be a file, a folder (shards, ``.aselmdb`` files) or a glob. Edge counts
    need a neighbour list per structure: they are computed here (split between DDP ranks) when
    graphs are cached (the pass fills the cache) or edge-bounded batches need them; otherwise
    (streamed HDF5 / databases with atom-bounded batches) they stay zero and no extra pass over
    the data is made.
    """
    from mlip.data.datasets import open_dataset
    from mlip.data.formats import detect_format, expand_paths

    keys = None
    if cfg.data.keys:
        from mlip.data.formats import LabelKeys

        keys = LabelKeys(**cfg.data.keys)
    parts = []
    for e in entry_list:
        ds = open_dataset(e.path, r_max=r_max, keys=keys, head=e.head)
        streamed = all(detect_format(p) in ("hdf5", "asedb") for p in expand_paths(e.path))
        cache = cfg.data.cache_graphs is True or (cfg.data.cache_graphs == "auto" and not streamed)
        parts.append((ds, e.weight, cache))
    ds = _Tagged(parts, [e.path for e in entry_list])
    n_atoms = np.concatenate([_n_atoms(d) for d, _, _ in parts]).astype(np.int64)
    if cfg.batch.max_edges is not None or all(c for _, _, c in parts):
        n_edges = np.array(each(len(ds), lambda i: ds[i].n_edges, dist), dtype=np.int64)
    else:
        n_edges = np.zeros(len(ds), dtype=np.int64)
    return ds, n_atoms, n_edges


def each(n: int, fn: Callable[[int], T], dist: ddp.DistInfo | None) -> list[T]:
    """``[fn(0), ..., fn(n - 1)]`` on every rank, each rank computing a strided share.

    One process computes all of them; under DDP rank ``r`` computes ``fn(r), fn(r + W), ...``
    and the shares are gathered, so every rank gets the same list in index order.
    """
    if dist is None or not dist.enabled:
        return [fn(k) for k in range(n)]
    shares = ddp.all_gather_object([fn(k) for k in range(dist.rank, n, dist.world_size)], dist)
    out: list = [None] * n
    for rank, share in enumerate(shares):
        out[rank::dist.world_size] = share
    return out


def _n_atoms(ds: Any) -> np.ndarray:
    if hasattr(ds, "n_atoms"):
        return np.asarray(ds.n_atoms)
    return np.array([ds[i].n_atoms for i in range(len(ds))])


def build_data(cfg, r_max: float, log: logging.Logger | None = None,  # noqa: ANN001
               dist: ddp.DistInfo | None = None) -> Data:
    """Open the configured files, split by fraction (:func:`mlip.data.split.split_indices`) or by
    file, collect heads, elements, E0s (isolated atoms, else a least-squares fit) and the average
    neighbour count. With ``dist`` (DDP), the passes over the data are split between the ranks.

    Isolated-atom reference frames (flagged by the readers; a one-atom periodic cell is not one)
    always stay in the training split: they set the E0s and would say nothing as validation or
    test data. Given valid/test files lose theirs too.
    """
    d = cfg.data
    train_e = entries(d.train, d.head, "train")
    ds, n_atoms, n_edges = _open(train_e, cfg, r_max, dist)
    if len(ds) == 0:
        raise ConfigError(f"data.train ({[e.path for e in train_e]}) holds no structures")
    isolated = isolated_indices(ds, n_atoms)
    v = d.valid_fraction if d.valid is None else 0.0
    t = d.test_fraction if d.test is None else 0.0
    n_rest = len(ds) - len(isolated)
    try:
        train_idx, valid_idx, test_idx = split_indices(len(ds), [1.0 - v - t, v, t], d.split_seed,
                                                       keep_in_first=isolated)
    except ValueError:
        train_idx = isolated
    if len(train_idx) == len(isolated):
        raise ConfigError(f"data.train has {n_rest} structures besides isolated atoms: too few to split off "
                          f"valid_fraction {v} + test_fraction {t}")
    valid = Split(ds, valid_idx, n_atoms, n_edges) if len(valid_idx) else None
    test = Split(ds, test_idx, n_atoms, n_edges) if len(test_idx) else None
    train = Split(ds, train_idx, n_atoms, n_edges)
    for name in ("valid", "test"):
        value = getattr(d, name)
        if value is not None:
            sds, sa, se = _open(entries(value, d.head, name), cfg, r_max, dist)
            keep = np.setdiff1d(np.arange(len(sds)), isolated_indices(sds, sa))
            split = Split(sds, keep, sa, se)
            valid, test = (split, test) if name == "valid" else (valid, split)

    stats = _statistics(train, cfg, log, dist)
    if stats.from_isolated and len(isolated):
        # they define the E0s (exactly, as the model's per-element constants); as MACE does,
        # they are not fitted again, so they cannot pull on the interaction energy
        train = Split(ds, np.setdiff1d(train_idx, isolated), n_atoms, n_edges)
        if log is not None:
            log.info("%d isolated-atom structures set the E0s and are left out of the training loss", len(isolated))
    return Data(train, valid, test, stats.heads, stats.elements, stats.e0s, stats.avg_num_neighbors, stats.shift,
                stats.scale, stats.charge_spin_heads)


@dataclass
class Statistics:
    """What one pass over the training split yields (see :func:`_statistics`)."""

    heads: list[str]
    elements: list[int]
    #: ``{head: {Z: eV}}``, or ``None`` for ``data.e0s: none``
    e0s: dict[str, dict[int, float]] | None
    #: edges per atom over structures other than isolated atoms
    avg_num_neighbors: float
    #: mean per-atom energy left after the E0s (eV), ``None`` without energies
    shift: float | None
    #: force RMS (eV/Å), ``None`` without forces
    scale: float | None
    #: the E0s of every head came from isolated-atom frames
    from_isolated: bool
    #: the heads whose every training structure carries a finite total charge and spin multiplicity
    charge_spin_heads: list[str]


def _structure_summary(g: AtomGraph, where: Callable[[], str]) -> tuple:
    """What the statistics need of one training structure (small and picklable, for DDP gathering):
    head, composition ``((Z, count), ...)``, energy (eV), isolated flag, has charge and spin, sum of squared forces
    (eV²/Å²) and their count, edges, atoms, and the structure's name when it is an isolated atom."""
    isolated = bool(g.isolated)
    f_sq, f_n = 0.0, 0
    if not isolated:  # isolated atoms have no forces and would only dilute the neighbour count
        ok = torch.isfinite(g.forces)
        f_sq, f_n = float(g.forces[ok].double().square().sum()), int(ok.sum())
    charge_spin = bool(torch.isfinite(g.charge)) and bool(torch.isfinite(g.spin))
    elements, counts = np.unique(g.numbers.numpy(), return_counts=True)  # a composition, not every atom
    return (g.head, tuple(zip(elements.tolist(), counts.tolist())), float(g.energy), isolated, charge_spin,
            f_sq, f_n, 0 if isolated else g.n_edges, 0 if isolated else g.n_atoms, where() if isolated else "")


def _statistics(train: Split, cfg, log: logging.Logger | None,  # noqa: ANN001
                dist: ddp.DistInfo | None = None) -> Statistics:
    """One streaming pass over the training split (shared between DDP ranks): heads, elements, E0s
    (one :class:`E0Table` per head), average neighbour count, the mean per-atom energy left after
    E0s (``shift``, eV) and the force RMS (``scale``, eV/Å), as MACE scales its atomic energies.

    Only per-structure compositions and energies are kept, so this works on datasets larger
    than memory; the results are combined in index order, so they do not depend on the ranks.
    """
    summaries = each(len(train), lambda k: _structure_summary(
        train[k], lambda: train.dataset.where(train.indices[k])), dist)
    tables: dict[str, E0Table] = {}
    with_charge_spin: Counter[str] = Counter()
    n_edges = n_nodes = 0
    f_sq, f_n = 0.0, 0
    for head, composition, energy, isolated, charge_spin, sq, n_f, edges, nodes, where in summaries:
        numbers = [z for z, count in composition for _ in range(count)]
        with_charge_spin[head] += charge_spin
        f_sq, f_n, n_edges, n_nodes = f_sq + sq, f_n + n_f, n_edges + edges, n_nodes + nodes
        try:
            tables.setdefault(head, E0Table()).add(numbers, energy, isolated, where)
        except ValueError as err:
            raise ConfigError(f"data.train: {err}") from err
    heads = sorted(tables)
    n_structures = {h: len(t.flags) for h, t in tables.items()}
    charge_spin_heads = _charge_spin_heads(heads, with_charge_spin, n_structures, log)
    e0s, from_isolated = _e0s(tables, cfg.data.e0s, log)
    residuals = [
        (energy - sum(c * (e0s[h].get(z, 0.0) if e0s else 0.0) for z, c in comp.items())) / sum(comp.values())
        for h in heads for comp, energy in tables[h].structures() if math.isfinite(energy)
    ]
    shift = float(np.mean(residuals)) if residuals else None
    scale = math.sqrt(f_sq / f_n) if f_n and f_sq > 0 else None
    avg = n_edges / max(n_nodes, 1)
    if log is not None:
        log.info("average neighbours %.3f, mean per-atom energy after E0s %s eV, force RMS %s eV/Å", avg,
                 f"{shift:.4f}" if shift is not None else "n/a", f"{scale:.4f}" if scale is not None else "n/a")
    elements = sorted(set().union(*(t.elements for t in tables.values())))
    return Statistics(heads, elements, e0s, avg, shift, scale, from_isolated, charge_spin_heads)


def _charge_spin_heads(heads: list[str], with_charge_spin: Counter[str], n_structures: dict[str, int],
                       log: logging.Logger | None) -> list[str]:
    """The heads whose every training structure carries a total charge and spin; a head where only
    some do is logged, since the model then reads them for none of its structures."""
    partial = [h for h in heads if 0 < with_charge_spin[h] < n_structures[h]]
    if log is not None and partial:
        log.warning("heads %s: only %s of their training structures carry a total charge and spin; a head "
                    "reads them only when every structure has them, so these heads will not", partial,
                    [f"{with_charge_spin[h]}/{n_structures[h]}" for h in partial])
    return [h for h in heads if with_charge_spin[h] == n_structures[h] > 0]


def _e0s(tables: dict[str, E0Table], spec, log: logging.Logger | None  # noqa: ANN001
         ) -> tuple[dict[str, dict[int, float]] | None, bool]:
    """E0s per head as ``data.e0s`` asks (auto, isolated, fit, none or a mapping); whether every
    head's came from isolated-atom frames."""
    heads = sorted(tables)
    if isinstance(spec, dict):
        return _explicit_e0s(spec, heads), False
    if spec == "none":
        return None, False
    e0s: dict[str, dict[int, float]] = {}
    from_isolated = True
    for h in heads:
        table = tables[h]
        need = sorted(table.elements)
        if spec == "isolated" or (spec == "auto" and table.covered(need)):
            missing = sorted(set(need) - set(table.isolated))
            if missing:
                from ase.data import chemical_symbols

                raise ConfigError(
                    f"data.e0s: isolated: head {h!r} of data.train has no isolated-atom structure (no single-atom "
                    f"structure without pbc) with an energy for {[chemical_symbols[z] for z in missing]}; add "
                    "them, give data.e0s as a mapping, or use fit")
            e0s[h] = table.from_isolated(need)
            how = "isolated atoms"
        else:
            e0s[h] = table.fit(need)
            how = "a least-squares fit"
            from_isolated = False
        if log is not None:
            log.info("E0s for head %r from %s: %s", h, how, {z: round(v, 6) for z, v in e0s[h].items()})
    return e0s, from_isolated


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
