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
from mlip.kernels.triton.codegen import KERNELS

_NS = "mlip"


def _register(name: str):
    """The launch of generated kernel ``name`` as a ``torch.library.triton_op`` (``torch.compile`` sees
    its allocations), named and typed from the kernel's one argument list (``KERNELS[name]``); a plain
    call where ``triton_op`` does not exist (torch < 2.6). Called as ``op(*tensors, lmax_in, lmax_sh,
    lmax_out, *flags)``; returns one tensor, or a tuple for the edge kernels."""
    spec = KERNELS[name]
    n_in = len(spec.inputs)

    def run(*args, wrap=None):
        outs = conv.launch(name, args[:n_in], tuple(args[n_in:n_in + 3]), args[n_in + 3:], wrap=wrap)
        return outs[0] if len(outs) == 1 else outs

    try:
        from torch.library import triton_op, wrap_triton
    except ImportError:  # torch < 2.6: launch directly
        return run

    def op(*args):
        return run(*args, wrap=wrap_triton)

    op.__signature__ = spec.op_signature()  # the op's schema is inferred from it
    op.__name__ = spec.op_name
    return triton_op(f"{_NS}::{spec.op_name}", op, mutates_args=())


#: one op per generated kernel, by kernel name
_OPS = {name: _register(name) for name in KERNELS}
_OP_FWD, _OP_BWD_X, _OP_BWD_EDGE = _OPS["conv_fwd"], _OPS["conv_bwd_x"], _OPS["conv_bwd_edge"]
_OP_S_FWD, _OP_S_BWD_X, _OP_S_BWD_EDGE = _OPS["spline_fwd"], _OPS["spline_bwd_x"], _OPS["spline_bwd_edge"]


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


# --------------------------------------------------------------------------------------------
# convolution with the radial spline folded in: T(x, Y, v, t, g), t the [K, P, C] table
# --------------------------------------------------------------------------------------------
# The weights w[e] = sum_j v[e, j] t[idx[e] + j] are linear in v and in t, so the form is
# multilinear in five arguments and the argument above applies unchanged: with
#   S(x, Y, v, t) = dT/dg,  Sx(g, Y, v, t) = dT/dx,  (SY, Sv, St)(x, Y, v, t, g) = (dT/dY, dT/dv, dT/dt),
# backward of S  with g:          x̄ = Sx(g, Y, v, t);  (Ȳ, v̄, t̄) = SE(x, Y, v, t, g)
# backward of Sx with u:          ḡ = S(u, Y, v, t);   (Ȳ, v̄, t̄) = SE(u, Y, v, t, g)
# backward of SE with (aY, av, at):
#   x̄ = Sx(g, aY, v, t) + Sx(g, Y, av, t) + Sx(g, Y, v, at),  ḡ = S(x, aY, v, t) + S(x, Y, av, t) + S(x, Y, v, at)
#   Ȳ = SY(x, Y, av, t, g) + SY(x, Y, v, at, g),  v̄ = Sv(x, aY, v, t, g) + Sv(x, Y, v, at, g),
#   t̄ = St(x, aY, v, t, g) + St(x, Y, av, t, g)
class SplineFwd(torch.autograd.Function):
    """``S(x, Y, v, t)``: the fused convolution with spline radial weights (``conv_tp_spline``)."""

    @staticmethod
    def forward(ctx, x, y, v, t, idx, graph: conv.CSRGraph, lmax: tuple[int, int, int]):  # type: ignore[override]
        ctx.graph, ctx.lmax = graph, lmax
        ctx.save_for_backward(x, y, v, t, idx)
        return _OP_S_FWD(x, y, v, idx, t, graph.sender, graph.perm_rcv, graph.rowptr_rcv, *lmax)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, y, v, t, idx = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = _c(g)
        gx = SplineBwdX.apply(g, y, v, t, idx, ctx.graph, ctx.lmax) if need[0] else None
        gy = gv = gt = None
        if need[1] or need[2] or need[3]:
            gy, gv, gt = SplineBwdEdge.apply(x, y, v, t, g, idx, ctx.graph, ctx.lmax, need[1], need[2], need[3])
        return (gx, gy if need[1] else None, gv if need[2] else None, gt if need[3] else None, None, None, None)


