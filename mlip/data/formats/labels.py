"""Shared label extraction and validation for every reader in :mod:`mlip.data.formats`.

Each format parses its file into a "raw" :class:`ase.Atoms` (labels anywhere: a
``SinglePointCalculator``, ``atoms.info`` or ``atoms.arrays``, under user-chosen names);
:func:`canonicalize` then moves the labels to their canonical names (``mlip.keys``),
converts units/shapes, and :func:`validate_atoms` checks the frame. Every failure is a
:class:`DataError` naming the file, the frame index and the key.
"""
from __future__ import annotations

import difflib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list
from ase.stress import voigt_6_to_full_3x3_stress

from mlip import keys as K

#: canonical labels a reader knows about (the fields of :class:`LabelKeys`)
LABELS = (K.ENERGY, K.FORCES, K.STRESS, K.CHARGE, K.SPIN, K.WEIGHT, K.HEAD)
#: ``config_type`` values that mark an isolated-atom reference frame (compared lower-case)
ISOLATED_CONFIG_TYPES = ("isolatedatom", "isolated_atom", "isolated-atom")
#: atoms closer than this (Å, periodic images included) are reported as overlapping
MIN_DISTANCE = 0.1


class DataError(ValueError):
    """Bad input data; the message names the file, the frame index and the key."""


def error(path: Any, frame: int | str | None, key: str | None, message: str) -> DataError:
    """Build a :class:`DataError` with the standard ``file, frame i, key 'k': message`` prefix."""
    where = [str(path)]
    if frame is not None:
        where.append(f"frame {frame}")
    if key is not None:
        where.append(f"key '{key}'")
    return DataError(f"{', '.join(where)}: {message}")


def frame_ref(index: int | str | None, frame_id: str | None = None) -> int | str | None:
    """How messages name a frame: its index in the file, plus the file's own id when it has one.

    >>> frame_ref(7, "mp-1234/mp-1234-0-1")
    '7 (mp-1234/mp-1234-0-1)'
    """
    return index if frame_id is None else f"{index} ({frame_id})"


@dataclass(frozen=True)
class Record:
    """One frame of a file before parsing: cheap to read in file order and picklable, so that
    parsing, labelling and checking (the expensive part) can run in worker processes.

    Attributes:
        index: position of the frame in the file (0-based, counting bad frames too).
        frame_id: the file's own name of the frame (``mp-id/frame-id``, ``row 7``), or ``None``.
        payload: what the format's ``parse`` needs (a text chunk, a JSON object, a row id).
    """

    index: int
    frame_id: str | None
    payload: Any


def suggest(name: str, candidates: Iterable[str]) -> str:
    """A ``did you mean`` hint for a key name, or ``''`` when nothing is close.

    >>> suggest("REF_energy", ["REF_energies", "forces"])
    " Did you mean 'REF_energies'?"
    """
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class LabelKeys:
    """Names of the labels in the *source* file, mapped to mlip's canonical labels.

    Each field names where the canonical label of the same name is read from: a key of
    ``atoms.info`` / ``atoms.arrays`` (extxyz, ASE db ``key_value_pairs`` and ``data``) or a
    calculator result (ASE puts ``energy``/``forces``/``stress`` of an extxyz file into a
    ``SinglePointCalculator``). For example ``LabelKeys(energy="REF_energy",
    forces="REF_forces")`` reads a MACE-style file.

    Which labels *must* be present is not decided here but by ``required=`` of
    :func:`mlip.data.formats.read` (e.g. ``required=("energy", "forces")``). A label that is
    not required may be missing in some frames; it is then absent from the output atoms.
    A key changed from its default that occurs in *no* frame of a file is an error (it is
    almost always a typo).

    For MPTrj JSON the defaults map to the MPTrj names: ``energy`` ->
    ``uncorrected_total_energy``, ``forces`` -> ``force`` (see :mod:`.mptrj`).
    """

    energy: str = K.ENERGY
    forces: str = K.FORCES
    stress: str = K.STRESS
    charge: str = K.CHARGE
    spin: str = K.SPIN
    weight: str = K.WEIGHT
    head: str = K.HEAD

    def items(self) -> list[tuple[str, str]]:
        """``(canonical label, source key)`` pairs in field order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    def user_specified(self) -> list[tuple[str, str]]:
        """The ``(label, key)`` pairs whose key differs from the default."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) != f.default]


