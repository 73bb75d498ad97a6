"""Exponential moving average of model weights (evaluated, checkpointed and exported).

``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step (trainable
parameters only; frozen ones and buffers are copied), with the
warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated
by the random initialisation.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    """Shadow copy of the floating-point parameters and buffers of ``model``.

    Args:
        model: the module whose weights are averaged (kept by reference).
        decay: long-run decay in (0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = model
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in self._tensors()}

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, value in self.model.state_dict(keep_vars=True).items():
            if value.is_floating_point():
                yield name, value

    @torch.no_grad()
    def update(self) -> None:
        """Blend the current trainable weights into the shadow copy; copy the rest.

        Frozen parameters and buffers are copied, not blended, so they stay bitwise equal to
        the model's (``d * x + (1 - d) * x`` need not round to ``x``).
        """
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in self._tensors():
            if value.requires_grad:
                self.shadow[name].lerp_(value.detach(), 1.0 - d)
            else:
                self.shadow[name].copy_(value.detach())

    @contextlib.contextmanager
    def swapped(self) -> Iterator[torch.nn.Module]:
        """Temporarily load the averaged weights into the model (restored on exit)."""
        backup = {k: v.detach().clone() for k, v in self._tensors()}
        self._copy_into_model(self.shadow)
        try:
            yield self.model
        finally:
            self._copy_into_model(backup)

    @torch.no_grad()
    def _copy_into_model(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in self._tensors():
            value.copy_(values[name])

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with averaged floating-point entries."""
        out = {}
        for k, v in self.model.state_dict().items():
            out[k] = self.shadow[k].detach().clone() if k in self.shadow else v.detach().clone()
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model (differing entries: {sorted(missing)[:5]})")
        for k, v in state["shadow"].items():
            self.shadow[k] = v.to(self.shadow[k].device, self.shadow[k].dtype).clone()
