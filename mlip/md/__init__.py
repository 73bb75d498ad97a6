"""Molecular dynamics (:func:`run_md`) and relaxation (:func:`relax`, batched :func:`relax_batch`)."""
from __future__ import annotations

from mlip.md.dynamics import MDBlowUpError, MDResult, run_md
from mlip.md.relaxation import RelaxResult, relax, relax_batch

__all__ = ["MDBlowUpError", "MDResult", "RelaxResult", "relax", "relax_batch", "run_md"]
