"""Fused spherical-grid (Gaunt) product: to the grid, multiply, back, in one kernel.

The kernel computes the general bilinear "triple product"

    out[r, k] = sum_g M[k, g] (sum_d A[g, d] u[r, d]) (sum_d B[g, d] v[r, d])

one block of rows ``r`` (= node x channel) per program, with the grid values kept in
registers (never written to memory). ``grid_product(a, b, T, F)`` is ``trip(a, b, T, T, F)``,
and the family is closed under differentiation,

    d/du = trip(g, v, M^T, B, A^T),    d/dv = trip(g, u, M^T, A, B^T),

so the backward (and every higher derivative) runs on the same kernel. Gradients for the
(usually constant) grid matrices are plain torch ops, which are differentiable as well.
"""
from __future__ import annotations

import functools

import torch
import triton.language as tl

from mlip.kernels.triton.conv import _autotune_cache_kw, _interpreting


def _trip_kernel(u_ptr, v_ptr, a_ptr, b_ptr, m_ptr, out_ptr, R, G,
                 DU: tl.constexpr, DV: tl.constexpr, DO: tl.constexpr, DO_P: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    cols = tl.arange(0, DO_P)
    dt = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_R, DO_P], dtype=dt)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask_g = gs < G
        fa = tl.zeros([BLOCK_R, BLOCK_G], dtype=dt)
        for d in tl.static_range(DU):
            ud = tl.load(u_ptr + rows * DU + d, mask=mask_r, other=0.0)
            ad = tl.load(a_ptr + gs * DU + d, mask=mask_g, other=0.0)
            fa += ud[:, None] * ad[None, :]
        fb = tl.zeros([BLOCK_R, BLOCK_G], dtype=dt)
        for d in tl.static_range(DV):
            vd = tl.load(v_ptr + rows * DV + d, mask=mask_r, other=0.0)
            bd = tl.load(b_ptr + gs * DV + d, mask=mask_g, other=0.0)
            fb += vd[:, None] * bd[None, :]
        h = fa * fb  # [BLOCK_R, BLOCK_G]: the product on the grid, never stored
        for k in tl.static_range(DO):
            mk = tl.load(m_ptr + k * G + gs, mask=mask_g, other=0.0)
            s = tl.sum(h * mk[None, :], axis=1)  # [BLOCK_R]
            acc += tl.where(cols[None, :] == k, s[:, None], 0.0)
    tl.store(out_ptr + rows[:, None] * DO + cols[None, :], acc, mask=mask_r[:, None] & (cols[None, :] < DO))




@functools.cache
def _kernel(interpret: bool):
    import triton

    jitted = triton.jit(_trip_kernel)
    if not interpret:
        configs = [triton.Config({"BLOCK_R": br}, num_warps=nw) for br, nw in ((16, 4), (32, 4), (64, 4), (64, 8))]
        jitted = triton.autotune(configs=configs, key=["G", "DU", "DV", "DO"], **_autotune_cache_kw())(jitted)
    return jitted


def launch_trip(u: torch.Tensor, v: torch.Tensor, A: torch.Tensor, B: torch.Tensor, M: torch.Tensor,
                wrap=None) -> torch.Tensor:
    """``M ((A u) * (B v))`` row by row: ``u [R, DU], v [R, DV], A [G, DU], B [G, DV], M [DO, G] -> [R, DO]``."""
    import triton

    interpret = _interpreting()
    k = _kernel(interpret)
    k = wrap(k) if wrap is not None else k
    R, G, DO = u.shape[0], A.shape[0], M.shape[0]
    out = torch.empty((R, DO), dtype=u.dtype, device=u.device)
    if R == 0 or DO == 0:
        return out
    block_g = min(triton.next_power_of_2(max(G, 1)), 64)
    meta = {"BLOCK_R": 4} if interpret else {}
    grid = lambda m: (triton.cdiv(R, m["BLOCK_R"]),)
    k[grid](u, v, A, B, M, out, R, G, DU=u.shape[1], DV=v.shape[1], DO=DO, DO_P=triton.next_power_of_2(DO),
            BLOCK_G=block_g, **meta)
    return out


def _register():
    try:
        from torch.library import triton_op, wrap_triton
    except ImportError:  # torch < 2.6
        return launch_trip

    @triton_op("mlip::grid_trip", mutates_args=())
    def grid_trip(u: torch.Tensor, v: torch.Tensor, A: torch.Tensor, B: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        return launch_trip(u, v, A, B, M, wrap=wrap_triton)

    return grid_trip


_OP_TRIP = _register()


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class Trip(torch.autograd.Function):
    """``M ((A u) * (B v))`` per row, differentiable to any order (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, v, A, B, M):  # type: ignore[override]
        ctx.save_for_backward(u, v, A, B, M)
        return _OP_TRIP(u, v, A, B, M)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        u, v, A, B, M = ctx.saved_tensors
        g = _c(g)
        need = ctx.needs_input_grad
        Mt = _c(M.t())
        gu = Trip.apply(g, v, Mt, B, _c(A.t())) if need[0] else None
        gv = Trip.apply(g, u, Mt, A, _c(B.t())) if need[1] else None
        gA = gB = gM = None
        if need[2] or need[3] or need[4]:
            hg = g @ M  # [R, G]
            fa, fb = u @ A.t(), v @ B.t()  # [R, G]
            if need[2]:
                gA = (hg * fb).t() @ u
            if need[3]:
                gB = (hg * fa).t() @ v
            if need[4]:
                gM = g.t() @ (fa * fb)
        return gu, gv, gA, gB, gM


def grid_product_autograd(a: torch.Tensor, b: torch.Tensor, to_grid: torch.Tensor,
                          from_grid: torch.Tensor) -> torch.Tensor:
    """``[n, C, D] x [n, C, D] -> [n, C, D_out]`` on the fused kernel (see ``reference_grid.grid_product``)."""
    n, c, d = a.shape
    out = Trip.apply(_c(a.reshape(n * c, d)), _c(b.reshape(n * c, d)), _c(to_grid), _c(to_grid), _c(from_grid))
    return out.reshape(n, c, from_grid.shape[0])


def compile_for_target(d_in: int, d_out: int, n_grid: int, dtype: torch.dtype = torch.float32, arch: int = 90,
                       block_r: int = 32, num_warps: int = 4):
    """Compile the grid kernel for ``sm_<arch>`` without a GPU (see ``conv.compile_for_target``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    p = "*" + {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    sig = {"u_ptr": p, "v_ptr": p, "a_ptr": p, "b_ptr": p, "m_ptr": p, "out_ptr": p, "R": "i32", "G": "i32",
           "DU": "constexpr", "DV": "constexpr", "DO": "constexpr", "DO_P": "constexpr", "BLOCK_R": "constexpr",
           "BLOCK_G": "constexpr"}
    values = {"DU": d_in, "DV": d_in, "DO": d_out, "DO_P": triton.next_power_of_2(d_out), "BLOCK_R": block_r,
              "BLOCK_G": min(triton.next_power_of_2(n_grid), 64)}
    names = list(sig)
    consts = {(names.index(k),): v for k, v in values.items()}
    src = ASTSource(fn=JITFunction(_trip_kernel), signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
