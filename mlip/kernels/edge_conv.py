"""The torch backend's edge convolution, run over cache-sized chunks of edges with a hand-written backward.

Same result as the dense formulation of :func:`mlip.kernels.reference.conv_tp`, but the per-edge
tensors ``[n_edges, C, D_out]`` (messages, expanded radial weights), which dominate both time and
memory at MACE-medium sizes, never exist for all edges at once: each chunk's are made, used and
dropped while they are still in the cache, and nothing per-edge of that size is kept for the
backward, which recomputes them chunk by chunk. The backward is written in differentiable torch
ops, so a second differentiation (training on forces) works as for any autograd graph.
"""
from __future__ import annotations

import torch

#: bytes of one chunk's ``[chunk, C, D_out]`` message on the CPU: large enough that the dozen torch ops
#: per chunk cost little next to their work (at L2-cache size, 1/16 of this, they dominate the small
#: preset's call), small enough that a chunk's per-edge tensors stay in the last-level cache
CPU_CHUNK_BYTES = 1 << 22
#: on a GPU, chunks only bound memory: launch overhead favours few, large chunks
GPU_CHUNK_BYTES = 1 << 28
#: below this many bytes of messages ``[n_edges, C, D_out]`` plain autograd over all edges is faster
#: (training batches of small molecules: no per-chunk overhead, no recomputation in the backward)
DENSE_BYTES = 1 << 24


