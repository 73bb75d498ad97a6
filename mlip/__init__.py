"""mlip: machine-learned interatomic potentials.

Three families (``equivariant``, ``frame-averaged``, ``learned-equivariance``) share one
data pipeline (:mod:`mlip.data`), one training loop (:mod:`mlip.train`) and one ASE
calculator (:mod:`mlip.calculator`). Units: eV, Å, eV/Å, eV/Å³ (ASE stress sign).
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, map_location="cpu"):
    """Load a model file written by mlip (see :func:`mlip.models.base.load_model`)."""
    from mlip.models.base import load_model

    return load_model(path, map_location=map_location)


def relax(structure, model=None, **kwargs):
    """Relax a pymatgen ``Structure`` or ASE ``Atoms`` (see :func:`mlip.md.relaxation.relax`)."""
    from mlip.md.relaxation import relax as _relax

    return _relax(structure, model, **kwargs)


__all__ = ["__version__", "load", "relax"]
