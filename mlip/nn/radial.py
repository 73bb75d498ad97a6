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


def channel_major(weight: torch.Tensor, groups: int | None) -> torch.Tensor:
    """``weight [n_in, groups * C]`` with its columns reordered from ``(group, channel)`` to
    ``(channel, group)`` order (``groups=None``: unchanged), for :func:`as_groups`."""
    if groups is None:
        return weight
    return weight.view(weight.shape[0], groups, -1).transpose(1, 2).reshape(weight.shape[0], -1)


def as_groups(out: torch.Tensor, groups: int | None) -> torch.Tensor:
    """Per-edge outputs made with :func:`channel_major` weights, seen as ``[n_edges, groups, C]``.

    The values are those of the unpermuted weights viewed as ``[n_edges, groups, C]``; the memory
    is ``[n_edges, C, groups]``, the order the torch edge convolution reads (a free view there,
    instead of a transposed copy per chunk of edges). ``groups=None``: ``out`` unchanged.
    """
    if groups is None:
        return out
    return out.view(out.shape[0], out.shape[1] // groups, groups).transpose(1, 2)


class SplineRadial(torch.nn.Module):
    """Radial weights ``w(r) = u(r) * B(r) @ W`` with learnable spline coefficients ``W``.

    Shapes:
        basis [n_edges, num_knots], envelope [n_edges] -> [n_edges, num_out], or with ``groups``
        [n_edges, groups, num_out / groups] in channel-major memory (:func:`as_groups`).
    """

    def __init__(self, num_knots: int, num_out: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_knots, num_out))

    def forward(self, basis: torch.Tensor, envelope: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        # the envelope scales the K basis columns, not the P*C outputs: the same product, far fewer multiplies
        return as_groups((basis * envelope[:, None]) @ channel_major(self.weight, groups), groups)


class MLPRadial(torch.nn.Module):
    """Radial weights from a bias-free SiLU MLP of the enveloped Bessel basis (zero at ``r_max``).

    Shapes:
        basis [n_edges, num_radial], envelope [n_edges] -> [n_edges, num_out], or with ``groups``
        [n_edges, groups, num_out / groups] in channel-major memory (:func:`as_groups`).
    """

    def __init__(self, num_radial: int, hidden: list[int], num_out: int) -> None:
        super().__init__()
        sizes = [num_radial] + list(hidden) + [num_out]
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(a, b)) for a, b in itertools.pairwise(sizes)]
        )

    def forward(self, basis: torch.Tensor, envelope: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        x = basis * envelope[:, None]
        n = len(self.weights)
        for i, w in enumerate(self.weights):
            if i == n - 1:
                w = channel_major(w, groups)
            x = x @ w / math.sqrt(w.shape[0])
            if i < n - 1:
                x = torch.nn.functional.silu(x)
        return as_groups(x, groups)