def chunk_edges(n_edges: int, row_bytes: int, device: torch.device) -> int:
    """Edges per chunk for per-edge rows of ``row_bytes`` bytes (at least 16)."""
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(16, min(n_edges, budget // max(row_bytes, 1)))


def _chunk_messages(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, u: torch.Tensor, one_hot: torch.Tensor,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw products, expanded radial weights and coupling matrices of one chunk.

    ``out``: two ``[c, C, D]`` buffers that receive ``raw`` and ``w_exp`` (not recorded by autograd).

    Shapes:
        x [c, C, d_in] gathered sender features; y [c, d_sh] harmonics; w [c, P, C]; u [d_sh, d_in * D];
        one_hot [P, D] -> raw [c, C, D], w_exp [c, C, D], coupling [c, d_in, D].
    """
    c, n_ch, n_paths, d_out = x.shape[0], x.shape[1], w.shape[1], one_hot.shape[1]
    coupling = (y @ u).view(c, x.shape[2], d_out)
    # one [c*C, P] @ [P, D] product: a transposed 3-d operand would make matmul a slow batched one
    w_flat = w.transpose(1, 2).reshape(c * n_ch, n_paths)
    if out is None:
        return torch.bmm(x, coupling), (w_flat @ one_hot).view(c, n_ch, d_out), coupling
    raw, w_exp = out
    torch.bmm(x, coupling, out=raw)
    torch.mm(w_flat, one_hot, out=w_exp.view(c * n_ch, d_out))
    return raw, w_exp, coupling


def _workspace(n: int, chunk: int, like: torch.Tensor, d_out: int) -> list[torch.Tensor]:
    """``n`` buffers ``[chunk, C, D]`` that every chunk's per-edge tensors reuse (views of their first rows):
    a fresh tensor of that size per product costs about as much in page faults as the product itself."""
    return [like.new_empty((chunk, like.shape[1], d_out)) for _ in range(n)]


class _ChunkedConvTP(torch.autograd.Function):
    """``out[i] = sum_{e: receiver[e]=i} w_e * (x[sender[e]] @ (Y_e @ U))`` over chunks of edges."""

    @staticmethod
    def forward(ctx, node_feats, edge_attrs, edge_weights, sender, receiver, u, one_hot, n_nodes, chunk):  # noqa: ANN001, ANN205
        out = node_feats.new_zeros((n_nodes, node_feats.shape[1], one_hot.shape[1]))
        bufs = _workspace(2, min(chunk, sender.shape[0]), node_feats, one_hot.shape[1])
        for a in range(0, sender.shape[0], chunk):
            s = slice(a, a + chunk)
            x = node_feats.index_select(0, sender[s])
            raw, w_exp, _ = _chunk_messages(x, edge_attrs[s], edge_weights[s], u, one_hot,
                                            out=tuple(b[: x.shape[0]] for b in bufs))
            out.index_add_(0, receiver[s], raw.mul_(w_exp))
        ctx.save_for_backward(node_feats, edge_attrs, edge_weights, sender, receiver, u, one_hot)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        node_feats, edge_attrs, edge_weights, sender, receiver, u, one_hot = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        # without create_graph nothing here is recorded: products may then overwrite their inputs and
        # reuse one workspace for every chunk (no fresh [c, C, D] tensor, and its page faults, per product)
        inplace = not torch.is_grad_enabled()
        # recorded for a second differentiation (training on forces), one chunk: the per-edge tensors
        # are then kept for that backward anyway, and many small recorded ops cost more than they save
        chunk = ctx.chunk if inplace else max(1, sender.shape[0])
        grad_x = torch.zeros_like(node_feats) if need_x else None
        # not recorded: each chunk's gradients go straight into their rows of the outputs while still
        # in the cache (a final concatenation would copy all per-edge gradients once more); every row
        # is written, so nothing needs zeroing. grad_w keeps edge_weights' strides (empty_like), so
        # channel-major weights (mlip.nn.radial.as_groups) get their gradient without a transposed copy
        grad_y = torch.empty_like(edge_attrs) if need_y and inplace else None
        grad_w = torch.empty_like(edge_weights) if need_w and inplace else None
        parts_y, parts_w = [], []
        bufs = _workspace(3, min(chunk, sender.shape[0]), node_feats, one_hot.shape[1]) if inplace else None
        for a in range(0, sender.shape[0], chunk):
            s = slice(a, a + chunk)
            x = node_feats.index_select(0, sender[s])
            if inplace:
                raw, w_exp, g = (b[: x.shape[0]] for b in bufs)
                _, _, coupling = _chunk_messages(x, edge_attrs[s], edge_weights[s], u, one_hot, out=(raw, w_exp))
                torch.index_select(grad_out, 0, receiver[s], out=g)  # [c, C, D]
            else:
                raw, w_exp, coupling = _chunk_messages(x, edge_attrs[s], edge_weights[s], u, one_hot)
                g = grad_out.index_select(0, receiver[s])  # [c, C, D]
            if need_w:
                g_w = raw.mul_(g) if inplace else g * raw
                if inplace and grad_w[s].transpose(1, 2).is_contiguous():
                    torch.matmul(g_w, one_hot.T, out=grad_w[s].transpose(1, 2))  # [c, C, P]
                else:
                    part = torch.matmul(g_w, one_hot.T).transpose(1, 2)  # [c, P, C]
                    grad_w[s].copy_(part) if inplace else parts_w.append(part)
            g_raw = g.mul_(w_exp) if inplace else g * w_exp
            if need_x:
                g_x = torch.bmm(g_raw, coupling.transpose(1, 2))
                grad_x = grad_x.index_add_(0, sender[s], g_x) if inplace else grad_x.index_add(0, sender[s], g_x)
            if need_y:
                g_coupling = torch.bmm(x.transpose(1, 2), g_raw).reshape(x.shape[0], -1)  # [c, d_in * D]
                if inplace:
                    torch.matmul(g_coupling, u.T, out=grad_y[s])
                else:
                    parts_y.append(g_coupling @ u.T)  # [c, d_sh]
        if not inplace:  # one chunk (see above)
            grad_y = (torch.cat(parts_y) if parts_y else torch.zeros_like(edge_attrs)) if need_y else None
            grad_w = (torch.cat(parts_w) if parts_w else torch.zeros_like(edge_weights)) if need_w else None
        return grad_x, grad_y, grad_w, None, None, None, None, None, None


def conv_tp_chunked(node_feats: torch.Tensor, edge_attrs: torch.Tensor, edge_weights: torch.Tensor,
                    sender: torch.Tensor, receiver: torch.Tensor, n_nodes: int, u: torch.Tensor,
                    one_hot: torch.Tensor) -> torch.Tensor:
    """The dense-coupling convolution of :func:`mlip.kernels.reference.conv_tp`: over edge chunks when
    its messages would exceed :data:`DENSE_BYTES`, else over all edges at once with plain autograd.

    Shapes:
        node_feats [n_nodes, C, d_in]; edge_attrs [n_edges, d_sh]; edge_weights [n_edges, P, C];
        u [d_sh, d_in * D] (every path's CG block); one_hot [P, D] (path of each output column)
        -> [n_nodes, C, D].
    """
    row_bytes = node_feats.shape[1] * one_hot.shape[1] * node_feats.element_size()
    if sender.shape[0] * row_bytes <= DENSE_BYTES:
        x = node_feats.index_select(0, sender)
        raw, w_exp, _ = _chunk_messages(x, edge_attrs, edge_weights, u, one_hot)
        return node_feats.new_zeros((n_nodes,) + raw.shape[1:]).index_add(0, receiver, raw * w_exp)
    chunk = chunk_edges(sender.shape[0], row_bytes, node_feats.device)
    return _ChunkedConvTP.apply(node_feats, edge_attrs, edge_weights, sender, receiver, u, one_hot, n_nodes, chunk)
