"""Tensor-product backends behind one signature: ``torch`` (the reference) and ``triton``.

A backend is a :class:`KernelBackend` in the :data:`BACKENDS` registry: the module holding its ops
(those of :mod:`mlip.kernels.reference`) and what it declares it can run (fused ops, dtypes,
largest ``lmax``, devices). :func:`select_backend` resolves a model's ``kernel`` field once for a
device and dtype: ``auto`` picks Triton on CUDA when it is importable and the torch reference
elsewhere; an explicitly requested backend that cannot run raises :class:`BackendUnavailableError`
rather than silently falling back (:func:`check_buildable` when a model is built, for what no device
or dtype fixes). :func:`mlip.kernels.op_check.check_ops` compares each op of a
backend with the reference on random inputs; the whole-model check on load lives with the models
(:mod:`mlip.models.backend_check`): this package imports nothing from ``models``, ``train``,
``calculator`` or ``md``.
"""
from __future__ import annotations

from mlip.kernels.backends import (
    AUTO_ORDER,
    BACKENDS,
    KERNEL_NAMES,
    OPS,
    BackendUnavailableError,
    KernelBackend,
    KernelOps,
    check_buildable,
    select_backend,
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "KERNEL_NAMES",
    "OPS",
    "BackendUnavailableError",
    "KernelBackend",
    "KernelOps",
    "check_buildable",
    "select_backend",
]
