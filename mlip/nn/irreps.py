"""Dense natural-parity irreps helpers: ``[n, C, (lmax+1)^2]`` with ``l`` of parity ``(-1)^l``.

Component ``m`` of degree ``l`` sits at ``l*l + l + m`` (e3nn's real spherical-harmonic order).
"""
from __future__ import annotations

import torch


def irreps_dim(lmax: int) -> int:
    """Number of components of ``0e + 1o + ... + lmax``.

    >>> irreps_dim(3)
    16
    """
    return (lmax + 1) ** 2


def l_slice(l: int) -> slice:
    """Components of degree ``l`` in the dense layout.

    >>> l_slice(2)
    slice(4, 9, None)
    """
    return slice(l * l, (l + 1) * (l + 1))


def degree_index(lmax: int) -> torch.Tensor:
    """Degree ``l`` of every component, ``[(lmax+1)^2]``.

    >>> degree_index(1).tolist()
    [0, 1, 1, 1]
    """
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def irreps_string(num_channels: int, lmax: int) -> str:
    """e3nn spelling of the layout, e.g. ``'8x0e+8x1o+8x2e'``."""
    return "+".join(f"{num_channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1))


def spherical_harmonics(lmax: int, vectors: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics ``Y_l(v/|v|)`` for ``l = 0..lmax`` (e3nn, component normalisation).

    ``sum_m Y_lm(r)^2 = 2l + 1`` and ``(1/4π) ∫ Y_lm Y_l'm' dΩ = δ``; the basis is that of
    e3nn's ``wigner_3j`` (used by :func:`mlip.kernels.reference.conv_tp`).

    Shapes:
        vectors [..., 3] -> [..., (lmax+1)^2].
    """
    from e3nn import o3

    return o3.spherical_harmonics(list(range(lmax + 1)), vectors, normalize=True, normalization="component")
