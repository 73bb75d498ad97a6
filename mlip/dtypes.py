"""The one map from dtype names (configs, CLI options, calculator arguments) to torch dtypes."""
from __future__ import annotations

import torch

#: accepted names -> torch dtype; models run in float32 or float64 only
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float": torch.float32, "double": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or ``"float"``/``"double"``, or a torch dtype) -> torch dtype.

    >>> resolve_dtype("float64")
    torch.float64

    Raises:
        ValueError: any other name or dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
