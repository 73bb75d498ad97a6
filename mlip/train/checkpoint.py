"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the model, optimiser, learning-rate schedule, EMA, the torch / numpy /
python RNG states, epoch, step (global and within the epoch), the best validation loss and
the resolved config. Files are written through :func:`mlip.models.base.atomic_torch_save`,
so a run killed while saving leaves the previous ``last.pt`` intact. Only tensors and plain
Python values are stored, so loading uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from mlip.models.base import atomic_torch_save, load_torch_file

LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    """Current torch (CPU and CUDA), numpy and python RNG states as weights-only-safe values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in state["cuda"]])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (see :func:`load_checkpoint` for the expected keys)."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint; clear errors for a missing or unreadable file."""
    state = load_torch_file(path, "training checkpoint",
                            ("model", "optimizer", "schedule", "epoch", "step", "rng", "config"), map_location,
                            missing=f"no checkpoint at {path} (nothing to resume; run without --resume)")
    return state
