"""ASE calculator (:class:`MLIPCalculator`, also for committees and with D3 dispersion) and, if
``torch-sim-atomistic`` is installed, a TorchSim model.

Both, and batched relaxation, build their model inputs with :func:`mlip.calculator.inference.inference_batch`.
``MLIPTorchSimModel`` is imported lazily so that ``torch_sim`` stays optional.
"""
from __future__ import annotations

from typing import Any

from mlip.calculator.ase import MLIPCalculator, NeighborCache
from mlip.calculator.committee import Committee
from mlip.calculator.dispersion import D3Dispersion

__all__ = ["Committee", "D3Dispersion", "MLIPCalculator", "MLIPTorchSimModel", "NeighborCache"]


def __getattr__(name: str) -> Any:
    if name == "MLIPTorchSimModel":
        from mlip.calculator.torchsim import MLIPTorchSimModel

        return MLIPTorchSimModel
    raise AttributeError(f"module 'mlip.calculator' has no attribute {name!r}")
