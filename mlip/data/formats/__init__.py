"""Readers for every supported file format, one entry point: :func:`read` / :func:`iter_read`.

Formats (chosen by extension): extended XYZ (``.xyz``, ``.extxyz``), ASE database (``.db``),
ASE-LMDB as used by OMol25 (``.aselmdb``, optional package ``ase-db-backends``), MPTrj JSON
(``.json``, ``.json.gz``) and mlip's packed HDF5 (``.h5``, ``.hdf5``, see :mod:`.hdf5`).

Every reader returns ``ase.Atoms`` without a calculator and with canonical labels:
``info["energy"]`` eV, ``arrays["forces"]`` [n_atoms, 3] eV/Å, ``info["stress"]`` [3, 3] eV/Å³
(ASE sign), ``info["charge"]``, ``info["spin"]`` (multiplicity), ``info["weight"]``,
``info["head"]``, ``info["config_type"]``, ``info["source"] = "<file> frame <i>"`` and
``info["isolated_atom"]``. Missing labels are absent. Bad input raises :class:`DataError`
naming the file, the frame and the key.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from ase import Atoms

from mlip.data.formats.asedb import iter_asedb
from mlip.data.formats.extxyz import iter_extxyz
from mlip.data.formats.hdf5 import HDF5Reader, check_present, iter_hdf5, write_hdf5
from mlip.data.formats.mptrj import iter_mptrj, mptrj_keys
from mlip.data.formats.labels import (
    DataError,
    LabelKeys,
    canonicalize,
    check_required,
    is_isolated_atom,
    select,
    validate_atoms,
)

__all__ = [
    "FORMATS",
    "DataError",
    "HDF5Reader",
    "LabelKeys",
    "canonicalize",
    "detect_format",
    "is_isolated_atom",
    "iter_read",
    "mptrj_keys",
    "read",
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
              validate: bool = True) -> Iterator[Atoms]:
    """Stream the frames of a file as canonical ``ase.Atoms`` (see the module docstring).

    Streams for extxyz, ASE db / aselmdb and HDF5; MPTrj JSON is parsed whole first.
    Checks that need the whole file (the file is empty; a user-chosen key occurs in no
    frame) raise after the last frame.

    Args:
        path: input file; the format follows from the extension (:func:`detect_format`).
        keys: source key names of the labels (default: the canonical names).
        required: canonical labels every frame must carry, e.g. ``("energy", "forces")``.
        index: ``None`` for all frames, an ``int`` or a ``slice`` of frame indices.
        validate: run the shared checks on each frame (:func:`validate_atoms`).

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
    yield from select(reader(path, keys=keys, required=required, validate=validate), index)


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
