"""MPTrj JSON reader (``MPtrj_2022.9_full.json`` layout, optionally gzipped).

Layout: ``{mp_id: {frame_id: {"structure": <pymatgen Structure dict>,
"uncorrected_total_energy": eV, "corrected_total_energy": eV, "energy_per_atom": eV,
"force": [n, 3] eV/Å, "stress": [3, 3] kBar (VASP sign), "magmom": [n] μB, ...}}}``.

Stress is converted with :data:`mlip.units.KBAR_VASP_TO_EV_A3` (``-0.1 GPa``): VASP reports
positive = compressive, ASE positive = tensile. The default energy is
``uncorrected_total_energy`` (the raw DFT energy, as public MPTrj converters use).
The file is read as a stream (``ijson``, a C JSON parser from PyPI): one frame's objects are
built at a time, so the 11 GB ``MPtrj_2022.9_full.json`` converts in a few hundred MB; floats
are parsed to the same doubles as the stdlib ``json`` module.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from mlip import keys as K
from mlip.data.formats.labels import DataError, LabelKeys, Record, error, frame_ref, process
from mlip.units import KBAR_VASP_TO_EV_A3

EXTENSIONS = (".json", ".json.gz")

#: MPTrj names used when :class:`LabelKeys` keeps its canonical defaults
MPTRJ_DEFAULTS = {K.ENERGY: "uncorrected_total_energy", K.FORCES: "force", K.STRESS: "stress"}


def mptrj_keys(keys: LabelKeys | None) -> LabelKeys:
    """Map the canonical default key names to MPTrj's (``energy`` -> ``uncorrected_total_energy``,
    ``forces`` -> ``force``); user-chosen names are kept."""
    keys = keys or LabelKeys()
    default = LabelKeys()
    changes = {label: MPTRJ_DEFAULTS[label] for label in MPTRJ_DEFAULTS
               if getattr(keys, label) == getattr(default, label)}
    return dataclasses.replace(keys, **changes)


#: Python's ``json`` writes and reads NaN and ±Infinity, which are not JSON; ijson rejects them, so
#: :class:`_NonFinite` turns each such token into a marker string that :func:`_build` turns back
_NONFINITE = {"\x00NaN": float("nan"), "\x00Infinity": float("inf"), "\x00-Infinity": float("-inf")}
#: a token right after ``[``, ``,`` or ``:`` (a value position; inside a string it would need
#: that punctuation too, which MPTrj's strings, ids and element symbols never have)
_NONFINITE_TOKEN = re.compile(rb'([\[,:]\s*)(-?Infinity|NaN)(?![\w"])')
_LAST_DELIMITER = re.compile(rb'[\[\]{},:][^\[\]{},:]*\Z')


class _NonFinite:
    """A binary file whose NaN / Infinity / -Infinity tokens read as the JSON strings
    ``"\u0000NaN"`` ...; each chunk ends just before a delimiter, so no token is split from the
    punctuation before it."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.carry = handle, b""

    def read(self, n: int = -1) -> bytes:
        buf = self.carry
        while True:
            chunk = self.handle.read(n)
            buf += chunk
            if not chunk or n is None or n < 0:
                cut = len(buf)  # the end of the file
                break
            last = _LAST_DELIMITER.search(buf, 1)
            if last is not None:
                cut = last.start()
                break
        out, self.carry = buf[:cut], buf[cut:]
        if b"NaN" in out or b"Infinity" in out:
            out = _NONFINITE_TOKEN.sub(rb'\1"\\u0000\2"', out)
        return out


def _open(path: str | os.PathLike) -> Any:
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _build(first: str, events: Iterator[tuple[str, Any]]) -> Any:
    """Build the JSON value whose first event is ``first`` from the following ``events``.

    A plain loop over ijson's events: about twice as fast as ``ijson.ObjectBuilder``, and this
    runs for every number of a 1 GB file.
    """
    if first not in ("start_map", "start_array"):
        raise ValueError(f"unexpected JSON event {first!r}")
    root: Any = {} if first == "start_map" else []
    stack, key = [root], None
    for event, value in events:
        if event == "map_key":
            key = value
            continue
        if event in ("end_map", "end_array"):
            stack.pop()
            if not stack:
                return root
            continue
        new = {} if event == "start_map" else [] if event == "start_array" else value
        if event == "string" and value in _NONFINITE:
            new = _NONFINITE[value]
        top = stack[-1]
        if top.__class__ is dict:
            top[key] = new
        else:
            top.append(new)
        if event in ("start_map", "start_array"):
            stack.append(new)
    raise ValueError("the file ends inside a JSON value")


def records(path: str | os.PathLike) -> Iterator[Record]:
    """The frames of an MPTrj file, one JSON object at a time: ``Record(index, "mp-id/frame-id",
    (mp_id, frame_id, frame))``. Only the current frame is held in memory.

    Raises:
        DataError: invalid JSON, a file that ends early, or not the ``{mp_id: {frame_id: frame}}`` layout.
    """
    import ijson

    done = [0, None]  # frames read so far, id of the last one (for messages)
    try:
        with _open(path) as handle:
            for record in _frames(path, ijson.basic_parse(_NonFinite(handle), use_float=True)):
                done[:] = [record.index + 1, record.frame_id]
                yield record
    except ijson.JSONError as exc:
        after = f"after frame {done[0] - 1} ({done[1]})" if done[0] else "before the first frame"
        raise error(path, done[0], None, f"invalid JSON {after}: {exc}") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise error(path, done[0], None, f"cannot read file ({type(exc).__name__}: {exc})") from exc


