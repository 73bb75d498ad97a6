"""ASE database reader: SQLite ``.db`` and the LMDB ``.aselmdb`` used by OMol25.

``.aselmdb`` needs the optional package ``ase-db-backends`` (``pip install ase-db-backends``),
which ``ase.db.connect`` imports for that extension; fairchem is not needed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from mlip.data.formats.labels import (
    DataError,
    LabelKeys,
    Record,
    check_required,
    error,
    load_record,
    process,
)

EXTENSIONS = (".db", ".aselmdb")


def _connect(path: str | os.PathLike) -> Any:
    import ase.db

    path = str(path)
    if path.endswith(".aselmdb"):
        try:
            import ase_db_backends.aselmdb  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"reading {path} needs the optional package 'ase-db-backends' "
                "(pip install ase-db-backends)") from exc
        import lmdb

        # open once ourselves: a corrupt file then fails here, not inside LMDBDatabase (whose
        # __del__ would raise the same error again while being garbage-collected)
        lmdb.open(path, subdir=False, readonly=True, lock=False).close()
        # readonly: no lock file and no write transaction, safe with many reader processes
        return ase.db.connect(path, type="aselmdb", readonly=True, use_lock_file=False)
    return ase.db.connect(path, type="db", use_lock_file=False)


#: one open database per file and process: LMDB refuses to open a file twice in a process
_OPEN: dict[str, tuple[tuple[int, int, int], int, Any]] = {}


def _shared_connection(path: str) -> Any:
    """This process's connection to ``path`` (reopened after a fork or when the file changed)."""
    key = os.path.abspath(path)
    st = os.stat(path)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    entry = _OPEN.get(key)
    if entry is not None and entry[1] == os.getpid() and entry[0] == stamp:
        return entry[2]
    if entry is not None:
        _OPEN.pop(key)
        if entry[1] == os.getpid():
            entry[2].close() if hasattr(entry[2], "close") else None
        else:
            _release_inherited(entry[2])
    db = _connect(path)
    _OPEN[key] = (stamp, os.getpid(), db)
    return db


def _release_inherited(db: Any) -> None:
    """Close, in a forked child, the LMDB environment it inherited from its parent.

    py-lmdb refuses to open a file that is "already open in this process", which the inherited
    environment is; LMDB must not use it after a fork anyway. ``LMDBDatabase`` would reopen an
    environment to close it (its ``env`` property checks the process id), so the inherited one is
    closed directly and marked as this process's, which makes the database's own ``close`` a no-op.
    """
    env = getattr(db, "_env", None)
    if env is not None:
        env.close()
        db._env_pid = os.getpid()


def _row_to_raw(row: Any) -> Atoms:
    """Structure + calculator results, with key-value pairs and ``data`` merged into info.

    OMol25 keeps ``charge`` and ``spin`` in ``row.data``; ASE keeps user labels in
    ``key_value_pairs`` (``config_type``, ``REF_energy``) or ``data`` (arrays).
    """
    raw = row.toatoms()
    raw.info.update(row.key_value_pairs)
    raw.info.update(row.get("data") or {})
    return raw


def _backend_errors(path: str | os.PathLike) -> tuple[type[BaseException], ...]:
    """Exception types of the database backend that mean a corrupt/unreadable file."""
    if str(path).endswith(".aselmdb"):
        import lmdb

        return (lmdb.Error,)
    return ()


