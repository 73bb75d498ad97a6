"""ASE database reader: SQLite ``.db`` and the LMDB ``.aselmdb`` used by OMol25.

``.aselmdb`` needs the optional package ``ase-db-backends`` (``pip install ase-db-backends``),
which ``ase.db.connect`` imports for that extension; fairchem is not needed.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from ase import Atoms

from mlip.data.formats.labels import LabelKeys, error, process

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


def _raw_frames(path: str | os.PathLike) -> Iterator[tuple[Atoms, dict[str, Any]]]:
    backend_errors = _backend_errors(path)
    db = None
    try:
        db = _connect(path)
        rows = db.select()
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            yield _row_to_raw(row), {"extra_info": {"db_id": int(row.id)}}
    except backend_errors as exc:
        # re-raised as a parser error, which process() reports with the file and frame
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if db is not None and hasattr(db, "close"):
            with contextlib.suppress(*backend_errors):
                db.close()


def iter_asedb(path: str | os.PathLike, keys: LabelKeys | None = None,
               required: Sequence[str] = (), validate: bool = True) -> Iterator[Atoms]:
    """Stream the rows of an ASE database (``.db`` or ``.aselmdb``) as canonical ``ase.Atoms``.

    Labels are looked up in the row's calculator results (``energy``, ``forces``, ``stress``),
    then its ``key_value_pairs`` and ``data``. ``info["db_id"]`` keeps the row id.

    Args:
        path: database file.
        keys, required, validate: as in :func:`mlip.data.formats.read`.

    Yields:
        ``ase.Atoms`` with canonical labels; ``info["source"]`` counts rows from 0.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise error(path, 0, None, "file is empty (no frames found)")
    # opening and row errors (sqlite3.DatabaseError on a corrupt file) surface as DataError in process()
    yield from process(path, _raw_frames(path), keys or LabelKeys(), required, validate)
