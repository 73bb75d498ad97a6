"""Kernel backends as objects: each one names the module holding its ops and declares what it can do
(ops it fuses, dtypes, largest degree, devices); :data:`BACKENDS` is the registry and
:func:`select_backend` picks one for a device, dtype and degree.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import torch

#: ops every backend module provides, with the names and signatures of :mod:`mlip.kernels.reference`
OPS = ("conv_tp", "conv_tp_spline", "grid_product", "symmetric_contraction")


class KernelOps(Protocol):
    """What a layer calls: a backend's :attr:`KernelBackend.ops` (a module), or any object with the
    ops it needs (tests pass a namespace holding one counted op)."""

    conv_tp: Any
    conv_tp_spline: Any
    grid_product: Any
    symmetric_contraction: Any


class BackendUnavailableError(ValueError):
    """An explicitly requested kernel backend cannot run on the device, dtype or degree asked for."""


@dataclass(frozen=True)
class KernelBackend:
    """One kernel backend: where its ops live and what it declares it can run.

    The fields are plain data (names, dtypes, flags), so a model holding its backend stays
    picklable and deep-copyable (EMA copies, DataParallel); the ops module is imported on first use,
    which keeps Triton out of ``import mlip`` on machines that never run it.

    Attributes:
        name: the ``kernel`` config value that selects it.
        module: import path of the module with the :data:`OPS`.
        fused: ops that run as one fused kernel here (the model asks :meth:`fuses` to pick a path,
            e.g. the radial spline evaluated inside ``conv_tp_spline`` instead of ``basis @ W``).
        dtypes: floating dtypes it runs (``None``: any).
        max_lmax: largest degree of any input or output (``None``: no limit).
        devices: device types it runs on natively (``None``: wherever torch runs).
        interpreter_env: environment variable that, set to ``"1"``, lets it run on CPU tensors in an
            interpreter (slow; for tests). ``auto`` never picks an interpreted backend.
        requires: a package that must import for it to run.
        edge_chunking: ``edge_chunk_size`` applies here: the ops materialise per-edge tensors that
            chunking under activation checkpointing keeps out of the autograd graph.
        is_reference: the specification itself; other backends are checked against it.
    """

    name: str
    module: str
    fused: frozenset[str] = frozenset()
    dtypes: tuple[torch.dtype, ...] | None = None
    max_lmax: int | None = None
    devices: tuple[str, ...] | None = None
    interpreter_env: str | None = None
    requires: str | None = None
    edge_chunking: bool = False
    is_reference: bool = False

    @property
    def ops(self) -> ModuleType:
        """The module implementing the :data:`OPS` (a ``sys.modules`` lookup after the first call)."""
        return sys.modules.get(self.module) or importlib.import_module(self.module)

    def fuses(self, op: str) -> bool:
        """Whether ``op`` (one of :data:`OPS`) runs as a fused kernel on this backend."""
        if op not in OPS:
            raise ValueError(f"unknown kernel op {op!r}; ops are {OPS}")
        return op in self.fused

    def runs_on(self, device: torch.device | str, interpreted: bool = True) -> bool:
        """Whether this backend runs on ``device``; ``interpreted=False`` ignores :attr:`interpreter_env`."""
        device = torch.device(device)
        if self.devices is None or device.type in self.devices:
            return True
        return (interpreted and device.type == "cpu" and self.interpreter_env is not None
                and os.environ.get(self.interpreter_env, "0") == "1")

    def problems(self, device: torch.device | str, dtype: torch.dtype | None = None, lmax: int | None = None,
                 interpreted: bool = True) -> list[str]:
        """Why this backend cannot run ``dtype`` at degree ``lmax`` on ``device``; empty when it can.

        >>> BACKENDS["torch"].problems("cpu", torch.float16, 4)
        []
        >>> BACKENDS["triton"].problems("cuda", torch.float16, 4)[:2]
        ['dtype torch.float16 is not one of (torch.float32, torch.float64)', 'lmax 4 is outside 0..3']
        """
        device = torch.device(device)
        found = []
        if not self.runs_on(device, interpreted):
            hint = ""
            if self.interpreter_env is not None and device.type == "cpu":
                hint = f" ({self.interpreter_env}=1 runs the kernels on the CPU, slowly, for tests)"
            found.append(f"device {device} is not {' or '.join(d.upper() for d in self.devices or ())}{hint}")
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            found.append(f"dtype {dtype} is not one of {self.dtypes}")
        if lmax is not None and self.max_lmax is not None and not 0 <= int(lmax) <= self.max_lmax:
            found.append(f"lmax {lmax} is outside 0..{self.max_lmax}")
        if self.requires is not None and not _importable(self.requires):
            found.append(f"{self.requires} is not installed (pip install 'mlip[gpu]')")
        return found

    def supports(self, device: torch.device | str, dtype: torch.dtype | None = None, lmax: int | None = None) -> bool:
        """``not problems(...)``."""
        return not self.problems(device, dtype, lmax)

    def problems_anywhere(self, lmax: int | None = None) -> list[str]:
        """Why this backend cannot run degree ``lmax`` on any device in any dtype: what no move or
        cast of a model fixes (a degree out of range, a package not installed); empty otherwise.

        >>> BACKENDS["triton"].problems_anywhere(4)[:1]
        ['lmax 4 is outside 0..3']
        """
        native = torch.device(self.devices[0]) if self.devices else torch.device("cpu")
        return self.problems(native, None, lmax, interpreted=False)


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except Exception:  # noqa: BLE001 - any import failure (missing, broken install) means unavailable
        return False
    return True


#: the registry: ``kernel`` config value -> backend
BACKENDS: dict[str, KernelBackend] = {
    backend.name: backend
    for backend in (
        KernelBackend(
            name="torch",
            module="mlip.kernels.reference",
            # one matmul `basis @ W` beats evaluating the spline inside the convolution on the CPU,
            # so nothing is declared fused: the model keeps the unfused ops here
            fused=frozenset(),
            edge_chunking=True,
            is_reference=True,
        ),
        KernelBackend(
            name="triton",
            module="mlip.kernels.triton.ops",
            fused=frozenset({"conv_tp", "conv_tp_spline", "grid_product"}),  # symmetric_contraction: the reference
            dtypes=(torch.float32, torch.float64),  # the kernels are generated and tested for these
            max_lmax=3,
            devices=("cuda",),
            interpreter_env="TRITON_INTERPRET",
            requires="triton",
            # the fused kernels never write per-edge messages; chunking would also re-sort each chunk
            edge_chunking=False,
        ),
    )
}

#: values of a model's ``kernel`` field: a registered backend, or ``auto``
KERNEL_NAMES = ("auto", *BACKENDS)
#: ``auto`` takes the first of these that runs natively on the device (no interpreter), dtype and degree
AUTO_ORDER = ("triton", "torch")


def check_buildable(name: str, lmax: int | None = None) -> None:
    """Raise now, when a model is built, if its ``kernel`` names a backend that cannot run degree
    ``lmax`` anywhere (:meth:`KernelBackend.problems_anywhere`); ``auto`` and the reference always pass.

    Where the model will run is not known yet (it is built on the CPU, then moved), so device and
    dtype are checked later: by :func:`select_backend` when the model is loaded onto a device
    (:func:`mlip.models.backend_check.check_loaded`) and when it is moved or cast.

    Raises:
        ValueError: ``name`` is neither ``auto`` nor registered.
        BackendUnavailableError: the backend cannot run ``lmax`` anywhere (the message says why).
    """
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {KERNEL_NAMES}")
    found = BACKENDS[name].problems_anywhere(lmax)
    if found:
        raise BackendUnavailableError(
            f"kernel {name!r} cannot run this model: " + "; ".join(found) + ". Use kernel='torch' or 'auto'."
        )


def select_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None,
                   lmax: int | None = None) -> KernelBackend:
    """The backend for a ``kernel`` config value on ``device`` in ``dtype`` up to degree ``lmax``.

    ``auto`` takes the first of :data:`AUTO_ORDER` that runs there natively: Triton on CUDA when it
    imports and supports ``dtype``/``lmax``, the torch reference elsewhere. An explicit name is
    never swapped for another backend.

    Raises:
        ValueError: ``name`` is neither ``auto`` nor registered.
        BackendUnavailableError: the explicitly named backend cannot run there (the message lists why).
    """
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = BACKENDS[candidate]
            # device first: on the CPU, auto never imports triton to find out it will not use it
            if backend.runs_on(device, interpreted=False) and not backend.problems(device, dtype, lmax, interpreted=False):
                return backend
        raise BackendUnavailableError(f"kernel 'auto': no backend runs on {device} in {dtype}")  # torch runs anywhere
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {KERNEL_NAMES}")
    backend = BACKENDS[name]
    found = backend.problems(device, dtype, lmax)
    if found:
        raise BackendUnavailableError(
            f"kernel {name!r} cannot run here: " + "; ".join(found) + ". Use kernel='torch' or 'auto'."
        )
    return backend
