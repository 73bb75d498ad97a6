"""PCA frames for frame averaging (``mlip.nn.frames``): the second moment, degeneracy detection,
frame enumeration, sampling, and gradients through the eigen-decomposition."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mlip.nn import frames as F


def random_orthogonal(seed: int, proper: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q


def all_pairs(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    mask = i != j
    return x[j[mask]] - x[i[mask]]  # [n (n - 1), 3]


def test_unit_weight_moment_of_complete_graph_is_position_pca():
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = all_pairs(x)
    m = F.edge_second_moment(e, torch.zeros(e.shape[0], dtype=torch.long), 1)[0]
    c = x - x.mean(0)
    assert torch.allclose(m, 2 * x.shape[0] * c.T @ c, rtol=1e-12, atol=1e-12)


def test_degeneracy_codes():
    moments = torch.stack([
        torch.diag(torch.tensor([1.0, 2.0, 3.0])), torch.diag(torch.tensor([1.0, 1.0, 3.0])),
        torch.diag(torch.tensor([1.0, 3.0, 3.0])), torch.eye(3), torch.zeros(3, 3),
        torch.diag(torch.tensor([0.0, 0.0, 2.0])),  # a linear molecule
    ]).double()
    n_edges = torch.tensor([5, 5, 5, 5, 0, 2])
    _, _, deg = F.principal_axes(moments, n_edges, tol=1e-4)
    assert deg.tolist() == [F.NONDEGENERATE, F.PLANE_DEGENERATE, F.PLANE_DEGENERATE, F.FULLY_DEGENERATE,
                            F.NO_EDGES, F.PLANE_DEGENERATE]
    # the relative gap threshold decides: a 1e-3 split is degenerate at tol 1e-2, not at 1e-4
    near = torch.diag(torch.tensor([1.0, 1.001, 3.0])).double()[None]
    assert F.principal_axes(near, torch.tensor([3]), tol=1e-2)[2].item() == F.PLANE_DEGENERATE
    assert F.principal_axes(near, torch.tensor([3]), tol=1e-4)[2].item() == F.NONDEGENERATE


@pytest.mark.parametrize("group,counts", [("O3", [8, 16, 48, 1]), ("SO3", [4, 8, 24, 1])])
def test_frame_counts_orthogonality_and_handedness(group, counts):
    moments = torch.stack([torch.diag(torch.tensor([1.0, 2.0, 3.0])), torch.diag(torch.tensor([2.0, 2.0, 5.0])),
                           torch.eye(3), torch.zeros(3, 3)]).double()
    rot = random_orthogonal(0, proper=False)
    moments = rot @ moments @ rot.T
    lam, axes, deg = F.principal_axes(moments, torch.tensor([3, 3, 3, 0]))
    fs = F.enumerate_frames(axes, lam, deg, group=group, n_inplane=4)
    assert torch.bincount(fs.graph).tolist() == counts
    assert torch.equal(fs.graph, torch.sort(fs.graph).values)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(fs.rotation.transpose(1, 2) @ fs.rotation, eye.expand_as(fs.rotation), atol=1e-12)
    assert torch.allclose(torch.zeros(4, dtype=torch.float64).index_add(0, fs.graph, fs.weight), torch.ones(4, dtype=torch.float64))
    if group == "SO3":
        assert torch.allclose(torch.linalg.det(fs.rotation), torch.ones(fs.n_frames, dtype=torch.float64))
    # all frames of one structure are distinct
    for g in range(4):
        r = fs.rotation[fs.graph == g].reshape(-1, 9)
        assert torch.cdist(r, r).add(torch.eye(r.shape[0], dtype=torch.float64)).min() > 1e-6
    # a degenerate pair keeps the unique axis (eigenvalue 5) as the frames' third column
    unique = rot[:, 2]
    third = fs.rotation[fs.graph == 1][:, :, 2]
    assert torch.allclose((third @ unique).abs(), torch.ones(third.shape[0], dtype=torch.float64), atol=1e-12)


def _projected_sets(e: torch.Tensor, group: str) -> torch.Tensor:
    fs = F.structure_frames(e, torch.zeros(e.shape[0], dtype=torch.long), 1, group=group)
    return torch.einsum("ei,fij->fej", e, fs.rotation)  # [n_frames, n_edges, 3]


@pytest.mark.parametrize("group,proper", [("O3", True), ("O3", False), ("SO3", True)])
def test_projected_edges_are_invariant_as_a_set(group, proper):
    """Rotating (or, for O(3), reflecting) the edges permutes the frames: the set of projected
    edge vectors is the same to float64 rounding."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = all_pairs(x)
    ref = _projected_sets(e, group)
    for seed in range(3):
        R = random_orthogonal(seed, proper)
        out = _projected_sets(e @ R.T, group)
        d = torch.cdist(out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1))
        assert d.min(dim=1).values.max() < 1e-10
        assert d.min(dim=0).values.max() < 1e-10


