"""Tensor-product backends behind one signature: ``torch`` (reference) and ``triton``.

``get_backend(name, device)`` returns a module exposing the ops of
:mod:`mlip.kernels.reference`. ``auto`` picks Triton on CUDA when it is importable and
the torch reference elsewhere. An explicitly requested backend that cannot run raises
rather than silently falling back.
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
