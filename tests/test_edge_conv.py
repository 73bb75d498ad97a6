"""The torch backend's chunked edge convolution (mlip.kernels.edge_conv) against the literal per-path
formula of the specification: forward, first and second derivatives, any chunk size, no edges."""
from __future__ import annotations

import pytest
import torch

from mlip.kernels import reference as R
from mlip.kernels.edge_conv import _ChunkedConvTP, chunk_edges


def _inputs(n_nodes: int, n_edges: int, channels: int, lmax_in: int, lmax_sh: int, lmax_out: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_paths = len(R.tp_paths(lmax_in, lmax_sh, lmax_out))
    x = torch.randn(n_nodes, channels, (lmax_in + 1) ** 2, generator=gen, dtype=torch.float64)
    y = torch.randn(n_edges, (lmax_sh + 1) ** 2, generator=gen, dtype=torch.float64)
    w = torch.randn(n_edges, n_paths, channels, generator=gen, dtype=torch.float64)
    sender = torch.randint(0, n_nodes, (n_edges,), generator=gen)
    receiver = torch.randint(0, n_nodes, (n_edges,), generator=gen)
    return x, y, w, sender, receiver


def _chunked(x, y, w, sender, receiver, n_nodes, lmax_in, lmax_sh, lmax_out, chunk):
    u, one_hot = R._dense_coupling(lmax_in, lmax_sh, lmax_out, x.dtype, x.device)
    return _ChunkedConvTP.apply(x, y, w, sender, receiver, u, one_hot, n_nodes, chunk)


@pytest.mark.parametrize("lmax_in,lmax_sh,lmax_out", [(0, 3, 3), (1, 3, 3), (2, 2, 2)])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_convolution_is_the_per_path_formula(lmax_in, lmax_sh, lmax_out, chunk):
    x, y, w, s, r = _inputs(6, 29, 3, lmax_in, lmax_sh, lmax_out)
    want = R.conv_tp_per_path(x, y, w, s, r, 6, lmax_in, lmax_sh, lmax_out)
    got = _chunked(x, y, w, s, r, 6, lmax_in, lmax_sh, lmax_out, chunk)
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.conv_tp(x, y, w, s, r, 6, lmax_in, lmax_sh, lmax_out), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [4, 100])
@pytest.mark.parametrize("channel_major", [False, True])
def test_chunked_convolution_first_and_second_derivatives(chunk, channel_major):
    """Also with the radial weights in the ``[E, C, P]`` memory the model passes (mlip.nn.radial.as_groups),
    whose gradient the backward writes in that layout."""
    x, y, w, s, r = _inputs(5, 17, 2, 1, 2, 2, seed=1)
    args = [t.clone().requires_grad_() for t in (x, y, w)]
    if channel_major:
        args[2] = w.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        assert not args[2].is_contiguous() and args[2].transpose(1, 2).is_contiguous()

    def f(a, b, c):
        return _chunked(a, b, c, s, r, 5, 1, 2, 2, chunk)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)
    # and equal to the formula's gradients
    ref = [t.clone().requires_grad_() for t in (x, y, w)]
    g_ref = torch.autograd.grad(R.conv_tp_per_path(*ref, s, r, 5, 1, 2, 2).pow(2).sum(), ref)
    g = torch.autograd.grad(f(*args).pow(2).sum(), args)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_edges_gives_zeros_and_zero_gradients():
    x, y, w, s, r = _inputs(3, 0, 2, 1, 1, 1)
    args = [t.clone().requires_grad_() for t in (x, y, w)]
    out = _chunked(*args, s, r, 3, 1, 1, 1, 8)
    assert out.shape == (3, 2, R.tp_out_dim(1, 1, 1)) and not out.any()
    grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
    assert all(g is not None and not g.any() for g in grads)


def test_chunks_are_cache_sized_on_the_cpu_and_large_on_a_gpu():
    from mlip.kernels.edge_conv import CPU_CHUNK_BYTES

    row = 128 * 40 * 4  # MACE-medium message row, float32
    assert 16 <= chunk_edges(10**6, row, torch.device("cpu")) <= CPU_CHUNK_BYTES // row < 10**4
    assert chunk_edges(10**6, row, torch.device("cuda")) > 10**4
    assert chunk_edges(10, row, torch.device("cpu")) == 16  # at least 16 (the loop ends at n_edges)


def test_conv_tp_runs_chunked_above_the_dense_size_and_gives_the_same(monkeypatch):
    import mlip.kernels.edge_conv as edge_conv

    x, y, w, s, r = _inputs(6, 29, 3, 1, 3, 3, seed=2)
    dense = R.conv_tp(x, y, w, s, r, 6, 1, 3, 3)
    calls = []
    real = _ChunkedConvTP.apply
    monkeypatch.setattr(edge_conv, "DENSE_BYTES", 0)
    monkeypatch.setattr(_ChunkedConvTP, "apply", lambda *a: (calls.append(a[-1]), real(*a))[1])
    chunked = R.conv_tp(x, y, w, s, r, 6, 1, 3, 3)
    assert calls  # the chunked path ran
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)


def test_no_edges_through_the_dense_path():
    x, y, w, s, r = _inputs(3, 0, 2, 1, 2, 2)
    out = R.conv_tp(x.requires_grad_(), y, w, s, r, 3, 1, 2, 2)
    assert out.shape == (3, 2, R.tp_out_dim(1, 2, 2)) and not out.any()
    (g,) = torch.autograd.grad(out.sum(), x)
    assert not g.any()
