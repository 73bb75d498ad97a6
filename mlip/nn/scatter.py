"""Segment sums on PyTorch's ``index_add_`` (no torch-scatter dependency)."""
from __future__ import annotations

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` into ``dim_size`` bins given by ``index`` (along dim 0).

    Shapes:
        src [n, ...]; index [n] (int64, values in ``0..dim_size-1``) -> [dim_size, ...].

    >>> scatter_sum(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 0]), 2)
    tensor([4., 2.])
    """
    if dim_size == 1:
        # one bin (one structure's energy): a plain sum; Inductor's CPU code generator cannot write a
        # multi-threaded atomic add into a single element
        return src.sum(0, keepdim=True)
    out = torch.zeros((dim_size,) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)
