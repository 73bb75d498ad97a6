"""ASE database reader: SQLite ``.db`` and the LMDB ``.aselmdb`` used by OMol25.

``.aselmdb`` needs the optional package ``ase-db-backends`` (``pip install ase-db-backends``),
which ``ase.db.connect`` imports for that extension; fairchem is not needed.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from ase import Atoms

from mlip.data.formats.validate import PARSE_ERRORS, LabelKeys, error, process

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


def _raw_frames(path: str | os.PathLike) -> Iterator[tuple[Atoms, dict[str, Any]]]:
    db = _connect(path)
    try:
        for row in db.select():
            yield _row_to_raw(row), {"extra_info": {"db_id": int(row.id)}}
    finally:
        close = getattr(db, "close", None)
        if close is not None:
            close()


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
    try:
        frames = _raw_frames(path)
    except PARSE_ERRORS as exc:  # pragma: no cover - generator creation does not raise
        raise error(path, 0, None, f"cannot open database ({exc})") from exc
    yield from process(path, frames, keys or LabelKeys(), required, validate)
