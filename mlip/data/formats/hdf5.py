"""mlip's packed HDF5 format: one file, concatenated atoms, per-structure offsets.

Layout (``attrs["format"] == "mlip-hdf5"``, ``attrs["version"] == 1``)::

    offsets     [n_structures + 1] int64   atom offsets (the index; structure i = atoms offsets[i]:offsets[i+1])
    positions   [n_atoms_total, 3] float64 Å
    numbers     [n_atoms_total]    int16
    forces      [n_atoms_total, 3] float64 eV/Å      (NaN = missing)
    cell        [n_structures, 3, 3] float64 Å
    pbc         [n_structures, 3]  bool
    energy      [n_structures]     float64 eV        (NaN = missing)
    stress      [n_structures, 3, 3] float64 eV/Å³   (ASE sign; NaN = missing)
    charge, spin, weight [n_structures] float64      (NaN = missing)
    head, config_type, source [n_structures] utf-8 str ("" = missing)

Every dataset is chunked and resizable: :func:`write_hdf5` appends ``chunk_size`` structures at a
time, so converting a file larger than memory works. :class:`HDF5Reader` opens the file lazily in
each process and is picklable (for ``DataLoader`` workers).

A *shard folder* (``mlip data convert --shard-size N``) holds ``shard-00000.h5``, ... and, once the
conversion finished, ``manifest.json`` listing the shards and their sizes; it reads as one data
set (:func:`shard_paths`). Without the manifest the folder is an unfinished conversion.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from mlip import keys as K
from mlip.atomic import atomic_path
from mlip.data.formats.labels import (
    DataError,
    LabelKeys,
    check_required,
    error,
    is_isolated_atom,
    validate_atoms,
)

EXTENSIONS = (".h5", ".hdf5")
FORMAT_NAME = "mlip-hdf5"
VERSION = 1

#: the file in a shard folder that lists its shards; written last, so its presence means "complete"
MANIFEST = "manifest.json"
#: the file in a shard folder that records an unfinished conversion's progress
PROGRESS = "progress.json"

_SCALARS = (K.ENERGY, K.CHARGE, K.SPIN, K.WEIGHT)
_STRINGS = (K.HEAD, K.CONFIG_TYPE, K.SOURCE)


def _h5py() -> Any:
    import h5py

    return h5py


def _create(f: Any, chunk_size: int) -> None:
    h5py = _h5py()
    string = h5py.string_dtype("utf-8")
    atom_chunk = max(chunk_size * 8, 1024)

    def make(name: str, tail: tuple[int, ...], dtype: Any, chunk: int, fill: Any = None) -> None:
        kwargs = {"fillvalue": fill} if fill is not None else {}
        f.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                         chunks=(chunk, *tail), **kwargs)

    make("offsets", (), np.int64, chunk_size + 1)
    f["offsets"].resize((1,))
    f["offsets"][0] = 0
    make(K.POSITIONS, (3,), np.float64, atom_chunk)
    make(K.NUMBERS, (), np.int16, atom_chunk)
    make(K.FORCES, (3,), np.float64, atom_chunk, np.nan)
    make(K.CELL, (3, 3), np.float64, chunk_size)
    make(K.PBC, (3,), bool, chunk_size)
    make(K.STRESS, (3, 3), np.float64, chunk_size, np.nan)
    for name in _SCALARS:
        make(name, (), np.float64, chunk_size, np.nan)
    for name in _STRINGS:
        make(name, (), string, chunk_size)
    f.attrs["format"] = FORMAT_NAME
    f.attrs["version"] = VERSION


def _append(f: Any, frames: list[Atoms]) -> None:
    """Append a chunk of canonical frames to the open file."""
    n_old = f[K.CELL].shape[0]
    atom_old = int(f["offsets"][n_old])
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    n_new, atom_new = n_old + len(frames), atom_old + int(counts.sum())

    def put(name: str, value: np.ndarray, atomwise: bool) -> None:
        ds = f[name]
        lo, hi = (atom_old, atom_new) if atomwise else (n_old, n_new)
        ds.resize((hi, *ds.shape[1:]))
        ds[lo:hi] = value

    put(K.POSITIONS, np.concatenate([a.positions for a in frames]), True)
    put(K.NUMBERS, np.concatenate([a.numbers for a in frames]).astype(np.int16), True)
    put(K.FORCES, np.concatenate([
        np.asarray(a.arrays[K.FORCES], dtype=np.float64) if K.FORCES in a.arrays
        else np.full((len(a), 3), np.nan) for a in frames]), True)
    put(K.CELL, np.stack([np.asarray(a.cell[:], dtype=np.float64) for a in frames]), False)
    put(K.PBC, np.stack([np.asarray(a.pbc, dtype=bool) for a in frames]), False)
    put(K.STRESS, np.stack([np.asarray(a.info.get(K.STRESS, np.full((3, 3), np.nan)),
                                       dtype=np.float64) for a in frames]), False)
    for name in _SCALARS:
        put(name, np.array([a.info.get(name, np.nan) for a in frames], dtype=np.float64), False)
    for name in _STRINGS:
        put(name, np.array([str(a.info.get(name, "")) for a in frames], dtype=object), False)
    ds = f["offsets"]
    ds.resize((n_new + 1,))
    ds[n_old + 1:] = atom_old + np.cumsum(counts)


def write_hdf5(frames: Iterable[Atoms], path: str | os.PathLike, chunk_size: int = 1024,
               validate: bool = True) -> int:
    """Write canonical frames (from :func:`mlip.data.formats.iter_read`) to an mlip HDF5 file.

    Streams: at most ``chunk_size`` frames are held at once. The file is written to a
    temporary file in the same directory and renamed over ``path`` at the end, so a crash
    never leaves a half-written ``path``.

    Args:
        frames: iterable (e.g. a generator) of ``ase.Atoms`` with canonical labels.
        path: output ``.h5`` / ``.hdf5`` file.
        chunk_size: structures per append (and per HDF5 chunk of per-structure datasets).
        validate: check every frame (:func:`~mlip.data.formats.labels.validate_atoms`).

    Returns:
        Number of structures written.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h5py = _h5py()
    path = os.fspath(path)
    n_written = 0
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _create(f, chunk_size)
            buffer: list[Atoms] = []
            for atoms in frames:
                if validate:
                    source = atoms.info.get(K.SOURCE, "input")
                    validate_atoms(atoms, path=f"{path} (writing structure from {source})",
                                   frame=n_written + len(buffer))
                buffer.append(atoms)
                if len(buffer) == chunk_size:
                    _append(f, buffer)
                    n_written += len(buffer)
                    buffer = []
            if buffer:
                _append(f, buffer)
                n_written += len(buffer)
            f.attrs["n_structures"] = n_written
    return n_written


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class HDF5Reader:
    """Random access to an mlip HDF5 file; the file is opened lazily in each process.

    Picklable: the open handle is dropped by ``__getstate__`` and reopened on first access
    after unpickling (and after a fork, checked by process id), so it works in
    ``DataLoader`` workers.

    Args:
        path: ``.h5`` file written by :func:`write_hdf5`.
        validate: run the shared checks on every frame returned.
    """

    def __init__(self, path: str | os.PathLike, validate: bool = True) -> None:
        self.path = os.fspath(path)
        self.validate = validate
        self._file: Any = None
        self._pid: int | None = None
        self._offsets: np.ndarray | None = None

    # --- file handle ------------------------------------------------------
    def _open(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            h5py = _h5py()
            try:
                f = h5py.File(self.path, "r")
            except OSError as exc:
                raise error(self.path, None, None,
                            f"not a readable HDF5 file ({exc})") from exc
            if f.attrs.get("format") != FORMAT_NAME or "offsets" not in f:
                f.close()
                raise error(self.path, None, "format",
                            f"not an mlip HDF5 file (attrs['format'] != '{FORMAT_NAME}')")
            self._file, self._pid = f, os.getpid()
            self._offsets = np.asarray(f["offsets"][:], dtype=np.int64)
        return self._file

    def close(self) -> None:
        """Close the file handle (it is reopened on next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- access -----------------------------------------------------------
    @property
    def offsets(self) -> np.ndarray:
        """Atom offsets, shape [n_structures + 1] (read once, from the index only)."""
        if self._offsets is None or self._pid != os.getpid():
            self._open()
        return self._offsets

    @property
    def n_atoms(self) -> np.ndarray:
        """Atoms per structure, shape [n_structures], without reading positions."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Atoms:
        """Structure ``i`` as canonical ``ase.Atoms`` (missing labels absent, not NaN).

        ``info["source"]`` is ``"<this file> frame <i>"``; the source recorded at conversion
        is kept as ``info["original_source"]``.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: frame {i} out of range (0..{n - 1})")
        i = int(i) % n
        f = self._open()
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        atoms = Atoms(numbers=f[K.NUMBERS][lo:hi].astype(np.int64),
                      positions=f[K.POSITIONS][lo:hi], cell=f[K.CELL][i], pbc=f[K.PBC][i])
        forces = f[K.FORCES][lo:hi]
        if not np.all(np.isnan(forces)):
            atoms.arrays[K.FORCES] = forces
        stress = f[K.STRESS][i]
        if not np.all(np.isnan(stress)):
            atoms.info[K.STRESS] = stress
        for name in _SCALARS:
            value = float(f[name][i])
            if not np.isnan(value):
                atoms.info[name] = value
        for name in (K.HEAD, K.CONFIG_TYPE):
            value = _decode(f[name][i])
            if value:
                atoms.info[name] = value
        original = _decode(f[K.SOURCE][i])
        if original:
            atoms.info[K.ORIGINAL_SOURCE] = original
        atoms.info[K.SOURCE] = f"{self.path} frame {i}"
        atoms.info[K.ISOLATED] = is_isolated_atom(atoms)
        if self.validate:
            validate_atoms(atoms, path=self.path, frame=i)
        return atoms

    def __iter__(self) -> Iterator[Atoms]:
        for i in range(len(self)):
            yield self[i]


def check_present(atoms: Atoms, required: Sequence[str], path: Any, frame: int) -> None:
    """Raise :class:`DataError` if a ``required`` canonical label is absent (NaN in the file)."""
    for label in required:
        if label not in atoms.info and label not in atoms.arrays:
            raise error(path, frame, label, f"required label '{label}' is missing (NaN in the file)")


def iter_hdf5(path: str | os.PathLike, keys: LabelKeys | None = None,
              required: Sequence[str] = (), validate: bool = True,
              on_bad: Callable[[DataError], None] | None = None) -> Iterator[Atoms]:
    """Stream the frames of an mlip HDF5 file (labels are already canonical; ``keys`` unused).

    Raises:
        DataError: empty file, or a bad frame / a ``required`` label missing (without ``on_bad``).
    """
    required = check_required(required)
    reader = HDF5Reader(path, validate=validate)
    try:
        if len(reader) == 0:
            raise error(path, 0, None, "file is empty (no frames found)")
        for i in range(len(reader)):
            try:
                atoms = reader[i]
                check_present(atoms, required, path, i)
            except DataError as err:
                if on_bad is None:
                    raise
                on_bad(err)
                continue
            yield atoms
    finally:
        reader.close()


def is_shard_folder(path: str | os.PathLike) -> bool:
    """A folder written by ``mlip data convert --shard-size`` (finished or not)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in (MANIFEST, PROGRESS))


def shard_paths(folder: str | os.PathLike) -> list[str]:
    """The shard files of a finished shard folder, in order, checked against its manifest.

    Raises:
        DataError: no manifest (the conversion was interrupted: rerun it to finish), or a shard
            that is missing or holds another number of structures than the manifest says.
    """
    folder = os.fspath(folder)
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest):
        raise error(folder, None, None, f"unfinished conversion: no {MANIFEST} (rerun the same "
                    "'mlip data convert' command to finish it)")
    try:
        with open(manifest, encoding="utf-8") as fh:
            shards = json.load(fh)["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise error(manifest, None, None, f"unreadable shard manifest ({type(exc).__name__}: {exc})") from exc
    out = []
    for shard in shards:
        path = os.path.join(folder, shard["file"])
        if not os.path.exists(path):
            raise error(path, None, None, f"shard listed in {manifest} is missing")
        reader = HDF5Reader(path)
        try:
            if len(reader) != int(shard["n_structures"]):
                raise error(path, None, None, f"holds {len(reader)} structures, {manifest} says "
                            f"{shard['n_structures']}")
        finally:
            reader.close()
        out.append(path)
    return out
