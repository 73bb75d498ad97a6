"""MPTrj JSON reader (``MPtrj_2022.9_full.json`` layout, optionally gzipped).

Layout: ``{mp_id: {frame_id: {"structure": <pymatgen Structure dict>,
"uncorrected_total_energy": eV, "corrected_total_energy": eV, "energy_per_atom": eV,
"force": [n, 3] eV/Å, "stress": [3, 3] kBar (VASP sign), "magmom": [n] μB, ...}}}``.

Stress is converted with :data:`mlip.units.KBAR_VASP_TO_EV_A3` (``-0.1 GPa``): VASP reports
positive = compressive, ASE positive = tensile. The default energy is
``uncorrected_total_energy`` (the raw DFT energy, as public MPTrj converters use).
The stdlib ``json`` module reads the whole file before the first frame is produced.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from mlip import keys as K
from mlip.data.formats.labels import LabelKeys, error, process
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


def _load(path: str | os.PathLike) -> Any:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise error(path, None, None,
                    f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise error(path, None, None, f"cannot read file ({type(exc).__name__}: {exc})") from exc


def _structure_to_atoms(structure: dict[str, Any]) -> Atoms:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(Structure.from_dict(structure))
    # keep only the structure: site properties (magmom, ...) come from the frame itself
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell[:], pbc=True)


def _raw_frames(path: str | os.PathLike, data: Any) -> Iterator[tuple[Atoms, dict[str, Any]]]:
    if not isinstance(data, dict):
        raise error(path, None, None,
                    f"expected a JSON object {{mp_id: {{frame_id: frame}}}}, got {type(data).__name__}")
    frame = 0
    for mp_id, frames in data.items():
        if not isinstance(frames, dict):
            raise error(path, frame, mp_id, "expected an object {frame_id: frame}")
        for frame_id, entry in frames.items():
            if not isinstance(entry, dict) or "structure" not in entry:
                raise error(path, frame, "structure",
                            f"entry {mp_id}/{frame_id} has no 'structure'")
            try:
                raw = _structure_to_atoms(entry["structure"])
            except Exception as exc:  # pymatgen raises many types on a bad dict
                raise error(path, frame, "structure",
                            f"cannot build a structure for {mp_id}/{frame_id} "
                            f"({type(exc).__name__}: {exc})") from exc
            for name, value in entry.items():
                if name != "structure" and value is not None:
                    raw.info[name] = value
            extra_arrays = {}
            magmom = entry.get("magmom")
            if magmom is not None:
                magmom = np.asarray(magmom, dtype=np.float64)
                if magmom.shape != (len(raw),):
                    raise error(path, frame, "magmom",
                                f"magmom must have shape ({len(raw)},), got {magmom.shape}")
                extra_arrays[K.MAGMOM] = magmom
            yield raw, {"stress_scale": KBAR_VASP_TO_EV_A3,
                        "extra_info": {"mp_id": str(mp_id), "frame_id": str(frame_id)},
                        "extra_arrays": extra_arrays}
            frame += 1


def iter_mptrj(path: str | os.PathLike, keys: LabelKeys | None = None,
               required: Sequence[str] = (), validate: bool = True) -> Iterator[Atoms]:
    """Yield the frames of an MPTrj JSON file as canonical ``ase.Atoms``.

    Args:
        path: ``.json`` or ``.json.gz`` file.
        keys: source names; defaults map to ``uncorrected_total_energy``, ``force``, ``stress``
            (see :func:`mptrj_keys`). Set ``LabelKeys(energy="corrected_total_energy")`` for the
            MP2020-corrected energy.
        required, validate: as in :func:`mlip.data.formats.read`.

    Yields:
        ``ase.Atoms`` (pbc) with ``info``: ``energy`` eV, ``stress`` [3, 3] eV/Å³ (ASE sign),
        ``mp_id``, ``frame_id``; ``arrays``: ``forces`` [n_atoms, 3] eV/Å, ``magmom`` [n_atoms] μB.
    """
    if os.path.getsize(path) == 0:
        raise error(path, 0, None, "file is empty (no frames found)")
    data = _load(path)
    yield from process(path, _raw_frames(path, data), mptrj_keys(keys), required, validate)
