"""Autograd for the fused convolution: every derivative, to any order, is one of four kernels.

Let ``T(x, Y, w, g)`` be the multilinear form of :mod:`mlip.kernels.triton.conv` and

    F(x, Y, w) = dT/dg  (the convolution),   Bx(g, Y, w) = dT/dx,
    BY(x, w, g) = dT/dY,                      Bw(x, Y, g) = dT/dw.

``T`` is linear in each argument, so for a cotangent ``v`` of any of these ops,
``<v, dT/da(...)>`` is ``T`` with ``a`` replaced by ``v``, and its derivatives are again
``F``, ``Bx``, ``BY``, ``Bw`` with one argument replaced by ``v``:

    backward of F  with cotangent g:   x̄ = Bx(g, Y, w),  Ȳ = BY(x, w, g),  w̄ = Bw(x, Y, g)
    backward of Bx with cotangent v:   ḡ = F(v, Y, w),   Ȳ = BY(v, w, g),  w̄ = Bw(v, Y, g)
    backward of (BY, Bw) with (vY, vw):
        x̄ = Bx(g, vY, w) + Bx(g, Y, vw),   ḡ = F(x, vY, w) + F(x, Y, vw),
        Ȳ = BY(x, vw, g),                   w̄ = Bw(x, vY, g)

Each backward calls the ``autograd.Function`` s themselves, so the backward is differentiable
and double backward (training on forces) runs on the same fused kernels. This is the
"proven composition": it is exact by multilinearity, and ``gradgradcheck`` checks it.
"""
from __future__ import annotations

import torch

from mlip.kernels.triton import conv

_NS = "mlip"


def _register_ops():
    """``torch.library.triton_op`` wrappers (``torch.compile`` sees the allocations); plain calls otherwise."""
    try:
        from torch.library import triton_op, wrap_triton
    except ImportError:  # torch < 2.6: launch directly
        fwd = lambda x, y, w, s, p, r, a, b, c: conv.launch_fwd(x, y, w, s, p, r, (a, b, c))
        bx = lambda g, y, w, r, p, rp, a, b, c: conv.launch_bwd_x(g, y, w, r, p, rp, (a, b, c))
        be = lambda x, y, w, g, s, r, a, b, c, cy, cw: conv.launch_bwd_edge(
            x, y, w, g, s, r, (a, b, c), cy, cw)
        return fwd, bx, be

    @triton_op(f"{_NS}::conv_tp_fwd", mutates_args=())
    def conv_tp_fwd(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, sender: torch.Tensor, perm_rcv: torch.Tensor,
                    rowptr_rcv: torch.Tensor, lmax_in: int, lmax_sh: int, lmax_out: int) -> torch.Tensor:
        return conv.launch_fwd(x, y, w, sender, perm_rcv, rowptr_rcv, (lmax_in, lmax_sh, lmax_out), wrap=wrap_triton)

    @triton_op(f"{_NS}::conv_tp_bwd_x", mutates_args=())
    def conv_tp_bwd_x(g: torch.Tensor, y: torch.Tensor, w: torch.Tensor, receiver: torch.Tensor,
                      perm_snd: torch.Tensor, rowptr_snd: torch.Tensor, lmax_in: int, lmax_sh: int,
                      lmax_out: int) -> torch.Tensor:
        return conv.launch_bwd_x(g, y, w, receiver, perm_snd, rowptr_snd, (lmax_in, lmax_sh, lmax_out),
                                 wrap=wrap_triton)

    @triton_op(f"{_NS}::conv_tp_bwd_edge", mutates_args=())
    def conv_tp_bwd_edge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, g: torch.Tensor, sender: torch.Tensor,
                         receiver: torch.Tensor, lmax_in: int, lmax_sh: int, lmax_out: int, compute_y: bool,
                         compute_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return conv.launch_bwd_edge(x, y, w, g, sender, receiver, (lmax_in, lmax_sh, lmax_out), compute_y,
                                    compute_w, wrap=wrap_triton)

    return conv_tp_fwd, conv_tp_bwd_x, conv_tp_bwd_edge