def check_required(required: Sequence[str]) -> tuple[str, ...]:
    """Check that ``required`` names canonical labels; returns it as a tuple."""
    required = (required,) if isinstance(required, str) else tuple(required)
    for name in required:
        if name not in LABELS:
            raise ValueError(f"required label '{name}' is not one of {LABELS}")
    return required


def available_keys(raw: Atoms) -> set[str]:
    """Every label-like key of a raw frame: calculator results, info and per-atom arrays."""
    found = set(raw.info) | (set(raw.arrays) - {"numbers", "positions"})
    if raw.calc is not None:
        found |= set(getattr(raw.calc, "results", {}))
    return found


def _lookup(raw: Atoms, key: str) -> Any:
    """The value stored under ``key`` in a raw frame, or ``None``."""
    calc = raw.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    if key in raw.info:
        return raw.info[key]
    if key in raw.arrays and key not in ("numbers", "positions"):
        return raw.arrays[key]
    return None


def _is_missing(value: Any) -> bool:
    """``None`` and all-NaN numbers (the HDF5 fill value) count as a missing label."""
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return len(value) == 0
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return arr.size > 0 and bool(np.all(np.isnan(arr)))


def _as_float_array(value: Any, path: Any, frame: int, key: str) -> np.ndarray:
    try:
        return np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(path, frame, key, f"value {value!r} is not numeric ({exc})") from None


