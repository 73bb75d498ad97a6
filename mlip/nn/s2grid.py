"""Spherical-grid mixing (Facet, arXiv 2509.08418; eSCN/UMA ``GridAtomwise``): evaluate each
channel's irreps as a function on the sphere, apply a plain MLP over channels at every grid point,
and project back by quadrature.

The grid is Gauss-Legendre in ``cos θ`` times uniform in ``φ``; ``degree`` is the largest total
spherical-harmonic degree it integrates exactly. With ``n_phi`` even the grid is symmetric under
inversion ``r -> -r``, so the layer is exactly parity-equivariant for natural-parity features.
Rotations are exact only when the integrand is band-limited: with ``activation="quadratic"`` (the
default) the grid function after the MLP has degree ``<= 2 lmax`` and ``degree >= 3 lmax`` makes the
layer exactly O(3)-equivariant; with ``"silu"`` the aliasing error decays with ``degree`` (measured by
:func:`grid_equivariance_error`, documented in ``docs/equivariant.md``).

With ``"quadratic"`` the layer is a spherical-grid (Gaunt) product of the hidden features with
themselves, and that product runs through a kernel backend's ``grid_product`` (``KernelBackend.ops``
of :mod:`mlip.kernels`: the torch reference, or the fused Triton kernel with ``kernel: triton``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mlip.kernels import KernelOps, reference
from mlip.nn.irreps import irreps_dim, spherical_harmonics

ACTIVATIONS = ("silu", "quadratic")


def grid_size(degree: int) -> tuple[int, int]:
    """``(n_theta, n_phi)`` integrating spherical harmonics up to total degree ``degree`` exactly.

    Gauss-Legendre with ``n`` nodes is exact for polynomials of degree ``2n - 1`` in ``cos θ``;
    ``n_phi`` uniform points are exact for Fourier modes ``|m| < n_phi`` (kept even for inversion).

    >>> grid_size(6)
    (4, 8)
    """
    n_theta = degree // 2 + 1
    n_phi = degree + 1
    n_phi += n_phi % 2
    return n_theta, n_phi


def default_degree(lmax: int, activation: str = "quadratic") -> int:
    """Grid degree tied to ``lmax``: ``3 lmax`` (exact for ``quadratic``; see the docs for ``silu``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"grid activation must be one of {ACTIVATIONS}, got {activation!r}")
    return 3 * lmax


