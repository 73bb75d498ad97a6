"""Building blocks in mlip.nn and the conv_tp reference: exact identities and equivariance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlip.kernels.reference import conv_tp, conv_tp_per_path, tp_paths
from mlip.nn.embedding import check_charge_spin
from mlip.nn.irreps import irreps_dim, spherical_harmonics
from mlip.nn.radial import BesselBasis, MLPRadial, PolynomialEnvelope, SplineBasis, SplineRadial
from mlip.nn.readout import AtomicEnergies, e0_table, head_index
from mlip.nn.s2grid import GridMixing, grid_equivariance_error, grid_matrices, s2_grid, wigner_matrix
from mlip.nn.scatter import scatter_sum
from mlip.nn.tensor_product import ChannelwiseProduct, EquivariantLinear, SpeciesLinear, SymmetricContraction


def _rot(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_scatter_sum_matches_loop():
    src = torch.randn(10, 3, dtype=torch.float64)
    idx = torch.tensor([0, 2, 2, 1, 0, 3, 3, 3, 1, 0])
    want = torch.stack([src[idx == k].sum(0) for k in range(5)])
    assert torch.allclose(scatter_sum(src, idx, 5), want, atol=1e-15)


def test_wigner_matrix_represents_rotations_and_parity():
    R = _rot(0)
    v = torch.randn(7, 3, dtype=torch.float64)
    D = wigner_matrix(3, R)
    assert torch.allclose(spherical_harmonics(3, v @ R.T), spherical_harmonics(3, v) @ D.T, atol=1e-12)
    Dp = wigner_matrix(3, -torch.eye(3, dtype=torch.float64))
    parity = torch.cat([torch.full((2 * l + 1,), (-1.0) ** l, dtype=torch.float64) for l in range(4)])
    assert torch.allclose(Dp, torch.diag(parity), atol=1e-12)


@pytest.mark.parametrize("paths", [(0, 3, 3), (1, 3, 3), (2, 2, 2), (3, 3, 3)])
def test_conv_tp_matches_per_path_formula_and_is_equivariant(paths):
    li, ls, lo = paths
    gen = torch.Generator().manual_seed(1)
    n, E, C = 6, 15, 3
    x = torch.randn(n, C, irreps_dim(li), dtype=torch.float64, generator=gen)
    vec = torch.randn(E, 3, dtype=torch.float64, generator=gen)
    w = torch.randn(E, len(tp_paths(li, ls, lo)), C, dtype=torch.float64, generator=gen)
    s, r = torch.randint(0, n, (E,), generator=gen), torch.randint(0, n, (E,), generator=gen)
    out = conv_tp(x, spherical_harmonics(ls, vec), w, s, r, n, li, ls, lo)
    assert torch.allclose(out, conv_tp_per_path(x, spherical_harmonics(ls, vec), w, s, r, n, li, ls, lo), atol=1e-12)
    # rotate inputs: each path's output block rotates with D_l3 (reflections with (-1)^l3)
    for R in (_rot(2), -_rot(3)):
        out_rot = conv_tp(x @ wigner_matrix(li, R).T, spherical_harmonics(ls, vec @ R.T), w, s, r, n, li, ls, lo)
        k = 0
        for (_, _, l3) in tp_paths(li, ls, lo):
            D = wigner_matrix(l3, R)[l3 * l3 :, l3 * l3 :]
            blk = out[:, :, k : k + 2 * l3 + 1]
            assert torch.allclose(out_rot[:, :, k : k + 2 * l3 + 1], blk @ D.T, atol=1e-11)
            k += 2 * l3 + 1


def test_conv_tp_gradcheck():
    gen = torch.Generator().manual_seed(4)
    n, E, C, li, ls, lo = 3, 5, 2, 1, 2, 1
    x = torch.randn(n, C, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    y = spherical_harmonics(ls, torch.randn(E, 3, dtype=torch.float64, generator=gen)).requires_grad_()
    w = torch.randn(E, len(tp_paths(li, ls, lo)), C, dtype=torch.float64, generator=gen, requires_grad=True)
    s, r = torch.randint(0, n, (E,), generator=gen), torch.randint(0, n, (E,), generator=gen)
    assert torch.autograd.gradcheck(lambda a, b, c: conv_tp(a, b, c, s, r, n, li, ls, lo), (x, y, w))


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_symmetric_contraction_equivariant_and_zero_preserving(correlation):
    torch.manual_seed(0)
    sc = SymmetricContraction(4, 3, 2, correlation, num_elements=2).double()
    A = torch.randn(5, 4, 16, dtype=torch.float64)
    elem = torch.tensor([0, 1, 1, 0, 1])
    out = sc(A, elem)
    assert out.shape == (5, 4, 9)
    for R in (_rot(5), -_rot(6)):
        assert torch.allclose(sc(A @ wigner_matrix(3, R).T, elem), out @ wigner_matrix(2, R).T, atol=1e-11)
    assert torch.equal(sc(torch.zeros_like(A), elem), torch.zeros_like(out))
    # a polynomial of degree exactly `correlation` in A: Lagrange interpolation of t -> sc(tA) through
    # correlation+1 points reproduces it at t = 5, through `correlation` points it does not
    @torch.no_grad()
    def lagrange(ts, t):
        vals = [sc(A * ti, elem) for ti in ts]
        return sum(v * math.prod((t - tj) / (ti - tj) for tj in ts if tj != ti) for ti, v in zip(ts, vals))

    with torch.no_grad():
        exact = sc(A * 5.0, elem)
    ts = [1.0, 2.0, 3.0, 4.0][: correlation + 1]
    assert torch.allclose(lagrange(ts, 5.0), exact, rtol=1e-9, atol=1e-9)
    assert float((lagrange(ts[:-1], 5.0) - exact).abs().max()) > 1e-3 * float(exact.abs().max())


def _contraction_by_paths(A, element, w1, w2, w3, lmax_in, lmax_out, correlation):
    """The symmetric contraction written out path by path with einsum (an oracle for the reference op)."""
    from mlip.kernels.reference import clebsch_gordan, contraction_lmax2, pair_blocks

    def product(x, y, w, lmax1, lmax2, lo, symmetric):
        z = torch.zeros(x.shape[0], x.shape[1], irreps_dim(lo), dtype=x.dtype)
        p = 0
        for l1, l2, l3s in pair_blocks(lmax1, lmax2, lo, symmetric):
            for l3 in l3s:
                cg = clebsch_gordan(l1, l2, l3, x.dtype, x.device)
                t = torch.einsum("nci,ncj,ijk->nck", x[:, :, l1 * l1 : (l1 + 1) ** 2], y[:, :, l2 * l2 : (l2 + 1) ** 2], cg)
                z[:, :, l3 * l3 : (l3 + 1) ** 2] += t * w[element][:, p, :, None]
                p += 1
        return z

    out = torch.zeros(A.shape[0], A.shape[1], irreps_dim(lmax_out), dtype=A.dtype)
    for l in range(min(lmax_in, lmax_out) + 1):
        out[:, :, l * l : (l + 1) ** 2] = A[:, :, l * l : (l + 1) ** 2] * w1[element][:, l, :, None]
    if correlation >= 2:
        l2 = contraction_lmax2(lmax_in, lmax_out, correlation)
        x2 = product(A, A, w2, lmax_in, lmax_in, l2, True)
        k = min(irreps_dim(l2), irreps_dim(lmax_out))
        out[:, :, :k] += x2[:, :, :k]
        if correlation >= 3:
            out = out + product(x2, A, w3, l2, lmax_in, lmax_out, False)
    return out


@pytest.mark.parametrize("lmax_in,lmax_out,correlation,n_elem", [(3, 2, 3, 2), (2, 2, 2, 1), (1, 2, 3, 3), (2, 0, 1, 2)])
def test_symmetric_contraction_runs_the_backend_op_and_matches_the_path_by_path_formula(lmax_in, lmax_out, correlation,
                                                                                        n_elem):
    """The module calls its backend's ``symmetric_contraction`` once, with its weight tables and each
    atom's table row (row 0 for every atom without per-element weights); the reference op equals the
    contraction written out path by path with einsum, and refuses weights that do not match ``correlation``."""
    import types

    from mlip.kernels import reference

    torch.manual_seed(0)
    sc = SymmetricContraction(3, lmax_in, lmax_out, correlation, num_elements=n_elem).double()
    A = torch.randn(5, 3, irreps_dim(lmax_in), dtype=torch.float64)
    elem = torch.tensor([0, 1, 1, 0, 1]) % n_elem if n_elem > 1 else torch.tensor([0, 2, 1, 0, 1])
    calls = []

    def symmetric_contraction(*args):
        calls.append(args)
        return reference.symmetric_contraction(*args)

    out = sc(A, elem, types.SimpleNamespace(symmetric_contraction=symmetric_contraction))
    assert len(calls) == 1
    rows = calls[0][1]
    assert torch.equal(rows, elem if n_elem > 1 else torch.zeros_like(elem))
    assert calls[0][2] is sc.w1 and calls[0][3] is sc.w2 and calls[0][4] is sc.w3
    assert calls[0][5:] == (lmax_in, lmax_out, correlation)
    want = _contraction_by_paths(A, rows, sc.w1, sc.w2, sc.w3, lmax_in, lmax_out, correlation)
    assert float(want.detach().abs().max()) > 0.1
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sc(A, elem), out, rtol=0, atol=0)  # no backend: the torch reference
    with pytest.raises(ValueError, match="needs w2"):
        reference.symmetric_contraction(A, rows, sc.w1, None if correlation > 1 else sc.w1, sc.w3,
                                        lmax_in, lmax_out, correlation)


def test_channelwise_product_matches_einsum():
    from mlip.kernels.reference import clebsch_gordan

    prod = ChannelwiseProduct(1, 2, 2)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    y = torch.randn(3, 2, 9, dtype=torch.float64)
    w = torch.randn(1, prod.n_paths, 2, dtype=torch.float64)
    out = prod(x, y, w)
    want = torch.zeros(3, 2, 9, dtype=torch.float64)
    p = 0
    for l1, l2, l3s in prod.blocks:
        for l3 in l3s:
            cg = clebsch_gordan(l1, l2, l3, torch.float64, torch.device("cpu"))
            z = torch.einsum("nci,ncj,ijk->nck", x[:, :, l1 * l1 : (l1 + 1) ** 2], y[:, :, l2 * l2 : (l2 + 1) ** 2], cg)
            want[:, :, l3 * l3 : (l3 + 1) ** 2] += z * w[:, p, :, None]
            p += 1
    assert torch.allclose(out, want, atol=1e-12)


def test_equivariant_linear_mixes_channels_per_degree():
    lin = EquivariantLinear(3, 2, 2, 3).double()
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    y = lin(x)
    assert y.shape == (4, 2, 16) and torch.equal(y[:, :, 9:], torch.zeros(4, 2, 7, dtype=torch.float64))
    R = _rot(8)
    assert torch.allclose(lin(x @ wigner_matrix(2, R).T), y @ wigner_matrix(3, R).T, atol=1e-12)


@pytest.mark.parametrize("lmax_in,lmax_out", [(1, 0), (2, 2), (1, 3)])
def test_species_linear_uses_each_atoms_element_and_is_o3_equivariant(lmax_in, lmax_out):
    """Row ``i`` equals :class:`EquivariantLinear` with element ``element[i]``'s matrices (zeros above
    ``lmax_in``); O(3)-equivariant (a rotoreflection); weight gradients only for elements present."""
    torch.manual_seed(0)
    lin = SpeciesLinear(4, 3, 5, lmax_in, lmax_out).double()
    element = torch.tensor([2, 0, 2, 3, 0, 2])
    x = torch.randn(6, 3, irreps_dim(lmax_in), dtype=torch.float64)
    y = lin(x, element)
    assert y.shape == (6, 5, irreps_dim(lmax_out))
    for e in range(4):
        ref = EquivariantLinear(3, 5, lmax_in, lmax_out).double()
        with torch.no_grad():
            ref.weight.copy_(lin.weight[e])
        rows = element == e
        assert torch.allclose(y[rows], ref(x[rows]), atol=1e-14, rtol=0)
    R = -_rot(9)
    rotated = lin(x @ wigner_matrix(lmax_in, R).T, element)
    assert torch.allclose(rotated, y @ wigner_matrix(lmax_out, R).T, atol=1e-12)
    y.square().sum().backward()
    assert torch.equal(lin.weight.grad[1], torch.zeros_like(lin.weight.grad[1]))  # element 1 absent
    assert float(lin.weight.grad[2].abs().min()) > 0.0
    assert lin(x[:0], element[:0]).shape == (0, 5, irreps_dim(lmax_out))


def test_envelope_is_smooth_and_zero_at_cutoff():
    env = PolynomialEnvelope(5.0, p=5)
    r = torch.tensor([0.0, 4.999999, 5.0, 5.5], dtype=torch.float64, requires_grad=True)
    u = env(r)
    assert float(u[0].detach()) == 1.0 and float(u[2].detach()) == 0.0 and float(u[3].detach()) == 0.0
    assert abs(float(u[1].detach())) < 1e-14
    (g,) = torch.autograd.grad(u.sum(), r, create_graph=True)
    assert abs(float(g[1].detach())) < 1e-9 and float(g[2].detach()) == 0.0


def test_spline_basis_partition_of_unity_and_c2():
    basis = SplineBasis(5.0, 12)
    r = torch.linspace(0.0, 5.0, 101, dtype=torch.float64)[1:-1]
    # the uniform cubic B-splines sum to one away from the first/last knot interval
    inner = (r > 5.0 / 11) & (r < 5.0 - 5.0 / 11)
    assert torch.allclose(basis(r).sum(1)[inner], torch.ones(int(inner.sum()), dtype=torch.float64), atol=1e-13)
    # second derivative continuous at a knot
    h = 5.0 / 11
    x = torch.tensor([3 * h - 1e-7, 3 * h + 1e-7], dtype=torch.float64, requires_grad=True)
    b = basis(x)
    (d1,) = torch.autograd.grad(b.sum(0)[3], x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    assert abs(float(d2[0] - d2[1])) < 1e-4


def test_radial_weights_vanish_at_cutoff():
    r = torch.tensor([1.0, 4.0, 5.0], dtype=torch.float64)
    env = PolynomialEnvelope(5.0)(r)
    spl = SplineRadial(8, 6).double()(SplineBasis(5.0, 8)(r), env)
    mlp = MLPRadial(8, [16], 6).double()(BesselBasis(5.0, 8)(r), env)
    assert torch.equal(spl[2], torch.zeros(6, dtype=torch.float64))
    assert torch.equal(mlp[2], torch.zeros(6, dtype=torch.float64))


def test_s2_grid_integrates_products_exactly():
    pts, wts = s2_grid(6)
    assert torch.allclose(wts.sum(), torch.tensor(4 * math.pi, dtype=torch.float64))
    assert torch.allclose(pts.norm(dim=1), torch.ones(len(pts), dtype=torch.float64))
    to_grid, from_grid = grid_matrices(3, 6)
    assert torch.allclose(from_grid.T @ to_grid, torch.eye(16, dtype=torch.float64), atol=1e-13)


def test_grid_mixing_parity_exact_and_rotation_error_bounded():
    """Stated bounds (docs/equivariant.md): SiLU grid at the default degree 3*lmax has a relative
    rotation error below 0.1 for lmax <= 3 at full strength; the quadratic grid (the default) is
    exact from degree 3*lmax, and ``GridMixing.exact`` says so."""
    torch.manual_seed(0)
    mix = GridMixing(6, 2, activation="silu").double()
    assert not mix.exact and GridMixing(6, 2).activation == "quadratic" and GridMixing(6, 2).exact
    assert not GridMixing(6, 2, degree=5).exact and GridMixing(6, 2, degree=8).exact
    x = torch.randn(3, 6, 9, dtype=torch.float64)
    P = wigner_matrix(2, -torch.eye(3, dtype=torch.float64))
    assert torch.allclose(mix(x @ P.T), mix(x) @ P.T, atol=1e-13)
    for lmax in (1, 2, 3):
        assert grid_equivariance_error(lmax, 3 * lmax, n_samples=3) < 0.1
        assert grid_equivariance_error(lmax, 3 * lmax, activation="quadratic", n_samples=3) < 1e-12
    # error decreases with resolution
    assert grid_equivariance_error(2, 12, n_samples=3) < grid_equivariance_error(2, 6, n_samples=3)
    with pytest.raises(ValueError, match="grid degree"):
        GridMixing(4, 3, degree=4)


def _grid_mixing_then_mlp(mix: GridMixing, x: torch.Tensor) -> torch.Tensor:
    """The quadratic layer in its defining order: to the grid, ``W2 (W1 f)^2`` per point, back."""
    to_grid, from_grid = mix.matrices(x.dtype, x.device)
    f = torch.matmul(to_grid, x.transpose(1, 2))  # [n, K, C]
    h = torch.matmul(f, mix.w1 / math.sqrt(mix.w1.shape[0]))
    g = torch.matmul(h * h, mix.w2 / math.sqrt(mix.w2.shape[0]))
    return torch.matmul(g.transpose(1, 2), from_grid)


@pytest.mark.parametrize("lmax,hidden,degree", [(1, None, None), (2, 5, None), (3, None, None), (2, None, 4)])
def test_quadratic_grid_mixing_is_a_backend_grid_product_equal_to_the_grid_mlp(lmax, hidden, degree):
    """The quadratic layer computes ``W2^T grid_product(W1^T x, W1^T x)`` through the backend it is
    given (one call, hidden channels as the product's channels), equal to the to-grid / pointwise MLP /
    back order to float64 round-off, also off the exact degree (``degree=4`` for lmax 2) and with
    ``hidden != C``; its gradients agree too. SiLU has no product and never calls the backend."""
    import types

    from mlip.kernels import reference

    torch.manual_seed(0)
    mix = GridMixing(6, lmax, hidden=hidden, degree=degree).double()
    x = torch.randn(5, 6, irreps_dim(lmax), dtype=torch.float64, requires_grad=True)
    calls = []

    def grid_product(a, b, to_grid, from_grid):
        calls.append((tuple(a.shape), tuple(to_grid.shape), tuple(from_grid.shape), a is b))
        return reference.grid_product(a, b, to_grid, from_grid)

    backend = types.SimpleNamespace(grid_product=grid_product)
    got, want = mix(x, backend), _grid_mixing_then_mlp(mix, x)
    assert float(want.detach().abs().max()) > 0.1
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mix(x), got, rtol=0, atol=0)  # no backend: the torch reference
    h, k = mix.w1.shape[1], mix.num_points
    assert calls == [((5, h, irreps_dim(lmax)), (k, irreps_dim(lmax)), (irreps_dim(lmax), k), True)]
    gw = torch.autograd.grad((got ** 2).sum(), [x, mix.w1, mix.w2])
    gr = torch.autograd.grad((want ** 2).sum(), [x, mix.w1, mix.w2])
    for a, b in zip(gw, gr):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    silu = GridMixing(6, lmax, hidden=hidden, activation="silu").double()
    calls.clear()
    assert torch.isfinite(silu(x.detach(), backend)).all() and calls == []


def test_check_charge_spin_rules():
    numbers = torch.tensor([8, 1, 1, 8])  # water (10 e) and an O atom (8 e)
    batch = torch.tensor([0, 0, 0, 1])
    ok = {"numbers": numbers, "batch": batch, "n_graphs": 2}
    check_charge_spin(charge=torch.tensor([0.0, 0.0]), spin=torch.tensor([1.0, 3.0]), **ok)
    check_charge_spin(charge=torch.tensor([1.0, -1.0]), spin=torch.tensor([2.0, 2.0]), **ok)
    with pytest.raises(ValueError, match=r"structure 1 .*charge=nan"):
        check_charge_spin(charge=torch.tensor([0.0, float("nan")]), spin=torch.tensor([1.0, 1.0]), **ok)
    with pytest.raises(ValueError, match=r"structure 0 .*impossible pair, 10 electrons cannot have multiplicity 2"):
        check_charge_spin(charge=torch.tensor([0.0, 0.0]), spin=torch.tensor([2.0, 1.0]), **ok)
    with pytest.raises(ValueError, match=r"structure 1 .*multiplicity 2S\+1 must be an integer >= 1"):
        check_charge_spin(charge=torch.tensor([0.0, 0.0]), spin=torch.tensor([1.0, 0.0]), **ok)
    with pytest.raises(ValueError, match=r"total charge must be an integer"):
        check_charge_spin(charge=torch.tensor([0.5, 0.0]), spin=torch.tensor([1.0, 1.0]), **ok)


def test_e0_table_forms_and_head_index():
    elements = [1, 8]
    assert e0_table(None, ["default"], elements).tolist() == [[0.0, 0.0]]
    assert e0_table({1: -1.0, "8": -2.0}, ["default"], elements).tolist() == [[-1.0, -2.0]]
    assert e0_table({"a": {1: -1.0}, "b": {8: -3.0}}, ["a", "b"], elements).tolist() == [[-1.0, 0.0], [0.0, -3.0]]
    assert e0_table([[1.0, 2.0], [3.0, 4.0]], ["a", "b"], elements).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="3 values for 2 elements"):
        e0_table([1.0, 2.0, 3.0], ["default"], elements)
    assert head_index(["default"], ["mptrj", "x"]).tolist() == [0, 0]
    assert head_index(["a", "b"], ["b", "a"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"structure 1 in the batch has head 'c'"):
        head_index(["a", "b"], ["a", "c"])
    ae = AtomicEnergies({"a": {1: -1.0}, "b": {1: -5.0}}, ["a", "b"], elements, scale=2.0, shift=0.5,
                        shift_by_coordination=False)
    out = ae(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert out.tolist() == [2.0 + 0.5 - 1.0, 2.0 + 0.5 - 5.0]
    # weighted shift: none without bonds, 1 - e^(-3n) of it with n (smooth) bonds
    ae = AtomicEnergies({"a": {1: -1.0}, "b": {1: -5.0}}, ["a", "b"], elements, scale=2.0, shift=0.5)
    out = ae(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0, 0]), torch.tensor([0, 1]),
             torch.tensor([0.0, 3.0], dtype=torch.float64))
    assert out.tolist() == pytest.approx([-1.0, 2.0 + 0.5 * (1 - math.exp(-9.0)) - 5.0], abs=1e-15)
    with pytest.raises(ValueError, match="bond count"):
        ae(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0]))


def test_bessel_basis_is_orthonormal_on_the_ball():
    """``∫_0^r_max b_n(r) b_m(r) r^2 dr = δ_nm`` (the radial Bessel basis of DimeNet/NequIP)."""
    r_max = 4.0
    x, w = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(200))
    r = 0.5 * r_max * (x + 1.0)
    b = BesselBasis(r_max, 6)(r)  # [200, 6]
    gram = (b * (w * 0.5 * r_max * r * r)[:, None]).T @ b
    assert torch.allclose(gram, torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_envelope_second_derivative_vanishes_at_cutoff():
    env = PolynomialEnvelope(5.0, p=5)
    r = torch.tensor([5.0 - 1e-9, 2.5], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(env(r).sum(), r, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), r)
    assert abs(float(g2[0])) < 1e-6 and abs(float(g2[1])) > 1e-2


def test_conv_tp_messages_flow_from_sender_to_receiver():
    """One directed edge 0 -> 1: atom 1 receives ``w * CG(x_0 ⊗ Y(r̂))``, atom 0 receives nothing."""
    from mlip.kernels.reference import clebsch_gordan

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    vec = torch.tensor([[0.3, -1.1, 0.7]], dtype=torch.float64)
    Y = spherical_harmonics(2, vec)
    paths = tp_paths(1, 2, 1)
    w = torch.randn(1, len(paths), 3, dtype=torch.float64, generator=gen)
    out = conv_tp(x, Y, w, torch.tensor([0]), torch.tensor([1]), 2, 1, 2, 1)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    k = 0
    for p, (l1, l2, l3) in enumerate(paths):
        cg = clebsch_gordan(l1, l2, l3, torch.float64, torch.device("cpu"))
        want = torch.einsum("ci,j,ijk->ck", x[0, :, l1 * l1 : (l1 + 1) ** 2], Y[0, l2 * l2 : (l2 + 1) ** 2], cg) * w[0, p, :, None]
        assert torch.allclose(out[1, :, k : k + 2 * l3 + 1], want, atol=1e-14)
        k += 2 * l3 + 1


@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_grid_size_is_tied_to_lmax(lmax):
    """Default grid degree ``3 lmax``: Gauss-Legendre ``3 lmax // 2 + 1`` x even ``>= 3 lmax + 1`` in φ."""
    from mlip.nn.s2grid import grid_size

    mix = GridMixing(4, lmax)
    n_theta, n_phi = grid_size(3 * lmax)
    assert mix.degree == 3 * lmax and mix.num_points == n_theta * n_phi
    assert n_theta == 3 * lmax // 2 + 1 and n_phi % 2 == 0 and n_phi >= 3 * lmax + 1


def test_bond_count_counts_covalent_bonds_smoothly():
    """One per bond up to 1.3 times the covalent radii sum, none beyond twice it, C² in between (and
    zero where the model's envelope is): an H bonded to O counts 1, the same pair pulled apart 0."""
    from ase.data import covalent_radii

    from mlip.nn.readout import BOND_RANGE, bond_count

    s = float(covalent_radii[1] + covalent_radii[8])
    inner, outer = BOND_RANGE
    r = torch.tensor([s, inner * s, 0.5 * (inner + outer) * s, outer * s, 2.5 * s], dtype=torch.float64,
                     requires_grad=True)
    z_h, z_o = torch.ones(5, dtype=torch.long), torch.full((5,), 8, dtype=torch.long)
    n = bond_count(r, torch.ones(5, dtype=torch.float64), z_o, z_h, torch.arange(5), 5)
    assert n.tolist()[:2] == [1.0, 1.0] and n.tolist()[3:] == [0.0, 0.0] and 0.0 < n[2] < 1.0
    (grad,) = torch.autograd.grad(n.sum(), r)
    assert grad[1] == 0.0 and grad[3] == 0.0 and grad[2] < 0.0  # no kink where the smoothstep starts/ends
    envelope = torch.tensor([0.5, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert bond_count(r, envelope, z_o, z_h, torch.arange(5), 5)[:2].tolist() == [0.5, 0.0]
