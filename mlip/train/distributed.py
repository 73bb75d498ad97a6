"""Data-parallel training on ``torch.distributed`` (DDP), launched by ``torchrun``.

Every rank walks the same sequence of *global* batches (same seed) and takes a fixed slice
of each (``indices[rank::world_size]``); it reads only the structures of its slice (its
``DataLoader`` workers, if any, open their own file handles). Each rank divides its loss sums by the global label
counts and DDP averages gradients, so a step equals the single-process step on the same
global batch up to floating-point summation order. Backend: NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistInfo:
    """This process's place in the job (``world_size == 1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment, if any.

    Args:
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("config asks for device cuda but torch sees no CUDA device")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_part(indices: Sequence[int], info: DistInfo) -> list[int]:
    """This rank's deterministic share of one global batch (may be empty)."""
    return list(indices)[info.rank :: info.world_size]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` on one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (returns a new tensor; identity on one process)."""
    if not info.enabled:
        return t
    out = t.detach().clone().to(info.device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise maximum of ``t`` over ranks (identity on one process)."""
    if not info.enabled:
        return t
    out = t.detach().clone().to(info.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.cpu()


def all_reduce_max_flag(flag: bool, info: DistInfo) -> bool:
    """True if ``flag`` is true on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class DistributedModel(DistributedDataParallel):
    """DDP wrapper that keeps the :class:`~mlip.models.base.PotentialModel` helpers used by
    :func:`mlip.models.outputs.predict` (``check_batch``, ``r_max``, ``elements``)."""

    def check_batch(self, batch) -> None:  # noqa: ANN001 - GraphBatch
        self.module.check_batch(batch)

    @property
    def r_max(self) -> float:
        return self.module.r_max

    @property
    def elements(self) -> list[int]:
        return self.module.elements


def wrap(model: torch.nn.Module, info: DistInfo, find_unused: bool = False) -> torch.nn.Module:
    """DDP-wrap ``model`` when running on several processes; identity otherwise.

    ``find_unused`` is needed when a step may leave parameters unused (e.g. per-dataset heads
    absent from one rank's share of a batch)."""
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    # buffers (e.g. fixed E0 tables) are identical on every rank by construction
    return DistributedModel(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused)
