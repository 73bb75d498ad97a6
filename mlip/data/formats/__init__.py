"""Readers for every supported file format, one entry point: :func:`read` / :func:`iter_read`.

Formats (chosen by extension): extended XYZ (``.xyz``, ``.extxyz``), ASE database (``.db``),
ASE-LMDB as used by OMol25 (``.aselmdb``, optional package ``ase-db-backends``), MPTrj JSON
(``.json``, ``.json.gz``) and mlip's packed HDF5 (``.h5``, ``.hdf5``, see :mod:`.hdf5`).

Every reader returns ``ase.Atoms`` without a calculator and with canonical labels:
``info["energy"]`` eV, ``arrays["forces"]`` [n_atoms, 3] eV/Å, ``info["stress"]`` [3, 3] eV/Å³
(ASE sign), ``info["charge"]``, ``info["spin"]`` (multiplicity), ``info["weight"]``,
``info["head"]``, ``info["config_type"]``, ``info["source"] = "<file> frame <i>"`` and
``info["isolated_atom"]``. Missing labels are absent. Bad input raises :class:`DataError`
naming the file, the frame (index, and the file's own id: MPTrj ``mp-id/frame-id``, a database
row) and the key; with ``on_bad`` a bad frame is reported and skipped instead.

:func:`expand_paths` turns folders (of ``.aselmdb`` files, or of sharded HDF5 written by
``mlip data convert --shard-size``), globs and lists into the files they stand for.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence

from ase import Atoms

from mlip.data.formats import extxyz, mptrj
from mlip.data.formats.asedb import AseDBReader, iter_asedb
from mlip.data.formats.extxyz import iter_extxyz
from mlip.data.formats.hdf5 import (
    HDF5Reader,
    check_present,
    is_shard_folder,
    iter_hdf5,
    shard_paths,
    write_hdf5,
)
from mlip.data.formats.labels import (
    DataError,
    LabelKeys,
    Parser,
    Record,
    canonicalize,
    check_required,
    is_isolated_atom,
    select,
    validate_atoms,
)
from mlip.data.formats.mptrj import iter_mptrj, mptrj_keys

__all__ = [
    "FORMATS",
    "AseDBReader",
    "DataError",
    "HDF5Reader",
    "LabelKeys",
    "canonicalize",
    "detect_format",
    "expand_paths",
    "is_isolated_atom",
    "iter_read",
    "mptrj_keys",
    "read",
    "records",
    "shard_paths",
    "validate_atoms",
    "write_hdf5",
]

#: format name -> (extensions, streaming reader)
FORMATS = {
    "extxyz": ((".xyz", ".extxyz"), iter_extxyz),
    "asedb": ((".db", ".aselmdb"), iter_asedb),
    "mptrj": ((".json", ".json.gz"), iter_mptrj),
    "hdf5": ((".h5", ".hdf5"), iter_hdf5),
}


def detect_format(path: str | os.PathLike) -> str:
    """Format name from the file extension (``"extxyz"``, ``"asedb"``, ``"mptrj"``, ``"hdf5"``)."""
    name = os.fspath(path).lower()
    for fmt, (extensions, _) in FORMATS.items():
        if name.endswith(extensions):
            return fmt
    known = sorted(ext for extensions, _ in FORMATS.values() for ext in extensions)
    raise DataError(f"{os.fspath(path)}: unknown file extension; supported: {known}")


def iter_read(path: str | os.PathLike, keys: LabelKeys | None = None,
              required: Sequence[str] = (), index: int | slice | None = None,
              validate: bool = True, on_bad: Callable[[DataError], None] | None = None) -> Iterator[Atoms]:
    """Stream the frames of a file as canonical ``ase.Atoms`` (see the module docstring).

    Every format streams (MPTrj JSON through ``ijson``, one frame object at a time). Checks
    that need the whole file (the file is empty; a user-chosen key occurs in no frame) raise
    after the last frame.

    Args:
        path: input file; the format follows from the extension (:func:`detect_format`).
        keys: source key names of the labels (default: the canonical names).
        required: canonical labels every frame must carry, e.g. ``("energy", "forces")``.
        index: ``None`` for all frames, an ``int`` or a ``slice`` of frame indices.
        validate: run the shared checks on each frame (:func:`validate_atoms`).
        on_bad: called with the :class:`DataError` of each bad frame (malformed, a required label
            missing, non-finite values), which is then skipped; ``None`` raises it. Errors that
            leave the rest of the file unreadable (bad JSON syntax, truncation) always raise.

    Yields:
        ``ase.Atoms``, one per selected frame, in file order.

    Raises:
        DataError: malformed/empty file, missing or malformed label, non-finite values,
            unknown element, zero-volume periodic cell, overlapping atoms, unknown key.
    """
    fmt = detect_format(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such file")
    reader = FORMATS[fmt][1]
    yield from select(reader(path, keys=keys, required=required, validate=validate, on_bad=on_bad), index)


def records(path: str | os.PathLike, keys: LabelKeys | None = None
            ) -> tuple[Iterator[Record], Parser, LabelKeys] | None:
    """A file's frames as unparsed :class:`Record` s, the parser for them and the effective label
    keys, for conversion in worker processes (:mod:`mlip.data.formats.convert`); ``None`` for
    HDF5, which is already parsed.
    """
    fmt = detect_format(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{os.fspath(path)}, frame 0: file is empty (no frames found)")
    keys = keys or LabelKeys()
    if fmt == "extxyz":
        return extxyz.records(path), extxyz.parse, keys
    if fmt == "mptrj":
        return mptrj.records(path), mptrj.parse, mptrj_keys(keys)
    if fmt == "asedb":
        reader = AseDBReader(path)
        return reader.records(), reader.parse, keys
    return None


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The data files a path, a glob or a list of them stand for, in order.

    A folder written by ``mlip data convert --shard-size`` gives its shards (from its
    ``manifest.json``; an unfinished conversion is an error); any other folder gives the files in
    it whose extension mlip reads, sorted by name (e.g. OMol25's ``*.aselmdb``); a glob
    (``shards/*.h5``) gives its matches, sorted.

    Raises:
        FileNotFoundError: a path that does not exist, a glob or folder that matches no data file.
        DataError: a shard folder whose conversion did not finish.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if glob.has_magic(item) and not os.path.exists(item):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"{item}: the pattern matches no file")
            out += expand_paths(found)
        elif os.path.isdir(item):
            if is_shard_folder(item):
                out += shard_paths(item)
                continue
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if not name.startswith(".") and _known(name))
            if not found:
                raise FileNotFoundError(f"{item}: the folder holds no data file mlip reads")
            out += found
        elif os.path.exists(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file")
    return out


def _known(name: str) -> bool:
    return any(name.lower().endswith(extensions) for extensions, _ in FORMATS.values())


def read(path: str | os.PathLike, keys: LabelKeys | None = None,
         required: Sequence[str] = (), index: int | slice | None = None,
         validate: bool = True) -> list[Atoms]:
    """Read a file into a list of canonical ``ase.Atoms``; arguments as :func:`iter_read`."""
    if detect_format(path) == "hdf5" and index is not None:
        required = check_required(required)
        reader = HDF5Reader(path, validate=validate)
        try:
            n = len(reader)
            indices = [index] if isinstance(index, int) else range(n)[index]
            frames = [reader[i] for i in indices]
            for i, atoms in zip(indices, frames):
                check_present(atoms, required, path, i % n)
        finally:
            reader.close()
        return frames
    return list(iter_read(path, keys=keys, required=required, index=index, validate=validate))
