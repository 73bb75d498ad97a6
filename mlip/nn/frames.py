"""Frames for frame averaging (Puny et al., arXiv 2110.03336; FAENet, arXiv 2305.05577).

A frame is an orthogonal matrix ``U`` built from the structure itself, so that projected edge
vectors ``e' = e @ U`` do not change when the structure is rotated, reflected, translated or
permuted: a rotation ``e -> e @ R^T`` maps the frame to ``U -> R @ U @ S`` where ``S`` is one of
a finite set of ambiguities (the signs of the principal axes). Averaging a function of ``e @ U @ S``
over that finite set makes it exactly invariant.

**Where the frame comes from.** We take the principal axes of the envelope-weighted second moment
of the edge vectors of each structure,

    ``M = Σ_edges w(|e|) e e^T``        (``w`` = the smooth polynomial cutoff envelope)

rather than the covariance of centred positions. For a molecule whose atoms are all within the
cutoff of each other and ``w = 1``, ``Σ_{i≠j} (x_i - x_j)(x_i - x_j)^T = 2 N Σ_i (x_i - c)(x_i - c)^T``:
``M`` *is* the PCA of the centred positions. Unlike positions, edge vectors need no centring, so
``M`` is well defined for periodic structures (it is a per-cell property of the infinite crystal:
every periodic image of an atom sees the same edges), independent of the choice of unit cell and
of which image of an atom sits in the cell, smooth as atoms cross the cutoff, and a function of the
``edge_vec`` the model receives. The last point matters twice: forces ``-dE/dr`` flow through the
frame (exact invariance *and* conservative forces), and the strain in ``edge_vec`` reaches the
frame, so stress by the strain trick stays exact. The cell's own PCA was rejected because the cell
of a lattice is not unique (any unimodular change of basis gives the same crystal and a different
PCA) and because the model never sees the strained cell.

**Degenerate spectra.** When two eigenvalues coincide (relative gap below ``tol``; a symmetric-top
molecule, a tetragonal or hexagonal crystal) the axes inside the degenerate plane are arbitrary;
when all three coincide (methane, a cubic crystal) every axis is. The strategy, by case:

- one degenerate pair: keep the unique axis, take any orthonormal basis of the plane, and average
  over the ``n_inplane`` rotations by ``2πk/n_inplane`` about the unique axis (with the sign flips):
  the residual rotation dependence is the part of the model's in-plane angular dependence at
  Fourier orders that are multiples of ``n_inplane``;
- all three degenerate: average over the 48 signed permutations of the lab axes (the cubic group
  ``O_h``; 24 proper ones for SO(3)): the residual is the model's orientation dependence in
  spherical harmonics of degree 4, 6, 8, ... (those with a cubic invariant);
- a structure without edges: one frame (its energy cannot depend on orientation).

**Passing near degeneracy.** Switching frame sets at the threshold would make the energy jump by
the model's residual rotation dependence wherever a structure crosses it (MD of a cubic crystal
does, all the time). :func:`blended_frames`, which the models use, weights the four sets by smooth
functions of the two eigengaps instead, and builds every axis it uses from spectral projectors that
stay differentiable where that axis is simple, so energies are continuous and forces conservative
through every change of frame set. :func:`enumerate_frames` gives the hard sets of one degeneracy
code (whose degenerate axes are detached: their eigenvector derivative is infinite). The measured
invariance error on methane and a cubic crystal is in ``docs/frame_averaged.md``.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from mlip.nn.scatter import scatter_sum

#: degeneracy codes returned by :func:`principal_axes`
NONDEGENERATE, PLANE_DEGENERATE, FULLY_DEGENERATE, NO_EDGES = 0, 1, 2, 3


@dataclass
class FrameSet:
    """Frames of a batch, a variable number per structure.

    Shapes:
        rotation [n_frames, 3, 3] (columns = frame axes; projected vectors are ``e @ rotation``);
        graph [n_frames] (structure of each frame, sorted); weight [n_frames] (``1 / frames of that
        structure``); degeneracy [n_graphs] (one of the module's degeneracy codes).
    """

    rotation: torch.Tensor
    graph: torch.Tensor
    weight: torch.Tensor
    degeneracy: torch.Tensor

    @property
    def n_frames(self) -> int:
        return int(self.graph.shape[0])


def edge_second_moment(
    edge_vec: torch.Tensor, edge_graph: torch.Tensor, n_graphs: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``M_g = Σ_{edges of g} w e e^T`` per structure, in float64.

    Shapes:
        edge_vec [n_edges, 3] Å; edge_graph [n_edges]; weight [n_edges] or None -> [n_graphs, 3, 3] Å².
    """
    e = edge_vec.to(torch.float64)
    outer = e[:, :, None] * e[:, None, :]  # [n_edges, 3, 3]
    if weight is not None:
        outer = outer * weight.to(torch.float64)[:, None, None]
    return scatter_sum(outer, edge_graph, n_graphs)


def principal_axes(moment: torch.Tensor, n_edges: torch.Tensor, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of each structure's second moment, with degeneracy detection.

    Non-degenerate structures get differentiable eigenvectors (gradients flow through
    ``torch.linalg.eigh``). Degenerate ones get detached eigenvectors, computed from the detached
    moment, so the infinite eigenvector derivative never enters the graph.

    Args:
        moment: ``[n_graphs, 3, 3]`` symmetric, float64.
        n_edges: ``[n_graphs]`` edges per structure (0 -> ``NO_EDGES``).
        tol: relative eigengap ``(λ_{k+1} - λ_k) / λ_max`` below which two axes count as degenerate.

    Returns:
        ``(eigenvalues [n_graphs, 3] ascending, axes [n_graphs, 3, 3] columns, degeneracy [n_graphs])``.
    """
    with torch.no_grad():
        lam_d, vec_d = torch.linalg.eigh(moment.detach())
        top = lam_d[:, 2].clamp_min(torch.finfo(torch.float64).tiny)
        gap_lo = (lam_d[:, 1] - lam_d[:, 0]) / top
        gap_hi = (lam_d[:, 2] - lam_d[:, 1]) / top
        deg = torch.full_like(n_edges, NONDEGENERATE)
        deg = torch.where((gap_lo <= tol) | (gap_hi <= tol), torch.full_like(deg, PLANE_DEGENERATE), deg)
        deg = torch.where((gap_lo <= tol) & (gap_hi <= tol), torch.full_like(deg, FULLY_DEGENERATE), deg)
        deg = torch.where(n_edges == 0, torch.full_like(deg, NO_EDGES), deg)
        ok = deg == NONDEGENERATE
        dummy = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=moment.dtype, device=moment.device))
    safe = torch.where(ok[:, None, None], moment, dummy)  # no degenerate spectrum reaches eigh's backward
    lam, vec = torch.linalg.eigh(safe)
    lam = torch.where(ok[:, None], lam, lam_d)
    vec = torch.where(ok[:, None, None], vec, vec_d)
    return lam, vec, deg


def sign_matrices(dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 8 diagonal sign matrices, ``[8, 3]`` (diagonals), identity first.

    >>> sign_matrices()[:2].tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, -1.0]]
    """
    return torch.tensor(list(itertools.product([1.0, -1.0], repeat=3)), dtype=dtype, device=device)


@functools.cache
def cubic_group(proper_only: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 48 signed permutation matrices (``O_h``), or its 24 rotations, ``[48 or 24, 3, 3]``.

    Cached: treat the result as read-only.

    >>> cubic_group().shape[0], cubic_group(proper_only=True).shape[0]
    (48, 24)
    """
    mats = []
    for perm in itertools.permutations(range(3)):
        p = torch.eye(3, dtype=dtype)[list(perm)]
        for s in sign_matrices(dtype):
            mats.append(p * s[None, :])
    out = torch.stack(mats)
    if proper_only:
        out = out[torch.linalg.det(out) > 0]
    return out


@functools.cache
def inplane_frames(n_inplane: int, proper_only: bool, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Rz(2πk/n) diag(1, σ, τ)`` for ``k < n``, ``σ, τ = ±1`` (``4n`` matrices; ``2n`` proper).

    Right-multiplied onto a basis ``[p1, p2, u]`` whose third column is the unique axis, they
    rotate the degenerate plane and flip the axes' signs. Cached: treat the result as read-only.

    >>> inplane_frames(6, False).shape[0], inplane_frames(6, True).shape[0]
    (24, 12)
    """
    mats = []
    for k in range(int(n_inplane)):
        t = 2.0 * math.pi * k / int(n_inplane)
        rz = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]], dtype=dtype)
        for sig, tau in itertools.product([1.0, -1.0], repeat=2):
            mats.append(rz * torch.tensor([1.0, sig, tau], dtype=dtype)[None, :])
    out = torch.stack(mats)
    if proper_only:
        out = out[torch.linalg.det(out) > 0]
    return out


