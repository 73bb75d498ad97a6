"""Map-style datasets of :class:`~mlip.data.graph.AtomGraph` and their bounded-batch loaders.

A :class:`GraphDataset` wraps structures held in memory (a list of ``ase.Atoms``) or a reader
that reads one structure per ``__getitem__`` (:class:`~mlip.data.formats.HDF5Reader`,
:class:`~mlip.data.formats.AseDBReader`); the neighbour graph is built on the fly, so data
larger than memory can be trained on. Readers open their files lazily in each process, so
``DataLoader`` workers each get their own handles. :func:`make_loader` batches by total atoms /
edges / structures (no padding).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms

from mlip import keys as K
from mlip.data.graph import AtomGraph, BoundedBatchSampler, collate
from mlip.data.transforms import atoms_to_graph

__all__ = ["ConcatSource", "GraphDataset", "make_loader", "open_dataset"]


class ConcatSource:
    """Several structure sources (lists of ``ase.Atoms`` or HDF5 readers) seen as one sequence.

    Picklable as long as its parts are (``HDF5Reader`` is), so it works in ``DataLoader`` workers.

    Shapes:
        n_atoms [len(self)]: atoms per structure, read from each part's index when it has one.
    """

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Atoms:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"structure {i} out of range (0..{n - 1})")
        i = int(i) % n
        p = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[p][i - int(self.offsets[p])]

    @property
    def n_atoms(self) -> np.ndarray:
        if not self.parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([_source_n_atoms(p) for p in self.parts]).astype(np.int64)


def _source_n_atoms(source: Any) -> np.ndarray:
    """Atoms per structure without building graphs: the HDF5 index, else ``len(atoms)``."""
    counts = getattr(source, "n_atoms", None)
    if counts is not None and not callable(counts):
        return np.asarray(counts, dtype=np.int64)
    return np.array([len(source[i]) for i in range(len(source))], dtype=np.int64)


class GraphDataset(torch.utils.data.Dataset):
    """Structures as :class:`AtomGraph` s, neighbours built on the fly at cutoff ``r_max``.

    Args:
        source: a sequence of ``ase.Atoms`` carrying canonical labels (see
            :mod:`mlip.data.formats`), an :class:`~mlip.data.formats.HDF5Reader` (streams: one
            structure is read per item), or any object with ``__len__`` and ``__getitem__`` that
            returns ``ase.Atoms`` (e.g. :class:`ConcatSource`).
        r_max: neighbour cutoff (Å).
        backend: neighbour-list backend of :func:`mlip.data.transforms.atoms_to_graph`.
        head: if given, every graph's ``head`` is set to it (overrides ``atoms.info["head"]``).

    Shapes:
        n_atoms [len(self)] atoms per structure; n_edges [len(self)] edges per structure.
    """

    def __init__(self, source: Any, r_max: float, backend: str = "auto", head: str | None = None) -> None:
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(f"GraphDataset needs a sequence of ase.Atoms or an HDF5Reader, got {type(source).__name__}")
        self.source = source
        self.r_max = float(r_max)
        self.backend = backend
        self.head = head
        self._n_atoms: np.ndarray | None = None
        self._n_edges: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source)

    def atoms(self, i: int) -> Atoms:
        """Structure ``i`` as ``ase.Atoms`` (the stored object for an in-memory source: do not modify)."""
        atoms = self.source[i]
        if not isinstance(atoms, Atoms):
            raise TypeError(f"structure {i} of the source is {type(atoms).__name__}, not ase.Atoms")
        return atoms

    def __getitem__(self, i: int) -> AtomGraph:
        atoms = self.atoms(int(i))
        graph = atoms_to_graph(atoms, self.r_max, backend=self.backend)
        if self.head is not None:
            graph.head = self.head
        return graph

    @property
    def n_atoms(self) -> np.ndarray:
        """Atoms per structure, shape [len(self)]; from the HDF5 index or ``len(atoms)`` (cheap)."""
        if self._n_atoms is None:
            self._n_atoms = _source_n_atoms(self.source)
        return self._n_atoms

    @property
    def n_edges(self) -> np.ndarray:
        """Edges per structure at ``r_max``, shape [len(self)].

        Computed once (one neighbour list per structure, which reads every structure of an
        HDF5 file once) and cached; needed for edge-bounded batches and neighbour statistics.
        """
        if self._n_edges is None:
            self._n_edges = np.array([self[i].n_edges for i in range(len(self))], dtype=np.int64)
        return self._n_edges


def make_loader(
    dataset: Any,
    max_atoms: int | None = None,
    max_edges: int | None = None,
    max_graphs: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of :class:`~mlip.data.graph.GraphBatch` es bounded in atoms/edges/structures.

    Batches come from :class:`~mlip.data.graph.BoundedBatchSampler`: a batch closes before a
    structure would push it past a bound; a structure larger than a bound is a batch of its own.
    Each epoch covers every index exactly once. With ``shuffle=True`` the order is drawn from
    ``seed + epoch``; call ``loader.batch_sampler.set_epoch(epoch)`` to reshuffle per epoch.

    Args:
        dataset: a map-style dataset of :class:`AtomGraph` with ``n_atoms`` (and ``n_edges`` when
            ``max_edges`` is given) as per-structure arrays, e.g. a :class:`GraphDataset`.
        max_atoms / max_edges / max_graphs: bounds per batch; at least one is required.
        shuffle: shuffle the structure order (reproducible by ``seed``).
        seed: base seed of the shuffle.
        num_workers: ``DataLoader`` worker processes (HDF5 files are reopened in each).

    Returns:
        ``torch.utils.data.DataLoader`` yielding ``GraphBatch``.
    """
    if max_atoms is None and max_edges is None and max_graphs is None:
        raise ValueError("make_loader needs at least one of max_atoms, max_edges, max_graphs")
    n_atoms = getattr(dataset, "n_atoms", None)
    if n_atoms is None:
        n_atoms = [dataset[i].n_atoms for i in range(len(dataset))]
    n_edges = None
    if max_edges is not None:
        n_edges = getattr(dataset, "n_edges", None)
        if n_edges is None:
            n_edges = [dataset[i].n_edges for i in range(len(dataset))]
    sampler = BoundedBatchSampler(
        n_atoms, n_edges, max_atoms=max_atoms, max_edges=max_edges, max_graphs=max_graphs,
        shuffle=shuffle, seed=seed,
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


def open_dataset(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    r_max: float,
    keys: Any = None,
    required: Sequence[str] = (),
    head: str | None = None,
    backend: str = "auto",
) -> GraphDataset:
    """Open data files of any supported format as one :class:`GraphDataset`.

    HDF5 files (``.h5``/``.hdf5``, also the shards of a folder written by ``mlip data convert
    --shard-size``) and ASE databases (``.db``, OMol25's ``.aselmdb``) stay on disk and are read
    one structure at a time; other formats are read into memory (and checked) here. Folders and
    globs stand for the files in them (:func:`~mlip.data.formats.expand_paths`); files are
    concatenated in order.

    Args:
        path_or_paths: a file, folder or glob, or a list of them.
        r_max: neighbour cutoff (Å).
        keys: :class:`~mlip.data.formats.LabelKeys` naming the labels in the files (not HDF5).
        required: canonical labels every structure must carry, e.g. ``("energy", "forces")``.
        head: dataset tag given to every structure (overrides the files' ``head``).
        backend: neighbour-list backend.

    Raises:
        DataError: unreadable file, an unfinished shard folder, or a ``required`` label missing
            (HDF5: checked for every structure here, from the per-structure label arrays only;
            databases: when the structure is read).
        FileNotFoundError: a path does not exist.
    """
    from mlip.data.formats import AseDBReader, HDF5Reader, detect_format, expand_paths, read

    paths = expand_paths(path_or_paths)
    if not paths:
        raise ValueError("open_dataset needs at least one file")
    parts: list[Any] = []
    for path in paths:
        fmt = detect_format(path)
        if fmt == "hdf5":
            reader = HDF5Reader(path)
            _check_hdf5_required(reader, required)
            parts.append(reader)
        elif fmt == "asedb":
            parts.append(AseDBReader(path, keys=keys, required=required))
        else:
            parts.append(read(path, keys=keys, required=required))
    source = parts[0] if len(parts) == 1 else ConcatSource(parts)
    return GraphDataset(source, r_max, backend=backend, head=head)


def _check_hdf5_required(reader: Any, required: Sequence[str]) -> None:
    """Every structure of an mlip HDF5 file has the ``required`` labels (NaN means missing)."""
    from mlip.data.formats.labels import check_required, error

    required = check_required(required)
    if not required:
        return
    if len(reader) == 0:
        raise error(reader.path, 0, None, "file is empty (no frames found)")
    f = reader._open()
    offsets = reader.offsets
    for label in required:
        if label == K.HEAD:
            per_structure = np.array([len(v) == 0 for v in f[label][:]], dtype=bool)
            values = None
        else:
            values = np.asarray(f[label][:], dtype=np.float64)
        if values is None:
            pass
        elif label == K.FORCES:
            # per atom: a structure misses forces when all its rows are NaN
            nan_rows = np.isnan(values).all(axis=1).astype(np.int64)
            per_structure = np.add.reduceat(nan_rows, offsets[:-1]) == np.diff(offsets)
        elif values.ndim > 1:
            per_structure = np.isnan(values.reshape(len(values), -1)).all(axis=1)
        else:
            per_structure = np.isnan(values)
        if per_structure.any():
            i = int(np.flatnonzero(per_structure)[0])
            raise error(reader.path, i, label, f"required label '{label}' is missing (NaN in the file)")