def test_so3_frames_distinguish_mirror_images():
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    e = all_pairs(x)
    ref = _projected_sets(e, "SO3")
    out = _projected_sets(e @ torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)), "SO3")
    d = torch.cdist(out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1))
    assert d.min() > 1e-3


def test_cubic_group_is_a_group():
    g = F.cubic_group()
    prod = (g[:, None] @ g[None]).reshape(-1, 9)
    d = torch.cdist(prod, g.reshape(-1, 9))
    assert d.min(dim=1).values.max() < 1e-12  # closed under multiplication
    assert F.cubic_group(proper_only=True).shape[0] == 24


def test_sample_frames_picks_one_of_each_structures_frames():
    moments = torch.stack([torch.diag(torch.tensor([1.0, 2.0, 3.0])), torch.eye(3)]).double()
    lam, axes, deg = F.principal_axes(moments, torch.tensor([3, 3]))
    full = F.enumerate_frames(axes, lam, deg)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        s = F.sample_frames(full, gen)
        assert s.graph.tolist() == [0, 1] and torch.all(s.weight == 1)
        d = torch.cdist(s.rotation[0].reshape(1, 9), full.rotation[full.graph == 0].reshape(-1, 9))
        assert d.min() < 1e-14
        seen.add(int(d.argmin()))
        d1 = torch.cdist(s.rotation[1].reshape(1, 9), full.rotation[full.graph == 1].reshape(-1, 9))
        assert d1.min() < 1e-14
    assert seen == set(range(8))


def test_gradients_through_frames_are_finite_and_exact():
    """Float64 gradcheck of an invariant built on the frames of a non-degenerate structure, and
    finite (zero) gradients for a degenerate structure in the same batch."""
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    e0 = all_pairs(x)
    n = e0.shape[0]

    def energy(e: torch.Tensor) -> torch.Tensor:
        fs = F.structure_frames(e, torch.zeros(n, dtype=torch.long), 1)
        p = torch.einsum("ei,fij->fej", e, fs.rotation)
        return (p[..., 0] * p[..., 1].exp() + p[..., 2] ** 3).sum(-1).mean()  # not rotation-invariant per frame

    assert torch.autograd.gradcheck(energy, (e0.clone().requires_grad_(),), atol=1e-7, rtol=1e-6)
    cube = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=torch.float64)  # a cube: isotropic
    e = torch.cat([e0, all_pairs(cube)]).requires_grad_()
    graph = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(56, dtype=torch.long)])
    fs = F.structure_frames(e, graph, 2)
    assert fs.degeneracy.tolist() == [F.NONDEGENERATE, F.FULLY_DEGENERATE]
    p = torch.einsum("ei,fij->fej", e, fs.rotation)
    p.pow(3).sum().backward()
    assert torch.isfinite(e.grad).all()


def test_periodic_moment_is_independent_of_the_cell_choice():
    """Edges of a crystal, not its cell, define the frame: a supercell or another basis of the same
    lattice gives the same axes (the moment scales with the number of atoms)."""
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    atoms = bulk("Cu", "fcc", a=3.6) * (1, 1, 1)
    atoms.set_cell(atoms.cell[:] @ np.diag([1.0, 1.05, 1.1]), scale_atoms=True)
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)

    def moment(a):
        d = torch.tensor(neighbor_list("D", a, 4.0), dtype=torch.float64)
        return F.edge_second_moment(d, torch.zeros(d.shape[0], dtype=torch.long), 1)[0] / len(a)

    ref = moment(atoms)
    other = atoms.copy()
    other.set_cell(np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]) @ atoms.cell[:], scale_atoms=False)  # same lattice
    other.wrap()
    for a in (atoms * (2, 1, 3), other):
        assert torch.allclose(moment(a), ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# blended frame sets: continuity and conservative gradients through changes of frame set
# --------------------------------------------------------------------------------------------
def _tetragonal_edges(c: float) -> torch.Tensor:
    """Edges of a rotated box with sides (1, 1, c), all pairs of its 8 corners: for c near 1 the
    second moment has a degenerate pair (exactly at c = 1 all three coincide)."""
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
    corners = corners * torch.tensor([1.0, 1.0, c], dtype=torch.float64)
    return all_pairs(corners) @ random_orthogonal(7).T


def _probe(e: torch.Tensor, blend: float = 10.0) -> torch.Tensor:
    """A function of the frame-projected edges that is *not* rotation-invariant per frame, averaged
    with the frame weights: exactly what a frame-averaged model computes."""
    fs = F.structure_frames(e, torch.zeros(e.shape[0], dtype=torch.long), 1, blend=blend)
    p = torch.einsum("ei,fij->fej", e, fs.rotation)
    per_frame = (p[..., 0] ** 3 * p[..., 1] + p[..., 2] ** 4 * p[..., 0] ** 2).sum(-1)  # [n_frames]
    return (per_frame * fs.weight).sum()


def test_blended_weights_sum_to_one_and_generic_structures_keep_their_eight_frames():
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    graph = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(56, dtype=torch.long),
                       torch.full((56,), 2, dtype=torch.long)])
    e = torch.cat([all_pairs(x), _tetragonal_edges(1.0), _tetragonal_edges(1.0004)])
    fs = F.structure_frames(e, graph, 3)
    total = torch.zeros(3, dtype=torch.float64).index_add_(0, fs.graph, fs.weight)
    assert torch.allclose(total, torch.ones(3, dtype=torch.float64), atol=1e-14)
    counts = torch.bincount(fs.graph, minlength=3).tolist()
    assert counts[0] == 8 and counts[1] == 48  # generic: the sign frames; a cube: the cubic group
    assert counts[2] > 48  # a gap between tol and blend * tol: sets blended
    assert fs.degeneracy.tolist() == [F.NONDEGENERATE, F.FULLY_DEGENERATE, F.PLANE_DEGENERATE]


