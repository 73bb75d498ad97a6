"""Tensor-product backends behind one signature: ``torch`` (reference) and ``triton``.

``get_backend(name, device)`` returns a module exposing the ops of
:mod:`mlip.kernels.reference`. ``auto`` picks Triton on CUDA when it is importable and
the torch reference elsewhere. An explicitly requested backend that cannot run raises
rather than silently falling back (:func:`validate_backend`). The load-time comparison of an
accelerated backend with the reference is :func:`mlip.kernels.validate.check_backend`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map ``auto`` to a concrete backend for ``device``; validate explicit names."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise RuntimeError("kernel 'triton' requested but triton is not installed (pip install 'mlip[gpu]')")
    return name


def get_backend(name: str, device: torch.device | str = "cpu") -> ModuleType:
    """Module implementing the reference ops for the resolved backend."""
    resolved = resolve_backend(name, device)
    if resolved == "torch":
        from mlip.kernels import reference

        return reference
    return importlib.import_module("mlip.kernels.triton.ops")


#: dtypes and largest degree the Triton kernels are generated and tested for
TRITON_DTYPES = (torch.float32, torch.float64)
TRITON_MAX_LMAX = 3


def validate_backend(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    lmax: int | None = None,
) -> str:
    """Resolve ``name`` for ``device`` and raise if that backend cannot run ``dtype``/``lmax`` there.

    ``auto`` falls back to ``torch`` for what Triton does not support (a CPU device, another
    dtype, ``lmax > 3``); an explicit ``triton`` raises instead of silently falling back.

    Returns:
        The concrete backend name, ``"torch"`` or ``"triton"``.
    """
    import os

    device = torch.device(device)
    resolved = resolve_backend(name, device)
    if resolved != "triton":
        return resolved
    problems = []
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        problems.append(f"device {device} is not CUDA (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for tests)")
    if dtype not in TRITON_DTYPES:
        problems.append(f"dtype {dtype} is not one of {TRITON_DTYPES}")
    if lmax is not None and not 0 <= int(lmax) <= TRITON_MAX_LMAX:
        problems.append(f"lmax {lmax} is outside 0..{TRITON_MAX_LMAX}")
    if not problems:
        return "triton"
    if name == "auto":
        return "torch"
    raise ValueError("kernel 'triton' cannot run here: " + "; ".join(problems) + ". Use kernel='torch' or 'auto'.")