class SplineBwdX(torch.autograd.Function):
    """``Sx(g, Y, v, t) = dT/dx``: the spline convolution over the transposed graph."""

    @staticmethod
    def forward(ctx, g, y, v, t, idx, graph: conv.CSRGraph, lmax: tuple[int, int, int]):  # type: ignore[override]
        ctx.graph, ctx.lmax = graph, lmax
        ctx.save_for_backward(g, y, v, t, idx)
        return _OP_S_BWD_X(g, y, v, idx, t, graph.receiver, graph.perm_snd, graph.rowptr_snd, *lmax)

    @staticmethod
    def backward(ctx, u):  # type: ignore[override]
        g, y, v, t, idx = ctx.saved_tensors
        need = ctx.needs_input_grad
        u = _c(u)
        gg = SplineFwd.apply(u, y, v, t, idx, ctx.graph, ctx.lmax) if need[0] else None
        gy = gv = gt = None
        if need[1] or need[2] or need[3]:
            gy, gv, gt = SplineBwdEdge.apply(u, y, v, t, g, idx, ctx.graph, ctx.lmax, need[1], need[2], need[3])
        return (gg, gy if need[1] else None, gv if need[2] else None, gt if need[3] else None, None, None, None)


class SplineBwdEdge(torch.autograd.Function):
    """``(SY, Sv, St)(x, Y, v, t, g)``: gradients of the edge inputs and the table; one not asked for is ``[0]``."""

    @staticmethod
    def forward(ctx, x, y, v, t, g, idx, graph: conv.CSRGraph, lmax: tuple[int, int, int], compute_y: bool,
                compute_v: bool, compute_t: bool):  # type: ignore[override]
        ctx.graph, ctx.lmax = graph, lmax
        ctx.flags = (bool(compute_y), bool(compute_v), bool(compute_t))
        ctx.save_for_backward(x, y, v, t, g, idx)
        ctx.set_materialize_grads(False)
        return _OP_S_BWD_EDGE(x, y, v, idx, t, g, graph.sender, graph.receiver, *lmax, *ctx.flags)

    @staticmethod
    def backward(ctx, a_y, a_v, a_t):  # type: ignore[override]
        x, y, v, t, g, idx = ctx.saved_tensors
        graph, lmax = ctx.graph, ctx.lmax
        a_y = _c(a_y) if ctx.flags[0] and a_y is not None else None
        a_v = _c(a_v) if ctx.flags[1] and a_v is not None else None
        a_t = _c(a_t) if ctx.flags[2] and a_t is not None else None
        need = ctx.needs_input_grad
        gx = gy = gv = gt = gg = None
        # <a_i, S_i> is T with argument i of (Y, v, t) replaced by a_i: its derivatives are the ops
        # with that replacement, and its derivative in argument i itself is zero (T is linear in it)
        for i, a in enumerate((a_y, a_v, a_t)):
            if a is None:
                continue
            args = [y, v, t]
            args[i] = a
            ys, vs, ts = args
            if need[0]:
                gx = _add(gx, SplineBwdX.apply(g, ys, vs, ts, idx, graph, lmax))
            if need[4]:
                gg = _add(gg, SplineFwd.apply(x, ys, vs, ts, idx, graph, lmax))
            want = tuple(bool(need[1 + j]) and j != i for j in range(3))
            if any(want):
                dy, dv, dt = SplineBwdEdge.apply(x, ys, vs, ts, g, idx, graph, lmax, *want)
                gy = _add(gy, dy) if want[0] else gy
                gv = _add(gv, dv) if want[1] else gv
                gt = _add(gt, dt) if want[2] else gt
        return gx, gy, gv, gt, gg, None, None, None, None, None, None


def conv_tp_spline_autograd(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, t: torch.Tensor,
                            graph: conv.CSRGraph, lmax: tuple[int, int, int]) -> torch.Tensor:
    """Differentiable (to any order) fused spline convolution on a prepared :class:`~conv.CSRGraph`."""
    return SplineFwd.apply(_c(x), _c(y), _c(v), _c(t), _c(idx), graph, lmax)
