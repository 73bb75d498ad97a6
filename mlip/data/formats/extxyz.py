"""Extended XYZ reader: streams frame by frame, parsing each with ASE's extxyz parser."""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ase import Atoms
from ase.data import chemical_symbols
from ase.io.extxyz import read_xyz

from mlip.data.formats.labels import PARSE_ERRORS, DataError, LabelKeys, Record, error, process

EXTENSIONS = (".xyz", ".extxyz")


def _chunks(path: str | os.PathLike) -> Iterator[tuple[int, int, str]]:
    """Split the file into frame texts without parsing them: ``(frame, first line, text)``.

    Done here (not by ``ase.io.iread``, which indexes the whole file first) so that a
    missing or extra line is reported for the frame where it happens.
    """
    with open(path, encoding="utf-8") as handle:
        frame, lineno = 0, 0
        for line in handle:
            lineno += 1
            if not line.strip():
                continue  # blank lines between or after frames
            try:
                n_atoms = int(line.split()[0])
            except ValueError:
                raise error(path, frame, None,
                            f"malformed or truncated file: line {lineno} should hold the atom "
                            f"count of frame {frame}, got {line.strip()[:80]!r}") from None
            if n_atoms < 1:
                raise error(path, frame, None, f"line {lineno}: frame has {n_atoms} atoms")
            lines = [line]
            for _ in range(n_atoms + 1):
                nxt = handle.readline()
                if not nxt:
                    raise error(path, frame, None,
                                f"malformed or truncated file: frame starting at line {lineno} "
                                f"declares {n_atoms} atoms but the file ends after "
                                f"{max(len(lines) - 2, 0)}")
                lines.append(nxt)
            yield frame, lineno, "".join(lines)
            lineno += n_atoms + 1
            frame += 1


def records(path: str | os.PathLike) -> Iterator[Record]:
    """The frames as text chunks, without parsing them (see :func:`_chunks`)."""
    for frame, lineno, text in _chunks(path):
        yield Record(frame, None, (lineno, text))


def parse(path: str | os.PathLike, record: Record) -> tuple[Atoms, dict[str, Any]]:
    """One frame's text -> raw ``ase.Atoms`` (ASE's extxyz parser); raises :class:`DataError`."""
    lineno, text = record.payload
    lines = f"lines {lineno}-{lineno + text.count(chr(10)) - 1}"
    try:
        return next(read_xyz(io.StringIO(text), 0)), {}
    except KeyError as exc:
        symbol = exc.args[0] if exc.args else None
        if isinstance(symbol, str) and symbol not in chemical_symbols:
            raise error(path, record.index, "species", f"unknown element symbol '{symbol}'") from exc
        raise error(path, record.index, None, f"malformed frame at {lines} (KeyError: {exc})") from exc
    except PARSE_ERRORS as exc:
        raise error(path, record.index, None,
                    f"malformed frame at {lines} ({type(exc).__name__}: {exc})") from exc


def iter_extxyz(path: str | os.PathLike, keys: LabelKeys | None = None,
                required: Sequence[str] = (), validate: bool = True,
                on_bad: Callable[[DataError], None] | None = None) -> Iterator[Atoms]:
    """Stream the frames of an extended XYZ file as canonical ``ase.Atoms``.

    Labels are found either in the calculator ASE builds for the keys ``energy``,
    ``forces``, ``stress`` or in ``info``/``arrays`` under any other name (``REF_energy``).

    Args:
        path: ``.xyz`` / ``.extxyz`` file.
        keys: source key names (default: the canonical names).
        required: canonical labels every frame must carry.
        validate: run the shared checks (:func:`mlip.data.formats.labels.validate_atoms`).
        on_bad: skip bad frames, reporting each to this callback (default: raise).

    Yields:
        ``ase.Atoms`` with canonical labels (see :func:`~mlip.data.formats.labels.canonicalize`).
    """
    if os.path.getsize(path) == 0:
        raise error(path, 0, None, "file is empty (no frames found)")
    yield from process(path, records(path), parse, keys or LabelKeys(), required, validate, on_bad)