def _frames(path: str | os.PathLike, events: Iterator[tuple[str, Any]]) -> Iterator[Record]:
    """Walk ``{mp_id: {frame_id: frame}}``, building one frame value at a time."""
    first = next(events, (None, None))[0]
    if first != "start_map":
        raise error(path, None, None, "expected a JSON object {mp_id: {frame_id: frame}}, got "
                    + ("nothing" if first is None else first.replace("start_", "a ").replace("_", " ")))
    index = 0
    for event, mp_id in events:
        if event == "end_map":
            return
        if next(events, (None, None))[0] != "start_map":
            raise error(path, index, mp_id, f"{mp_id}: expected an object {{frame_id: frame}}")
        for event, frame_id in events:
            if event == "end_map":
                break
            kind, value = next(events, (None, None))
            entry = _build(kind, events) if kind in ("start_map", "start_array") else value
            yield Record(index, f"{mp_id}/{frame_id}", (str(mp_id), str(frame_id), entry))
            index += 1
    raise error(path, index, None, "invalid JSON: the file ends inside the top-level object")


def _structure_to_atoms(structure: dict[str, Any]) -> Atoms:
    """The Atoms pymatgen's ``Structure.from_dict`` + ``AseAtomsAdaptor.get_atoms`` give, bit for bit.

    MPTrj's structures are ordered and carry their lattice matrix, so the common case is done
    here directly, with pymatgen's own arithmetic (one ``np.dot(frac, matrix)`` per site): about
    ten times faster, which is most of a conversion's time. Anything else goes through pymatgen.
    """
    fast = _ordered_structure_to_atoms(structure)
    if fast is not None:
        return fast
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(Structure.from_dict(structure))
    # keep only the structure: site properties (magmom, ...) come from the frame itself
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell[:], pbc=True)


def _ordered_structure_to_atoms(structure: dict[str, Any]) -> Atoms | None:
    """The fast path of :func:`_structure_to_atoms`; ``None`` when pymatgen must decide."""
    try:
        matrix = np.array(structure["lattice"]["matrix"], dtype=np.float64).reshape((3, 3))
        numbers, positions = [], []
        for site in structure["sites"]:
            species = site["species"]
            if len(species) != 1 or "oxidation_state" in species[0] or species[0]["occu"] != 1:
                return None
            z = atomic_numbers.get(species[0]["element"])
            frac = np.asarray(site["abc"], dtype=np.float64)
            if z is None or frac.shape != (3,):
                return None
            numbers.append(z)
            positions.append(np.dot(frac, matrix))  # pymatgen's Lattice.get_cartesian_coords
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if not numbers:
        return None
    return Atoms(numbers=numbers, positions=positions, cell=matrix, pbc=True)


def parse(path: str | os.PathLike, record: Record) -> tuple[Atoms, dict[str, Any]]:
    """One MPTrj frame object -> raw ``ase.Atoms`` (pymatgen builds the structure, as public
    converters do) and the :func:`canonicalize` options (kBar -> eV/Å³, ids, magmom)."""
    mp_id, frame_id, entry = record.payload
    where = frame_ref(record.index, record.frame_id)
    if not isinstance(entry, dict) or "structure" not in entry:
        raise error(path, where, "structure", f"entry {mp_id}/{frame_id} has no 'structure'")
    try:
        raw = _structure_to_atoms(entry["structure"])
    except Exception as exc:  # pymatgen raises many types on a bad dict
        raise error(path, where, "structure", f"cannot build a structure for {mp_id}/{frame_id} "
                    f"({type(exc).__name__}: {exc})") from exc
    for name, value in entry.items():
        if name != "structure" and value is not None:
            raw.info[name] = value
    extra_arrays = {}
    magmom = entry.get("magmom")
    if magmom is not None:
        try:
            magmom = np.asarray(magmom, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise error(path, where, "magmom", f"magmom is not numeric ({exc})") from None
        if magmom.shape != (len(raw),):
            raise error(path, where, "magmom", f"magmom must have shape ({len(raw)},), got {magmom.shape}")
        extra_arrays[K.MAGMOM] = magmom
    return raw, {"stress_scale": KBAR_VASP_TO_EV_A3, "extra_info": {"mp_id": mp_id, "frame_id": frame_id},
                 "extra_arrays": extra_arrays}


def iter_mptrj(path: str | os.PathLike, keys: LabelKeys | None = None,
               required: Sequence[str] = (), validate: bool = True,
               on_bad: Callable[[DataError], None] | None = None) -> Iterator[Atoms]:
    """Stream the frames of an MPTrj JSON file as canonical ``ase.Atoms``.

    Args:
        path: ``.json`` or ``.json.gz`` file.
        keys: source names; defaults map to ``uncorrected_total_energy``, ``force``, ``stress``
            (see :func:`mptrj_keys`). Set ``LabelKeys(energy="corrected_total_energy")`` for the
            MP2020-corrected energy.
        required, validate: as in :func:`mlip.data.formats.read`.
        on_bad: skip bad frames, reporting each to this callback (default: raise).

    Yields:
        ``ase.Atoms`` (pbc) with ``info``: ``energy`` eV, ``stress`` [3, 3] eV/Å³ (ASE sign),
        ``mp_id``, ``frame_id``; ``arrays``: ``forces`` [n_atoms, 3] eV/Å, ``magmom`` [n_atoms] μB.
    """
    if os.path.getsize(path) == 0:
        raise error(path, 0, None, "file is empty (no frames found)")
    yield from process(path, records(path), parse, mptrj_keys(keys), required, validate, on_bad)