def convert_label(label: str, value: Any, n_atoms: int, path: Any, frame: int, key: str,
                  stress_scale: float = 1.0) -> Any:
    """Convert one source value to the canonical shape/type of ``label``.

    Shapes:
        energy, charge, spin, weight -> float; forces -> [n_atoms, 3] eV/Å;
        stress: [3, 3], [9] or Voigt [6] (ASE order xx yy zz yz xz xy) -> [3, 3] eV/Å³,
        multiplied by ``stress_scale`` (e.g. kBar with VASP sign -> ASE eV/Å³); head -> str.
    """
    if label == K.HEAD:
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = str(value)  # extxyz parses head=1 as an integer
        if not isinstance(value, str):
            raise error(path, frame, key, f"head must be a string, got {value!r}")
        return value
    arr = _as_float_array(value, path, frame, key)
    if label == K.FORCES:
        if arr.shape != (n_atoms, 3):
            raise error(path, frame, key, f"forces must have shape ({n_atoms}, 3), got {arr.shape}")
        return arr
    if label == K.STRESS:
        if arr.shape == (6,):
            arr = voigt_6_to_full_3x3_stress(arr)
        elif arr.shape == (9,):
            # row-major; ASE's extxyz already turns its special key 'stress' into a matrix
            arr = arr.reshape(3, 3)
        elif arr.shape != (3, 3):
            raise error(path, frame, key,
                        f"stress must have shape (3, 3), (9,) or Voigt (6,), got {arr.shape}")
        return arr * stress_scale
    # scalar labels
    if arr.size != 1:
        raise error(path, frame, key, f"{label} must be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


def is_isolated_atom(atoms: Atoms) -> bool:
    """An isolated-atom reference frame (its energy is an element's E0, not a training target).

    ``info["isolated_atom"]`` when a reader set it, else ``config_type`` IsolatedAtom (any case),
    else a single atom without periodic boundaries. A one-atom *periodic* cell (an elemental
    crystal in its primitive cell) is a structure like any other.
    """
    flag = atoms.info.get(K.ISOLATED)
    if flag is not None:
        return bool(flag)
    config_type = atoms.info.get(K.CONFIG_TYPE)
    if isinstance(config_type, str) and config_type.lower() in ISOLATED_CONFIG_TYPES:
        return True
    return len(atoms) == 1 and not bool(np.any(atoms.pbc))


def canonicalize(raw: Atoms, keys: LabelKeys, *, path: Any, frame: int,
                 required: Sequence[str] = (), stress_scale: float = 1.0,
                 extra_info: dict[str, Any] | None = None,
                 extra_arrays: dict[str, np.ndarray] | None = None,
                 validate: bool = True, frame_id: str | None = None) -> Atoms:
    """Turn a raw frame into a validated ``ase.Atoms`` carrying canonical labels.

    Args:
        raw: parsed frame; labels may sit in ``raw.calc.results``, ``raw.info`` or ``raw.arrays``.
        keys: where each canonical label is read from.
        path: file name (for ``info["source"]`` and error messages).
        frame: index of the frame in the file.
        required: canonical labels that must be present.
        stress_scale: factor applied to the stress after reshaping (unit/sign conversion).
        extra_info / extra_arrays: format-specific metadata to keep (e.g. MPTrj ``mp_id``, ``magmom``).
        validate: run :func:`validate_atoms`.
        frame_id: the file's own name of the frame (MPTrj ``mp-id/frame-id``, a database row),
            added to error messages next to the index.

    Returns:
        New ``ase.Atoms`` without a calculator. ``info``: ``energy`` (eV), ``stress`` ([3, 3]
        eV/Å³, ASE sign), ``charge``, ``spin``, ``weight``, ``head``, ``config_type``,
        ``source`` (``"<path> frame <i>"``), ``isolated_atom`` (bool); ``arrays``: ``forces``
        ([n_atoms, 3] eV/Å). Missing labels are absent.
    """
    where = frame_ref(frame, frame_id)
    n_atoms = len(raw)
    numbers = np.asarray(raw.numbers)
    bad = (numbers < 1) | (numbers > 118)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise error(path, where, K.NUMBERS,
                    f"unknown element Z={int(numbers[i])} at atom {i} (expected 1..118)")
    atoms = Atoms(numbers=numbers, positions=np.asarray(raw.positions, dtype=np.float64),
                  cell=np.asarray(raw.cell[:], dtype=np.float64), pbc=raw.pbc)
    for label, key in keys.items():
        value = _lookup(raw, key)
        if _is_missing(value):
            if label in required:
                present = sorted(available_keys(raw))
                raise error(path, where, key,
                            f"required label '{label}' is missing; keys in this frame: {present}."
                            + suggest(key, present))
            continue
        value = convert_label(label, value, n_atoms, path, where, key, stress_scale)
        if label == K.FORCES:
            atoms.arrays[K.FORCES] = value
        else:
            atoms.info[label] = value
    config_type = raw.info.get(K.CONFIG_TYPE)
    if isinstance(config_type, bytes):
        config_type = config_type.decode()
    if config_type is not None and not _is_missing(config_type):
        atoms.info[K.CONFIG_TYPE] = config_type if isinstance(config_type, str) else str(config_type)
    for name, value in (extra_info or {}).items():
        atoms.info[name] = value
    for name, value in (extra_arrays or {}).items():
        atoms.arrays[name] = np.asarray(value)
    atoms.info[K.SOURCE] = f"{path} frame {frame}"
    atoms.info[K.ISOLATED] = is_isolated_atom(atoms)
    if validate:
        validate_atoms(atoms, path=path, frame=where, keys=keys)
    return atoms


def validate_atoms(atoms: Atoms, *, path: Any, frame: int | str, keys: LabelKeys | None = None) -> None:
    """Check one canonical frame; raise :class:`DataError` on the first problem.

    Checks: atomic numbers in 1..118; finite positions, cell and labels; label shapes; a
    non-degenerate cell along periodic directions; no two atoms closer than
    :data:`MIN_DISTANCE` Å (periodic images included; an O(N) neighbour list with that cutoff).
    """
    keys = keys or LabelKeys()
    source_key = dict(keys.items())
    n_atoms = len(atoms)
    if n_atoms == 0:
        raise error(path, frame, K.POSITIONS, "frame has no atoms")
    numbers = atoms.numbers
    bad = (numbers < 1) | (numbers > 118)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise error(path, frame, K.NUMBERS,
                    f"unknown element Z={int(numbers[i])} at atom {i} (expected 1..118)")
    positions = atoms.positions
    if not np.all(np.isfinite(positions)):
        i = int(np.flatnonzero(~np.all(np.isfinite(positions), axis=1))[0])
        raise error(path, frame, K.POSITIONS, f"non-finite position at atom {i}: {positions[i]}")
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    if not np.all(np.isfinite(cell)):
        raise error(path, frame, K.CELL, f"non-finite cell {cell.tolist()}")
    for label in (K.ENERGY, K.STRESS, K.CHARGE, K.SPIN, K.WEIGHT):
        if label in atoms.info:
            value = np.asarray(atoms.info[label], dtype=np.float64)
            expected = (3, 3) if label == K.STRESS else ()
            if value.shape != expected:
                raise error(path, frame, source_key[label],
                            f"{label} must have shape {expected}, got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise error(path, frame, source_key[label], f"non-finite {label}: {value.tolist()}")
    if K.FORCES in atoms.arrays:
        forces = np.asarray(atoms.arrays[K.FORCES], dtype=np.float64)
        if forces.shape != (n_atoms, 3):
            raise error(path, frame, source_key[K.FORCES],
                        f"forces must have shape ({n_atoms}, 3), got {forces.shape}")
        if not np.all(np.isfinite(forces)):
            i = int(np.flatnonzero(~np.all(np.isfinite(forces), axis=1))[0])
            raise error(path, frame, source_key[K.FORCES], f"non-finite force on atom {i}: {forces[i]}")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if np.any(pbc):
        periodic = cell[pbc]  # [n_periodic, 3]
        # volume (length/area) spanned by the periodic lattice vectors: sqrt(det(Gram))
        measure = np.sqrt(max(np.linalg.det(periodic @ periodic.T), 0.0))
        if measure < 1e-6:
            raise error(path, frame, K.CELL,
                        f"cell {cell.tolist()} has zero volume along the periodic directions "
                        f"(pbc={pbc.tolist()})")
    _check_overlaps(atoms, path, frame)


def close_pairs(atoms: Atoms, cutoff: float = MIN_DISTANCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atom pairs closer than ``cutoff`` (Å), periodic images included, for a small cutoff.

    O(N): atoms are wrapped into the cell and only those within ``cutoff`` of a periodic face are
    copied as images (an image closer than ``cutoff`` to an atom inside the cell must lie within
    ``cutoff`` of the cell), then a k-d tree finds the pairs. ASE's cell-list
    ``primitive_neighbor_list`` gives the same pairs but allocates its bins per call, which costs
    ~0.1 s for a 2000-atom cell at this tiny cutoff. Falls back to ASE for cells thinner than
    ``4 * cutoff``.

    Returns:
        ``i``, ``j`` (atom indices, ``i <= j``, each pair once per image found) and distance ``d``.

    Shapes:
        i, j, d: [n_pairs].
    """
    from ase.geometry import complete_cell
    from scipy.spatial import cKDTree

    pbc = np.asarray(atoms.pbc, dtype=bool)
    positions = np.asarray(atoms.positions, dtype=np.float64)  # [n_atoms, 3]
    n_atoms = len(positions)
    # non-periodic vectors only matter as a basis for fractional coordinates: replace them
    cell = complete_cell(np.where(pbc[:, None], np.asarray(atoms.cell[:], dtype=np.float64), 0.0))
    index = np.arange(n_atoms)
    points = positions
    if np.any(pbc):
        heights = 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)  # distances between faces
        if np.any(heights[pbc] < 4 * cutoff):
            i, j, d = primitive_neighbor_list("ijd", pbc, cell, positions, cutoff)
            keep = i <= j
            return i[keep], j[keep], d[keep]
        frac = positions @ np.linalg.inv(cell)  # [n_atoms, 3]
        frac[:, pbc] %= 1.0
        points = frac @ cell
        margin = cutoff / heights * (1 + 1e-6) + 1e-12
        options = []  # per direction: [n_atoms, 3] candidate shifts (0 always allowed)
        for k in range(3):
            shift_k = np.zeros((n_atoms, 3), dtype=np.int64)
            if pbc[k]:
                shift_k[frac[:, k] < margin[k], 1] = 1
                shift_k[frac[:, k] > 1 - margin[k], 2] = -1
            options.append(shift_k)
        valid = [np.stack([np.ones(n_atoms, bool), opt[:, 1] != 0, opt[:, 2] != 0], 1)
                 for opt in options]
        images, owners = [], []
        for a in range(3):
            for b in range(3):
                for c in range(3):
                    if a == b == c == 0:
                        continue
                    mask = valid[0][:, a] & valid[1][:, b] & valid[2][:, c]
                    if np.any(mask):
                        shift = np.stack([options[0][mask, a], options[1][mask, b],
                                          options[2][mask, c]], axis=1)
                        images.append(points[mask] + shift @ cell)
                        owners.append(index[mask])
        if images:
            points = np.concatenate([points, *images])
            index = np.concatenate([index, *owners])
    pairs = cKDTree(points).query_pairs(cutoff, output_type="ndarray")  # [n_pairs, 2]
    if len(pairs) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    d = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    i, j = index[pairs[:, 0]], index[pairs[:, 1]]
    return np.minimum(i, j), np.maximum(i, j), d


def _check_overlaps(atoms: Atoms, path: Any, frame: int) -> None:
    if len(atoms) < 2 and not np.any(atoms.pbc):
        return
    i, j, d = close_pairs(atoms, MIN_DISTANCE)
    if len(i):
        k = int(np.argmin(d))
        raise error(path, frame, K.POSITIONS,
                    f"atoms {int(i[k])} and {int(j[k])} are {float(d[k]):.4f} Å apart "
                    f"(closer than {MIN_DISTANCE} Å, periodic images included)")


class KeyTracker:
    """Remembers which user-specified keys were seen, to report a key found in no frame."""

    def __init__(self, keys: LabelKeys) -> None:
        self.wanted = keys.user_specified()
        self.seen: set[str] = set()
        self.present: set[str] = set()
        self.n_frames = 0

    def update(self, raw: Atoms) -> None:
        """Record the keys of one raw frame."""
        self.n_frames += 1
        if self.wanted and len(self.seen) < len(self.wanted):
            found = available_keys(raw)
            self.present |= found
            self.seen |= {key for _, key in self.wanted if key in found}

    def merge(self, seen: set[str], present: set[str], n_frames: int) -> None:
        """Add what another tracker (e.g. in a worker process) recorded for frames of the same file."""
        self.seen |= seen
        self.present |= present
        self.n_frames += n_frames

    def check(self, path: Any) -> None:
        """Raise if a user-specified key occurred in no frame of ``path``."""
        for label, key in self.wanted:
            if key not in self.seen:
                present = sorted(self.present)
                raise error(path, f"0-{self.n_frames - 1} (all {self.n_frames} frames)", key,
                            f"key for label '{label}' occurs in no frame; keys present: {present}."
                            + suggest(key, present))


def check_not_empty(path: Any, n_frames: int) -> None:
    """Raise :class:`DataError` when a file holds no frame."""
    if n_frames == 0:
        raise error(path, 0, None, "file is empty (no frames found)")


def select(frames: Iterator[Atoms], index: int | slice | None) -> Iterator[Atoms]:
    """Apply ``index`` (``None`` = all, int, or slice) to a stream of frames."""
    if index is None:
        yield from frames
        return
    if isinstance(index, np.integer):
        index = int(index)
    if isinstance(index, int) and index >= 0:
        for i, atoms in enumerate(frames):
            if i == index:
                yield atoms
                return
        raise IndexError(f"frame index {index} out of range")
    if isinstance(index, slice) and all(v is None or v >= 0 for v in (index.start, index.stop)) \
            and (index.step is None or index.step > 0):
        start, stop, step = index.start or 0, index.stop, index.step or 1
        for i, atoms in enumerate(frames):
            if stop is not None and i >= stop:
                return
            if i >= start and (i - start) % step == 0:
                yield atoms
        return
    # negative indices need the whole list
    frames = list(frames)
    if isinstance(index, int):
        yield frames[index]
    else:
        yield from frames[index]


#: exceptions a parser may raise on a malformed file; they become :class:`DataError`
PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, AssertionError, OSError,
                EOFError, UnicodeDecodeError, StopIteration, sqlite3.Error)


#: parses one :class:`Record` of a file into a raw frame and :func:`canonicalize` options
Parser = Callable[[Any, Record], tuple[Atoms, dict[str, Any]]]


def load_record(path: Any, record: Record, parse: Parser, keys: LabelKeys, required: Sequence[str] = (),
                validate: bool = True, tracker: KeyTracker | None = None) -> Atoms | DataError:
    """Parse, label and check one frame; a bad frame is *returned* as its :class:`DataError`.

    Returning rather than raising lets the caller stop or skip (``--skip-bad``) and lets worker
    processes hand the error back with the frame's place in the file.
    """
    where = frame_ref(record.index, record.frame_id)
    try:
        raw, options = parse(path, record)
    except DataError as err:
        return err
    except PARSE_ERRORS as exc:
        return error(path, where, None, f"malformed frame ({type(exc).__name__}: {exc})")
    if tracker is not None:
        tracker.update(raw)
    try:
        return canonicalize(raw, keys, path=path, frame=record.index, frame_id=record.frame_id,
                            required=required, validate=validate, **options)
    except DataError as err:
        return err


def process(path: Any, records: Iterator[Record], parse: Parser, keys: LabelKeys,
            required: Sequence[str] = (), validate: bool = True,
            on_bad: Callable[[DataError], None] | None = None) -> Iterator[Atoms]:
    """Drive a format's records through :func:`load_record`, streaming.

    Args:
        path: the file (for messages).
        records: the file's frames in order (:class:`Record`). An exception raised while
            *reading* them (bad JSON syntax, a truncated file, a corrupt database) stops the
            file: the reader cannot tell where the next frame starts.
        parse: the format's record parser (raw frame + ``canonicalize`` options).
        keys, required, validate: as in :func:`canonicalize`.
        on_bad: called with the error of each bad frame (one that was read but cannot be used:
            malformed, a required label missing, NaN) instead of raising it; the frame is skipped.

    Raises:
        DataError: malformed or empty file, a bad frame (without ``on_bad``), or a
            user-specified key that occurs in no frame (raised after the last frame).
    """
    required = check_required(required)
    tracker = KeyTracker(keys)
    n_frames = 0
    for record in checked_records(path, records):
        n_frames += 1
        atoms = load_record(path, record, parse, keys, required, validate, tracker)
        if isinstance(atoms, DataError):
            if on_bad is None:
                raise atoms
            on_bad(atoms)
            continue
        yield atoms
    check_not_empty(path, n_frames)
    tracker.check(path)


def checked_records(path: Any, records: Iterator[Record]) -> Iterator[Record]:
    """``records``, with a reader's own exception turned into a :class:`DataError` for the file."""
    index = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except DataError:
            raise
        except PARSE_ERRORS as exc:
            raise error(path, index, None,
                        f"malformed or truncated file ({type(exc).__name__}: {exc}); where the next "
                        "frame starts is unknown, so this cannot be skipped") from exc
        index = record.index + 1
        yield record