def enumerate_frames(
    axes: torch.Tensor, eigenvalues: torch.Tensor, degeneracy: torch.Tensor, group: str = "O3", n_inplane: int = 8
) -> FrameSet:
    """All frames of every structure (full frame averaging).

    Args:
        axes: ``[n_graphs, 3, 3]`` principal axes (columns, ascending eigenvalues).
        eigenvalues: ``[n_graphs, 3]`` ascending.
        degeneracy: ``[n_graphs]`` codes from :func:`principal_axes`.
        group: ``"O3"`` (8 sign choices: invariance under rotations and reflections) or ``"SO3"``
            (the 4 with ``det = +1``: rotations only; mirror images may differ).
        n_inplane: rotations about the unique axis averaged over for a degenerate pair.

    Returns:
        :class:`FrameSet` with frames ordered by structure.
    """
    if group not in ("O3", "SO3"):
        raise ValueError(f"frame group must be 'O3' or 'SO3', got {group!r}")
    proper = group == "SO3"
    dtype, device = axes.dtype, axes.device
    cubic = cubic_group(proper, dtype).to(device)
    plane = inplane_frames(n_inplane, proper, dtype).to(device)
    eye = torch.eye(3, dtype=dtype, device=device)
    rotations, graphs = [], []
    # Python loop over the (few) distinct cases, vectorised over the structures of each case
    deg_list = degeneracy.tolist()
    for code in sorted(set(deg_list)):
        idx = torch.nonzero(degeneracy == code).flatten()
        if code == NONDEGENERATE:
            frames = _sign_frames(axes[idx], proper)  # [m, 8 or 4, 3, 3]
        elif code == PLANE_DEGENERATE:
            lam = eigenvalues[idx]
            u = axes[idx].detach()
            low_pair = (lam[:, 1] - lam[:, 0]) <= (lam[:, 2] - lam[:, 1])  # degenerate pair = axes 0, 1
            # basis [p1, p2, unique]: unique axis last
            order_lo = torch.tensor([0, 1, 2], device=device)
            order_hi = torch.tensor([1, 2, 0], device=device)
            order = torch.where(low_pair[:, None], order_lo, order_hi)  # [m, 3]
            base = torch.gather(u, 2, order[:, None, :].expand(-1, 3, -1))
            if proper:
                det_b = torch.linalg.det(base)
                base = base * torch.stack([torch.ones_like(det_b), torch.ones_like(det_b), det_b], -1)[:, None, :]
            frames = base[:, None] @ plane[None]  # [m, 4n or 2n, 3, 3]
        elif code == FULLY_DEGENERATE:
            frames = (eye[None, None] @ cubic[None]).expand(len(idx), -1, -1, -1)
        else:  # NO_EDGES
            frames = eye[None, None].expand(len(idx), 1, 3, 3)
        k = frames.shape[1]
        rotations.append(frames.reshape(-1, 3, 3))
        graphs.append(idx.repeat_interleave(k))
    rotation = torch.cat(rotations)
    graph = torch.cat(graphs)
    order = torch.argsort(graph, stable=True)
    rotation, graph = rotation[order], graph[order]
    n_graphs = degeneracy.shape[0]
    count = torch.bincount(graph, minlength=n_graphs).to(dtype)
    return FrameSet(rotation=rotation, graph=graph, weight=1.0 / count[graph], degeneracy=degeneracy)


