"""What tracing a model (``torch.export`` in :mod:`mlip.export`, ``torch.compile`` in
:mod:`mlip.models.compile`) needs from it: kernels without Python loops over edge chunks, and a
batch whose atom and edge counts stay symbolic."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mlip.data.graph import GraphBatch
from mlip.kernels import reference
from mlip.models.base import PotentialModel


class TraceableKernels:
    """The torch reference ops with the edge convolution in its plain per-path form: the reference's
    chunked convolution loops over edge chunks in Python, which would pin the edge count of a trace.
    Same math (``conv_tp_per_path`` is the reference's oracle), so it declares itself the reference."""

    is_reference = True
    edge_chunking = False
    conv_tp = staticmethod(reference.conv_tp_per_path)
    conv_tp_spline = staticmethod(reference.conv_tp_spline)
    grid_product = staticmethod(reference.grid_product)
    symmetric_contraction = staticmethod(reference.symmetric_contraction)

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def ops(self) -> TraceableKernels:
        return self

    def fuses(self, op: str) -> bool:
        return False


@contextlib.contextmanager
def traceable_kernels(model: PotentialModel, name: str) -> Iterator[None]:
    """Run ``model`` on :class:`TraceableKernels` (families with a kernel backend), restoring it after."""
    if not hasattr(model, "kernel_backend"):
        yield
        return
    before = model.kernel_backend
    model.kernel_backend = TraceableKernels(name)
    try:
        yield
    finally:
        model.kernel_backend = before


class SymbolicBatch(GraphBatch):
    """A :class:`GraphBatch` whose atom and edge counts stay symbolic while tracing (``GraphBatch``
    returns ``int`` counts, which would pin them to the example's)."""

    @property
    def n_atoms(self) -> Any:
        return self.numbers.shape[0]

    @property
    def n_edges(self) -> Any:
        return self.edge_index.shape[1]