class AseDBReader:
    """Random access to the rows of an ASE database (``.db``, ``.aselmdb``), row by row.

    The connection is opened lazily in each process (checked by process id) and dropped when
    pickled, so ``DataLoader`` workers and conversion workers each open their own handle; rows
    are read one at a time, never the whole file. Only the row ids are kept (an int per row).

    Args:
        path: database file.
        keys, required, validate: as in :func:`mlip.data.formats.read`.

    Shapes:
        n_atoms [len(self)]: atoms per row (computed on first use, one pass over the rows).
    """

    def __init__(self, path: str | os.PathLike, keys: LabelKeys | None = None,
                 required: Sequence[str] = (), validate: bool = True) -> None:
        self.path = os.fspath(path)
        self.keys = keys or LabelKeys()
        self.required = check_required(required)
        self.validate = validate
        self._db: Any = None
        self._pid: int | None = None
        self._ids: list[int] | None = None
        self._n_atoms: np.ndarray | None = None

    def _connection(self) -> Any:
        if self._db is None or self._pid != os.getpid():
            try:
                self._db = _shared_connection(self.path)
            except _backend_errors(self.path) as exc:
                raise ValueError(f"{type(exc).__name__}: {exc}") from exc
            self._pid = os.getpid()
        return self._db

    def __getstate__(self) -> dict[str, Any]:
        # the handle, the ids and the counts stay behind: a worker reconnects and needs only row ids
        state = self.__dict__.copy()
        state.update(_db=None, _pid=None, _ids=None, _n_atoms=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def ids(self) -> list[int]:
        """Row ids in file order."""
        if self._ids is None:
            db = self._connection()
            # LMDB keeps its ids in memory already; SQLite lists them without reading the rows
            ids = getattr(db, "ids", None)
            self._ids = list(ids) if ids is not None else [
                int(r.id) for r in db.select(columns=["id"], include_data=False)]
        return self._ids

    def __len__(self) -> int:
        return len(self.ids)

    def records(self) -> Iterator[Record]:
        """Every row as a :class:`Record` (``frame_id`` ``"row <id>"``, payload the row id)."""
        for i, row_id in enumerate(self.ids):
            yield Record(i, f"row {row_id}", row_id)

    def parse(self, path: Any, record: Record) -> tuple[Atoms, dict[str, Any]]:
        """Read one row: raw ``ase.Atoms`` with calculator results, key-value pairs and data."""
        try:
            row = self._row(record.payload)
        except _backend_errors(self.path) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        return _row_to_raw(row), {"extra_info": {"db_id": int(row.id)}}

    def __getitem__(self, i: int) -> Atoms:
        """Row ``i`` (0-based position, not the row id) as canonical ``ase.Atoms``.

        Raises:
            DataError: the row is bad (names the file, the position and the row id).
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: frame {i} out of range (0..{n - 1})")
        i = int(i) % n
        record = Record(i, f"row {self.ids[i]}", self.ids[i])
        atoms = load_record(self.path, record, self.parse, self.keys, self.required, self.validate)
        if isinstance(atoms, DataError):
            raise atoms
        return atoms

    @property
    def n_atoms(self) -> np.ndarray:
        """Atoms per row, shape [len(self)]: one pass over the rows, only the counts kept."""
        if self._n_atoms is None:
            self._n_atoms = np.array([self._row(k, include_data=False).natoms for k in self.ids], dtype=np.int64)
        return self._n_atoms

    def _row(self, row_id: int, include_data: bool = True) -> Any:
        """One row by id (``ase.db.row.AtomsRow``); LMDB can leave out the ``data`` blob."""
        db = self._connection()
        if self.path.endswith(".aselmdb"):
            return db._get_row(row_id, include_data=include_data)
        return db._get_row(row_id)


def iter_asedb(path: str | os.PathLike, keys: LabelKeys | None = None,
               required: Sequence[str] = (), validate: bool = True,
               on_bad: Callable[[DataError], None] | None = None) -> Iterator[Atoms]:
    """Stream the rows of an ASE database (``.db`` or ``.aselmdb``) as canonical ``ase.Atoms``.

    Labels are looked up in the row's calculator results (``energy``, ``forces``, ``stress``),
    then its ``key_value_pairs`` and ``data`` (where OMol25 keeps ``charge`` and ``spin``, the
    total charge and the spin multiplicity 2S+1, as fairchem's ``AseDBDataset`` reads them into
    ``atoms.info``). ``info["db_id"]`` keeps the row id; errors name the row id.

    Args:
        path: database file.
        keys, required, validate: as in :func:`mlip.data.formats.read`.
        on_bad: skip bad rows, reporting each to this callback (default: raise).

    Yields:
        ``ase.Atoms`` with canonical labels; ``info["source"]`` counts rows from 0.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise error(path, 0, None, "file is empty (no frames found)")
    reader = AseDBReader(path)
    # opening and row errors (sqlite3.DatabaseError on a corrupt file) surface as DataError in process()
    yield from process(path, reader.records(), reader.parse, keys or LabelKeys(), required, validate, on_bad)