def sample_frames(frames: FrameSet, generator: torch.Generator | None = None, k: int = 1) -> FrameSet:
    """``k`` frames per structure, each drawn independently with probability equal to its weight and
    weighted ``1/k`` (stochastic frame averaging: the expected energy is the fully averaged one; more
    draws lower the variance of the training signal at ``k`` times the cost).

    Shapes: a :class:`FrameSet` with ``k * n_graphs`` frames, ordered by structure.
    """
    n_graphs = frames.degeneracy.shape[0]
    count = torch.bincount(frames.graph, minlength=n_graphs)
    start = torch.cumsum(count, 0) - count
    weight = frames.weight.detach().to(torch.float64)
    within = torch.cumsum(weight, 0) - (torch.cumsum(weight, 0) - weight)[start][frames.graph]  # [n_frames]
    picks = []
    for _ in range(int(k)):
        u = torch.rand(n_graphs, generator=generator, dtype=torch.float64).to(weight.device)
        # the first frame of each structure whose running weight passes u (weights sum to one)
        passed = (within <= u[frames.graph]).to(torch.float64)
        pick = start + torch.bincount(frames.graph, weights=passed, minlength=n_graphs).long()
        picks.append(pick.minimum(start + count - 1))
    pick = torch.stack(picks, dim=1).flatten()  # [n_graphs * k], structure after structure
    return FrameSet(
        rotation=frames.rotation[pick],
        graph=frames.graph[pick],
        weight=torch.full((pick.shape[0],), 1.0 / int(k), dtype=frames.weight.dtype, device=frames.weight.device),
        degeneracy=frames.degeneracy,
    )


