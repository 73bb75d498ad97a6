"""Pure-PyTorch spherical-grid (Gaunt) product: the specification of the Triton ``grid_product``.

After "The Price of Freedom" (Xie, Daigavane, Kotak, Smidt, ICML 2025: spherical-grid tensor
products) and Gaunt tensor products (Luo, Chen, He, ICLR 2024): two irreps features are evaluated as functions on a sphere
grid, multiplied pointwise, and projected back. With a quadrature exact to total degree
``2 lmax_in + lmax_out`` this equals the full Gaunt tensor product,

    out[l3 m3] = sum_{l1 m1 l2 m2} a[l1 m1] b[l2 m2] (1/4π) ∫ Y_{l1m1} Y_{l2m2} Y_{l3m3} dΩ,

channel by channel, at ``O(G (L+1)^2)`` cost instead of ``O((L+1)^6)``. The layout is the
dense natural-parity one of :mod:`mlip.kernels.reference` (e3nn order, component
normalisation); products of natural-parity inputs keep natural parity, so the op is
exactly O(3)-equivariant on an exact grid.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch


def grid_product(a: torch.Tensor, b: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> torch.Tensor:
    """Channel-wise product on a sphere grid: ``from_grid @ ((to_grid @ a) * (to_grid @ b))``.

    Args:
        a, b: ``[n, C, (L+1)^2]`` irreps features.
        to_grid: ``[G, (L+1)^2]``: ``f(r_g) = sum_lm x_lm Y_lm(r_g)``.
        from_grid: ``[(L_out+1)^2, G]``: quadrature projection back to coefficients.

    Returns:
        ``[n, C, (L_out+1)^2]``.

    Shapes:
        a, b [n, C, D]; to_grid [G, D]; from_grid [D_out, G] -> [n, C, D_out].
    """
    _check_shapes(a, b, to_grid, from_grid)
    fa = torch.matmul(a, to_grid.t())  # [n, C, G]
    fb = torch.matmul(b, to_grid.t())  # [n, C, G]
    return torch.matmul(fa * fb, from_grid.t())


def _check_shapes(a: torch.Tensor, b: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"grid_product: a and b must both be [n, C, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    if to_grid.dim() != 2 or to_grid.shape[1] != a.shape[2]:
        raise ValueError(f"grid_product: to_grid must be [G, {a.shape[2]}], got {tuple(to_grid.shape)}")
    if from_grid.dim() != 2 or from_grid.shape[1] != to_grid.shape[0]:
        raise ValueError(f"grid_product: from_grid must be [D_out, {to_grid.shape[0]}], got {tuple(from_grid.shape)}")


@functools.cache
def _gaunt_grid64(lmax_in: int, lmax_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    from e3nn import o3

    degree = 2 * lmax_in + lmax_out  # the integrand Y_l1 Y_l2 Y_l3 has this total degree
    n_theta = degree // 2 + 1  # Gauss-Legendre with n nodes is exact to degree 2n - 1 in cos(theta)
    n_phi = degree + 1 + (degree + 1) % 2  # uniform phi exact for |m| < n_phi; even: inversion-symmetric
    x, w = np.polynomial.legendre.leggauss(n_theta)
    ct = torch.tensor(x, dtype=torch.float64)[:, None].expand(n_theta, n_phi)
    st = torch.sqrt(1.0 - ct * ct)
    phi = (2.0 * math.pi / n_phi) * torch.arange(n_phi, dtype=torch.float64)[None, :].expand(n_theta, n_phi)
    pts = torch.stack([st * torch.cos(phi), st * torch.sin(phi), ct], dim=-1).reshape(-1, 3)
    wts = (torch.tensor(w, dtype=torch.float64)[:, None] * (2.0 * math.pi / n_phi)).expand(n_theta, n_phi).reshape(-1)
    y_in = o3.spherical_harmonics(list(range(lmax_in + 1)), pts, normalize=True, normalization="component")
    y_out = o3.spherical_harmonics(list(range(lmax_out + 1)), pts, normalize=True, normalization="component")
    return y_in.contiguous(), (y_out * (wts / (4.0 * math.pi))[:, None]).t().contiguous()


def gaunt_grid(lmax_in: int, lmax_out: int, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Grid matrices for which :func:`grid_product` is the exact Gaunt product.

    Gauss-Legendre in ``cos θ`` times uniform ``φ``, exact to total degree ``2 lmax_in + lmax_out``.

    Returns:
        ``(to_grid [G, (lmax_in+1)^2], from_grid [(lmax_out+1)^2, G])``.

    >>> to_grid, from_grid = gaunt_grid(1, 1)
    >>> tuple(to_grid.shape), tuple(from_grid.shape)
    ((8, 4), (4, 8))
    """
    to_grid, from_grid = _gaunt_grid64(lmax_in, lmax_out)
    return to_grid.to(dtype=dtype, device=device), from_grid.to(dtype=dtype, device=device)