def s2_grid(degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid points and quadrature weights (float64; weights sum to ``4π``).

    Shapes:
        -> points [n_theta * n_phi, 3] (unit vectors), weights [n_theta * n_phi].
    """
    n_theta, n_phi = grid_size(degree)
    x, w = np.polynomial.legendre.leggauss(n_theta)
    phi = 2.0 * np.pi * np.arange(n_phi) / n_phi
    ct = torch.tensor(x, dtype=torch.float64)[:, None].expand(n_theta, n_phi)
    st = torch.sqrt(1.0 - ct * ct)
    ph = torch.tensor(phi, dtype=torch.float64)[None, :].expand(n_theta, n_phi)
    pts = torch.stack([st * torch.cos(ph), st * torch.sin(ph), ct], dim=-1).reshape(-1, 3)
    wts = (torch.tensor(w, dtype=torch.float64)[:, None] * (2.0 * math.pi / n_phi)).expand(n_theta, n_phi)
    return pts, wts.reshape(-1).contiguous()


def grid_matrices(lmax: int, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``to_grid [K, (lmax+1)^2]`` (``f(r_k) = sum_lm x_lm Y_lm(r_k)``) and ``from_grid [K, (lmax+1)^2]``
    (``x_lm = sum_k f(r_k) w_k Y_lm(r_k) / 4π``), float64. ``from_grid^T to_grid = I`` when
    ``degree >= 2 lmax``."""
    pts, wts = s2_grid(degree)
    Y = spherical_harmonics(lmax, pts)  # [K, D]
    return Y.contiguous(), (Y * wts[:, None] / (4.0 * math.pi)).contiguous()


class GridMixing(torch.nn.Module):
    """Irreps -> sphere grid -> bias-free 2-layer MLP over channels at each point -> irreps.

    ``activation``: ``"quadratic"`` (``W2 (W1 f)^2``, exact at the default degree ``3 lmax``) or
    ``"silu"`` (approximately rotation-equivariant, see the module docstring).

    Quadratic: both linear maps act on channels only, so they commute with the grid transforms and
    the layer is ``W2^T · grid_product(u, u, to_grid, from_grid^T)`` with ``u = W1^T x`` per hidden
    channel (weights scaled by ``1/sqrt(fan_in)``): a Gaunt product computed by the kernel
    backend's ``grid_product`` (:func:`mlip.kernels.reference_grid.grid_product`, or the fused
    Triton twin), equal to the grid-then-MLP order to float64 round-off. SiLU keeps the plain torch
    path (to the grid, pointwise MLP, back): a pointwise SiLU is not a product of two band-limited
    functions, so there is no kernel op for it.

    Shapes:
        x [n, C, (lmax+1)^2] -> [n, C, (lmax+1)^2] (to be added as a residual).
    """

    def __init__(self, num_channels: int, lmax: int, hidden: int | None = None, degree: int | None = None,
                 activation: str = "quadratic") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"grid activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.lmax, self.activation = lmax, activation
        self.degree = default_degree(lmax, activation) if degree is None else int(degree)
        if self.degree < 2 * lmax:
            raise ValueError(f"grid degree {self.degree} < 2*lmax = {2 * lmax}: the grid cannot even represent the features")
        hidden = num_channels if hidden is None else hidden
        self.w1 = torch.nn.Parameter(torch.randn(num_channels, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, num_channels) * 0.1)
        to_grid, from_grid = grid_matrices(lmax, self.degree)
        self._mats64 = (to_grid, from_grid)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._proj_cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_points(self) -> int:
        return int(self._mats64[0].shape[0])

    @property
    def exact(self) -> bool:
        """Exactly O(3)-equivariant: quadratic MLP on a grid integrating degree ``3 lmax`` exactly
        (``f`` has degree ``lmax``, ``(W1 f)^2`` degree ``2 lmax``, the projection ``3 lmax``)."""
        return self.activation == "quadratic" and self.degree >= 3 * self.lmax

    def matrices(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(to_grid [K, (lmax+1)^2], from_grid [K, (lmax+1)^2])`` cast to ``dtype`` on ``device`` (cached)."""
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = tuple(m.to(dtype=dtype, device=device) for m in self._mats64)
        return self._cache[key]

    def projection(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``from_grid^T [(lmax+1)^2, K]``, contiguous: the layout of ``grid_product``'s ``from_grid`` (cached)."""
        key = (dtype, device)
        if key not in self._proj_cache:
            self._proj_cache[key] = self._mats64[1].t().contiguous().to(dtype=dtype, device=device)
        return self._proj_cache[key]

    def forward(self, x: torch.Tensor, ops: KernelOps | None = None) -> torch.Tensor:
        """Mix ``x``; ``ops`` are a kernel backend's ops (``KernelBackend.ops``), whose ``grid_product``
        runs the quadratic layer's product (``None``: the torch reference). Unused with ``"silu"``.

        Shapes:
            x [n, C, (lmax+1)^2] -> [n, C, (lmax+1)^2].
        """
        w1 = self.w1 / math.sqrt(self.w1.shape[0])  # [C, H]
        w2 = self.w2 / math.sqrt(self.w2.shape[0])  # [H, C]
        if self.activation == "quadratic":
            ops = reference if ops is None else ops
            to_grid, _ = self.matrices(x.dtype, x.device)
            u = torch.einsum("ncd,ch->nhd", x, w1)  # [n, H, D]: W1 first, it commutes with to_grid
            g = ops.grid_product(u, u, to_grid, self.projection(x.dtype, x.device))  # [n, H, D]
            return torch.einsum("nhd,hc->ncd", g, w2)
        # SiLU: no product structure, the plain torch path
        to_grid, from_grid = self.matrices(x.dtype, x.device)
        f = torch.matmul(to_grid, x.transpose(1, 2))  # [n, K, C]
        h = torch.nn.functional.silu(torch.matmul(f, w1))  # [n, K, H]
        g = torch.matmul(h, w2)  # [n, K, C]
        return torch.matmul(g.transpose(1, 2), from_grid)  # [n, C, D]


def wigner_matrix(lmax: int, R: torch.Tensor) -> torch.Tensor:
    """Block-diagonal representation ``D(R)`` of ``O(3)`` on the dense natural-parity layout, float64.

    Built by exact quadrature, ``D = (1/4π) ∫ Y(R r) Y(r)^T dΩ`` (so ``Y(R r) = D Y(r)``), which is
    accurate to float64 rounding (e3nn's ``D_from_matrix`` is float32-accurate for ``l >= 2``).
    Reflections (``det R = -1``) give the natural parity ``(-1)^l``.

    Shapes:
        R [3, 3] -> [(lmax+1)^2, (lmax+1)^2].
    """
    pts, wts = s2_grid(2 * lmax + 2)
    R = R.to(torch.float64)
    Y = spherical_harmonics(lmax, pts)
    YR = spherical_harmonics(lmax, pts @ R.T)
    return (YR * wts[:, None]).T @ Y / (4.0 * math.pi)


def grid_equivariance_error(lmax: int, degree: int, num_channels: int = 16, activation: str = "silu",
                            n_samples: int = 8, seed: int = 0) -> float:
    """Relative rotation-equivariance error of a random :class:`GridMixing` in float64.

    ``max |M(D(R) x) - D(R) M(x)| / max |M(x)|`` over random rotations ``R`` and unit-variance
    random features ``x``, all drawn from ``seed`` (the global RNG is neither used nor advanced).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mix = GridMixing(num_channels, lmax, degree=degree, activation=activation).double()
        with torch.no_grad():
            mix.w2.mul_(10.0)  # undo the small residual init: measure the layer at full strength
    err = scale = 0.0
    for _ in range(n_samples):
        x = torch.randn(4, num_channels, irreps_dim(lmax), dtype=torch.float64, generator=gen)
        q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=gen))
        R = q * torch.sign(torch.diagonal(r))
        R = R if torch.det(R) > 0 else -R  # a uniformly random proper rotation
        D = wigner_matrix(lmax, R)
        with torch.no_grad():
            y = mix(x)
            y_rot = mix(x @ D.T)
        err = max(err, float((y_rot - y @ D.T).abs().max()))
        scale = max(scale, float(y.abs().max()))
    return err / scale
