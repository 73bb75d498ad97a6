"""Radial functions of the edge length: Bessel basis, smooth polynomial envelope, and the
per-edge radial weights, either learnable cubic splines (Facet, arXiv 2509.08418) or an MLP
(NequIP/MACE).

Both weight types vanish smoothly at ``r_max`` (they carry the envelope, and the MLP has no
biases), so energies and forces are continuous as a neighbour crosses the cutoff.
"""
from __future__ import annotations

import itertools
import math

import torch


class BesselBasis(torch.nn.Module):
    """``b_n(r) = sqrt(2/r_max) sin(n π r / r_max) / r`` for ``n = 1..num_radial``.

    Shapes:
        r [n_edges] Å -> [n_edges, num_radial].
    """

    def __init__(self, r_max: float, num_radial: int = 8) -> None:
        super().__init__()
        self.r_max = float(r_max)
        self.num_radial = int(num_radial)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        n = torch.arange(1, self.num_radial + 1, dtype=r.dtype, device=r.device)
        pref = math.sqrt(2.0 / self.r_max)
        return pref * torch.sin(n * math.pi * r[:, None] / self.r_max) / r[:, None]


class PolynomialEnvelope(torch.nn.Module):
    """Smooth cutoff ``u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)``, ``x = r/r_max``.

    ``u(1) = u'(1) = u''(1) = 0`` (Klicpera et al., DimeNet, arXiv 2003.03123); zero beyond ``r_max``.

    Shapes:
        r [n_edges] Å -> [n_edges].
    """

    def __init__(self, r_max: float, p: int = 5) -> None:
        super().__init__()
        self.r_max = float(r_max)
        self.p = int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = r / self.r_max
        u = (
            1.0
            - 0.5 * (p + 1) * (p + 2) * x.pow(p)
            + p * (p + 2) * x.pow(p + 1)
            - 0.5 * p * (p + 1) * x.pow(p + 2)
        )
        return u * (x < 1.0)


class SplineBasis(torch.nn.Module):
    """Uniform cubic B-spline basis on ``[0, r_max]`` with ``num_knots`` functions.

    Knot ``k`` sits at ``k h`` with ``h = r_max / (num_knots - 1)``; the basis is C2 and a
    partition of unity on ``[0, r_max]``. A radial function is ``B(r) @ W``: one small matmul per
    layer instead of a per-edge MLP.

    Shapes:
        r [n_edges] Å -> [n_edges, num_knots].
    """

    def __init__(self, r_max: float, num_knots: int = 16) -> None:
        super().__init__()
        if num_knots < 4:
            raise ValueError(f"spline radial needs at least 4 knots, got {num_knots}")
        self.r_max = float(r_max)
        self.num_knots = int(num_knots)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        h = self.r_max / (self.num_knots - 1)
        k = torch.arange(self.num_knots, dtype=r.dtype, device=r.device)
        u = (r[:, None] / h - k).abs()  # [n_edges, num_knots]
        inner = 2.0 / 3.0 - u * u + 0.5 * u * u * u
        outer = (2.0 - u).clamp(min=0.0).pow(3) / 6.0
        return torch.where(u < 1.0, inner, outer)


class SplineRadial(torch.nn.Module):
    """Radial weights ``w(r) = u(r) * B(r) @ W`` with learnable spline coefficients ``W``.

    Shapes:
        basis [n_edges, num_knots], envelope [n_edges] -> [n_edges, num_out].
    """

    def __init__(self, num_knots: int, num_out: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_knots, num_out))

    def forward(self, basis: torch.Tensor, envelope: torch.Tensor) -> torch.Tensor:
        return (basis @ self.weight) * envelope[:, None]


class MLPRadial(torch.nn.Module):
    """Radial weights from a bias-free SiLU MLP of the enveloped Bessel basis (zero at ``r_max``).

    Shapes:
        basis [n_edges, num_radial], envelope [n_edges] -> [n_edges, num_out].
    """

    def __init__(self, num_radial: int, hidden: list[int], num_out: int) -> None:
        super().__init__()
        sizes = [num_radial] + list(hidden) + [num_out]
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(a, b)) for a, b in itertools.pairwise(sizes)]
        )

    def forward(self, basis: torch.Tensor, envelope: torch.Tensor) -> torch.Tensor:
        x = basis * envelope[:, None]
        n = len(self.weights)
        for i, w in enumerate(self.weights):
            x = x @ w / math.sqrt(w.shape[0])
            if i < n - 1:
                x = torch.nn.functional.silu(x)
        return x