def _largest_step_refined(blend: float) -> tuple[float, float]:
    """Sweep a box from cubic through the blend region; return the largest change of the averaged
    probe between neighbouring samples, and the largest change after refining that interval 100x."""
    cs = torch.linspace(1.0, 1.004, 201, dtype=torch.float64).tolist()
    values = torch.stack([_probe(_tetragonal_edges(c), blend) for c in cs])
    steps = (values[1:] - values[:-1]).abs()
    k = int(steps.argmax())
    fine = torch.linspace(cs[k], cs[k + 1], 101, dtype=torch.float64).tolist()
    sub = torch.stack([_probe(_tetragonal_edges(c), blend) for c in fine])
    return float(steps[k]), float((sub[1:] - sub[:-1]).abs().max())


def test_energy_is_continuous_through_the_degeneracy_threshold():
    """Where the cubic-group frames hand over to the in-plane frames, the averaged probe (strongly
    orientation-dependent, so the two sets disagree by O(1)) changes steeply but continuously: the
    largest step shrinks in proportion to the sampling step. Switching sets at a threshold instead
    (a blend region of zero width) leaves a jump that no refinement removes."""
    coarse, fine = _largest_step_refined(blend=10.0)
    assert fine < 0.03 * coarse  # measured ratio 0.01: continuous
    coarse_hard, fine_hard = _largest_step_refined(blend=1.0 + 1e-9)
    assert fine_hard > 0.5 * coarse_hard  # measured ~1: a jump


@pytest.mark.parametrize("c", [1.0, 1.0002, 1.0005, 1.002])
def test_gradients_are_exact_in_and_around_the_blend_region(c):
    """Float64 gradcheck of the averaged probe for a cube (constant cubic-group frames), a box inside
    the blend region (cubic group and in-plane frames about a projector axis, rattled by 1e-3) and
    beyond it (sign frames): the averaged function is differentiable and its gradient exact."""
    e0 = _tetragonal_edges(c) + 1e-3 * torch.randn(56, 3, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(5)) * (c != 1.0)
    assert torch.autograd.gradcheck(_probe, (e0.clone().requires_grad_(),), atol=1e-6, rtol=1e-5)


def test_sample_frames_draws_by_weight():
    e = _tetragonal_edges(1.0005)
    fs = F.structure_frames(e, torch.zeros(56, dtype=torch.long), 1)
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([F.sample_frames(fs, gen).rotation[0] for _ in range(4000)])
    # the expected rotation under sampling equals the weighted mean of the frames
    mean = (fs.rotation * fs.weight[:, None, None]).sum(0)
    assert torch.allclose(picks.mean(0), mean, atol=0.05)


def test_sample_frames_draws_k_frames_per_structure_weighted_one_over_k():
    """``k`` independent draws per structure, ordered by structure, each weighted ``1/k``: the
    weights still sum to one per structure, and the mean over draws is the weighted frame mean."""
    e = _tetragonal_edges(1.0005)
    edges = torch.cat([e, e @ torch.linalg.qr(torch.randn(3, 3, dtype=e.dtype))[0]])
    graph = torch.cat([torch.zeros(56, dtype=torch.long), torch.ones(56, dtype=torch.long)])
    fs = F.structure_frames(edges, graph, 2)
    gen = torch.Generator().manual_seed(1)
    s = F.sample_frames(fs, gen, k=3)
    assert s.graph.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(s.weight, torch.full((6,), 1.0 / 3, dtype=s.weight.dtype))
    for rot, g in zip(s.rotation, s.graph):
        assert (fs.rotation[fs.graph == g] - rot).flatten(1).norm(dim=1).min() < 1e-14
    draws = torch.stack([F.sample_frames(fs, gen, k=4).rotation[:4] for _ in range(1000)]).reshape(-1, 3, 3)
    mean = (fs.rotation[fs.graph == 0] * fs.weight[fs.graph == 0, None, None]).sum(0)
    assert torch.allclose(draws.mean(0), mean, atol=0.05)