_OP_FWD, _OP_BWD_X, _OP_BWD_EDGE = _register_ops()


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class ConvFwd(torch.autograd.Function):
    """``F(x, Y, w)``: the fused convolution (``conv_tp``)."""

    @staticmethod
    def forward(ctx, x, y, w, graph: conv.CSRGraph, lmax: tuple[int, int, int]):  # type: ignore[override]
        ctx.graph, ctx.lmax = graph, lmax
        ctx.save_for_backward(x, y, w)
        return _OP_FWD(x, y, w, graph.sender, graph.perm_rcv, graph.rowptr_rcv, *lmax)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, y, w = ctx.saved_tensors
        graph, lmax = ctx.graph, ctx.lmax
        g = _c(g)
        gx = ConvBwdX.apply(g, y, w, graph, lmax) if ctx.needs_input_grad[0] else None
        gy = gw = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gy, gw = ConvBwdEdge.apply(x, y, w, g, graph, lmax, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gx, (gy if ctx.needs_input_grad[1] else None), (gw if ctx.needs_input_grad[2] else None), None, None


class ConvBwdX(torch.autograd.Function):
    """``Bx(g, Y, w) = dT/dx``: the convolution over the transposed graph."""

    @staticmethod
    def forward(ctx, g, y, w, graph: conv.CSRGraph, lmax: tuple[int, int, int]):  # type: ignore[override]
        ctx.graph, ctx.lmax = graph, lmax
        ctx.save_for_backward(g, y, w)
        return _OP_BWD_X(g, y, w, graph.receiver, graph.perm_snd, graph.rowptr_snd, *lmax)

    @staticmethod
    def backward(ctx, v):  # type: ignore[override]
        g, y, w = ctx.saved_tensors
        graph, lmax = ctx.graph, ctx.lmax
        v = _c(v)
        gg = ConvFwd.apply(v, y, w, graph, lmax) if ctx.needs_input_grad[0] else None
        gy = gw = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gy, gw = ConvBwdEdge.apply(v, y, w, g, graph, lmax, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gg, (gy if ctx.needs_input_grad[1] else None), (gw if ctx.needs_input_grad[2] else None), None, None


class ConvBwdEdge(torch.autograd.Function):
    """``(BY(x, w, g), Bw(x, Y, g))``: per-edge gradients; an output not asked for is an empty ``[0]``."""

    @staticmethod
    def forward(ctx, x, y, w, g, graph: conv.CSRGraph, lmax: tuple[int, int, int], compute_y: bool,
                compute_w: bool):  # type: ignore[override]
        ctx.graph, ctx.lmax, ctx.flags = graph, lmax, (bool(compute_y), bool(compute_w))
        ctx.save_for_backward(x, y, w, g)
        ctx.set_materialize_grads(False)
        return _OP_BWD_EDGE(x, y, w, g, graph.sender, graph.receiver, *lmax, bool(compute_y), bool(compute_w))

    @staticmethod
    def backward(ctx, vy, vw):  # type: ignore[override]
        x, y, w, g = ctx.saved_tensors
        graph, lmax = ctx.graph, ctx.lmax
        vy = _c(vy) if ctx.flags[0] and vy is not None else None
        vw = _c(vw) if ctx.flags[1] and vw is not None else None
        need = ctx.needs_input_grad
        gx = gy = gw = gg = None
        if need[0]:
            if vy is not None:
                gx = _add(gx, ConvBwdX.apply(g, vy, w, graph, lmax))
            if vw is not None:
                gx = _add(gx, ConvBwdX.apply(g, y, vw, graph, lmax))
        if need[3]:
            if vy is not None:
                gg = _add(gg, ConvFwd.apply(x, vy, w, graph, lmax))
            if vw is not None:
                gg = _add(gg, ConvFwd.apply(x, y, vw, graph, lmax))
        if need[1] and vw is not None:
            gy = ConvBwdEdge.apply(x, y, vw, g, graph, lmax, True, False)[0]
        if need[2] and vy is not None:
            gw = ConvBwdEdge.apply(x, vy, w, g, graph, lmax, False, True)[1]
        return gx, gy, gw, gg, None, None, None, None


def conv_tp_autograd(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, graph: conv.CSRGraph,
                     lmax: tuple[int, int, int]) -> torch.Tensor:
    """Differentiable (to any order) fused convolution on a prepared :class:`~conv.CSRGraph`."""
    return ConvFwd.apply(_c(x), _c(y), _c(w), graph, lmax)
