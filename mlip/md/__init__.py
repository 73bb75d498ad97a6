"""Molecular dynamics (:func:`run_md`) and relaxation (:func:`relax`, batched :func:`relax_batch`)."""
from __future__ import annotations

from mlip.md.dynamics import MDBlowUpError, MDResult, run_md
from mlip.md.relax import RelaxResult, relax, relax_batch

__all__ = ["run_md", "MDResult", "MDBlowUpError", "relax", "relax_batch", "RelaxResult"]