def smoothstep(x: torch.Tensor) -> torch.Tensor:
    """``0`` for ``x <= 0``, ``1`` for ``x >= 1``, ``6x⁵ - 15x⁴ + 10x³`` between: twice continuously
    differentiable, so energies blended with it keep continuous forces and force derivatives.

    >>> smoothstep(torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])).tolist()
    [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    x = x.clamp(0.0, 1.0)
    return x * x * x * (x * (6.0 * x - 15.0) + 10.0)


def _gap_weight(gap: torch.Tensor, tol: float, blend: float) -> torch.Tensor:
    """0 at or below ``tol`` (degenerate), 1 at or above ``blend * tol`` (distinct), smooth between."""
    if tol <= 0.0:
        return (gap > 0.0).to(gap.dtype)
    return smoothstep((gap - tol) / ((blend - 1.0) * tol))


def _principal_axis(moment: torch.Tensor, lam: torch.Tensor, k: int) -> torch.Tensor:
    """Unit eigenvector ``k`` (sign arbitrary) from the spectral projector
    ``P_k = Π_{j≠k} (M - λ_j) / (λ_k - λ_j)``: differentiable wherever ``λ_k`` is simple, even when
    the other two eigenvalues coincide (``eigh``'s backward divides by every gap).

    Shapes: moment [m, 3, 3]; lam [m, 3] ascending -> [m, 3].
    """
    eye = torch.eye(3, dtype=moment.dtype, device=moment.device)
    proj = eye.expand_as(moment)
    for j in range(3):
        if j != k:
            proj = proj @ ((moment - lam[:, j, None, None] * eye) / (lam[:, k] - lam[:, j])[:, None, None])
    col = torch.diagonal(proj, dim1=-2, dim2=-1).detach().argmax(dim=-1)  # the best-conditioned column
    v = torch.gather(proj, 2, col[:, None, None].expand(-1, 3, 1))[..., 0]  # [m, 3], parallel to the axis
    return v / v.norm(dim=-1, keepdim=True)


def _plane_bases(u: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-handed bases ``[e1, e2, u]`` (columns) with ``e1`` the projection of a lab axis onto the
    plane normal to ``u``, each with its weight: the x axis, handed over smoothly to the y axis
    where ``u`` comes close to x (|u·x| from 0.8 to 0.9), so the basis is a smooth function of ``u``.

    Shapes: u [m, 3] unit -> list of (basis [m, 3, 3], weight [m]).
    """
    w_y = smoothstep((u[:, 0].abs() - 0.8) / 0.1)
    out = []
    for axis, weight in ((0, 1.0 - w_y), (1, w_y)):
        a = torch.zeros_like(u)
        a[:, axis] = 1.0
        e1 = a - (a * u).sum(-1, keepdim=True) * u
        e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # weight 0 where the norm is small
        out.append((torch.stack([e1, torch.linalg.cross(u, e1), u], dim=-1), weight))
    return out


def _sign_frames(axes: torch.Tensor, proper: bool) -> torch.Tensor:
    """The sign choices of each structure's axes, ``[m, 8 or 4, 3, 3]`` (4 with ``det = +1``)."""
    signs = sign_matrices(axes.dtype, axes.device)  # [8, 3]
    frames = axes[:, None, :, :] * signs[None, :, None, :]  # columns scaled by signs
    if proper:
        det_u = torch.linalg.det(axes.detach())  # ±1
        keep = (signs.prod(-1)[None, :] * det_u[:, None]) > 0  # [m, 8], 4 True per row
        frames = frames[keep].view(axes.shape[0], 4, 3, 3)
    return frames


def blended_frames(moment: torch.Tensor, n_edges: torch.Tensor, group: str = "O3", tol: float = 1e-4,
                   blend: float = 10.0, n_inplane: int = 8) -> FrameSet:
    """All frames of every structure, the degenerate cases blended in smoothly (full frame averaging).

    Each relative eigengap ``g`` (see :func:`principal_axes`) gives a weight ``s(g)``, 0 at or below
    ``tol``, 1 at or above ``blend * tol`` (:func:`smoothstep` between). The four frame sets of
    :func:`enumerate_frames` are weighted ``s_lo s_hi`` (sign frames of the three axes),
    ``(1 - s_lo) s_hi`` and ``s_lo (1 - s_hi)`` (in-plane frames about the top or bottom axis) and
    ``(1 - s_lo)(1 - s_hi)`` (the cubic group): the weights sum to one, a frame set enters only where
    its weight is positive, and every axis it uses is then a smooth function of the edges. So the
    averaged energy is continuous with continuous, conservative forces through every change of
    frame set, where switching sets at a threshold would make it jump by the model's residual
    rotation dependence. With both gaps above ``blend * tol`` this is exactly the 8 (4) sign frames.

    Args:
        moment: ``[n_graphs, 3, 3]`` symmetric second moments, float64.
        n_edges: ``[n_graphs]`` edges per structure (0: one identity frame).

    Returns:
        :class:`FrameSet` ordered by structure; ``weight`` (differentiable) sums to one per structure;
        ``degeneracy`` is :func:`principal_axes`'s code at ``tol``.
    """
    if group not in ("O3", "SO3"):
        raise ValueError(f"frame group must be 'O3' or 'SO3', got {group!r}")
    proper = group == "SO3"
    dtype, device = moment.dtype, moment.device
    # eigenvalues only enter the graph (eigh's backward then needs no eigenvector gaps); eigh rather
    # than eigvalsh, whose LAPACK path (and last bits) changes with requires_grad
    lam = torch.linalg.eigh(moment).eigenvalues  # [n, 3] ascending
    top = lam[:, 2].clamp_min(torch.finfo(dtype).tiny)
    s_lo = _gap_weight((lam[:, 1] - lam[:, 0]) / top, tol, blend)
    s_hi = _gap_weight((lam[:, 2] - lam[:, 1]) / top, tol, blend)
    edges = n_edges > 0
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rotations, graph, weight) per set

    def add(frames: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> None:
        k = frames.shape[1]
        parts.append((frames.reshape(-1, 3, 3), idx.repeat_interleave(k), (weight / k).repeat_interleave(k)))

    w = s_lo * s_hi
    idx = torch.nonzero(edges & (w > 0)).flatten()
    if idx.numel():
        m, ev = moment[idx], lam[idx]
        axes = torch.stack([_principal_axis(m, ev, k) for k in range(3)], dim=-1)
        add(_sign_frames(axes, proper), idx, w[idx])
    plane = inplane_frames(n_inplane, proper, dtype).to(device)
    for w, unique in (((1.0 - s_lo) * s_hi, 2), (s_lo * (1.0 - s_hi), 0)):
        idx = torch.nonzero(edges & (w > 0)).flatten()
        if idx.numel():
            u = _principal_axis(moment[idx], lam[idx], unique)
            for base, w_anchor in _plane_bases(u):
                keep = torch.nonzero(w_anchor > 0).flatten()
                add(base[keep][:, None] @ plane[None], idx[keep], (w[idx] * w_anchor)[keep])
    w = (1.0 - s_lo) * (1.0 - s_hi)
    idx = torch.nonzero(edges & (w > 0)).flatten()
    if idx.numel():
        add(cubic_group(proper, dtype).to(device)[None].expand(idx.numel(), -1, -1, -1), idx, w[idx])
    idx = torch.nonzero(~edges).flatten()
    if idx.numel():
        eye = torch.eye(3, dtype=dtype, device=device)
        add(eye[None, None].expand(idx.numel(), 1, 3, 3), idx, torch.ones(idx.numel(), dtype=dtype, device=device))
    rotation, graph, weight = (torch.cat(t) for t in zip(*parts))
    order = torch.argsort(graph, stable=True)
    return FrameSet(rotation=rotation[order], graph=graph[order], weight=weight[order],
                    degeneracy=_degeneracy(lam.detach(), n_edges, tol))


def _degeneracy(lam: torch.Tensor, n_edges: torch.Tensor, tol: float) -> torch.Tensor:
    """:func:`principal_axes`'s degeneracy codes from ascending eigenvalues ``[n, 3]``."""
    top = lam[:, 2].clamp_min(torch.finfo(lam.dtype).tiny)
    lo, hi = (lam[:, 1] - lam[:, 0]) / top <= tol, (lam[:, 2] - lam[:, 1]) / top <= tol
    deg = torch.full_like(n_edges, NONDEGENERATE)
    deg = torch.where(lo | hi, torch.full_like(deg, PLANE_DEGENERATE), deg)
    deg = torch.where(lo & hi, torch.full_like(deg, FULLY_DEGENERATE), deg)
    return torch.where(n_edges == 0, torch.full_like(deg, NO_EDGES), deg)


def structure_frames(
    edge_vec: torch.Tensor,
    edge_graph: torch.Tensor,
    n_graphs: int,
    edge_weight: torch.Tensor | None = None,
    group: str = "O3",
    tol: float = 1e-4,
    n_inplane: int = 8,
    blend: float = 10.0,
) -> FrameSet:
    """Edge vectors -> all frames of every structure (second moment, then :func:`blended_frames`).

    Shapes:
        edge_vec [n_edges, 3] Å; edge_graph [n_edges]; edge_weight [n_edges] -> :class:`FrameSet`
        with float64 rotations and weights, differentiable w.r.t. ``edge_vec``.
    """
    moment = edge_second_moment(edge_vec, edge_graph, n_graphs, edge_weight)
    n_edges = torch.bincount(edge_graph, minlength=n_graphs)
    return blended_frames(moment, n_edges, group=group, tol=tol, blend=blend, n_inplane=n_inplane)


__all__ = [
    "FrameSet", "edge_second_moment", "principal_axes", "sign_matrices", "cubic_group", "inplane_frames",
    "enumerate_frames", "blended_frames", "sample_frames", "smoothstep", "structure_frames",
    "NONDEGENERATE", "PLANE_DEGENERATE", "FULLY_DEGENERATE", "NO_EDGES",
]
