"""Neighbour-restricted pre-norm transformer blocks for the ``learned-equivariance`` family.

Atoms are tokens; each atom (the *receiver*) attends only to its graph neighbours (the
*senders*, edges within ``r_max``), so cost is linear in the number of atoms and periodic
images are handled by the edge list like in any message-passing model. Attention is computed
edge-wise: one score per edge and head, a softmax over each receiver's incoming edges built on
``scatter_reduce``/``index_add_``, values summed at the receiver.

Smoothness at the cutoff. A plain softmax renormalises when a neighbour enters or leaves the
cutoff sphere, so energies would jump. Here each edge's unnormalised weight is multiplied by the
smooth envelope ``u(r)`` (``u = u' = u'' = 0`` at ``r_max``), and the denominator holds an extra
*sink* term ``exp(s_sink)`` with a zero value (a learned logit per head, the "attention sink" /
softmax-plus-one idea):

    a_ij = u_ij exp(s_ij) / (exp(s_sink) + sum_k u_ik exp(s_ik)),      o_i = sum_j a_ij v_ij

so ``a_ij -> 0`` continuously as ``r_ij -> r_max`` even for the last neighbour, and an atom
without neighbours gets ``o_i = 0`` exactly (its energy is then the isolated-atom reference).

Fused attention. With ``edge_values=False`` the values depend on the sender only and the weights
above are a masked softmax with an additive bias ``b_ij + log u_ij`` and one extra key (the sink,
zero key and value, bias ``s_sink``); :meth:`NeighborAttention.dense` evaluates exactly that with
one ``torch.nn.functional.scaled_dot_product_attention`` call per block over the whole batch,
padded per structure (useful for batches of small molecules, where most atoms are neighbours;
periodic images of one pair are combined exactly in the mask). Edge-conditioned values (the
default, which let directions reach the features directly) cannot be expressed as SDPA and use the
edge path.
"""
from __future__ import annotations

import math

import torch

from mlip.nn.scatter import scatter_sum


def segment_max(src: torch.Tensor, index: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Row-wise maximum of ``src`` per segment, starting from ``init`` (no gradient).

    Shapes:
        src [n_edges, H]; index [n_edges] (receiver); init [n_nodes, H] -> [n_nodes, H].
    """
    out = init.detach().clone()
    idx = index[:, None].expand_as(src)
    return out.scatter_reduce_(0, idx, src.detach(), reduce="amax", include_self=True)


class NeighborAttention(torch.nn.Module):
    """Multi-head attention of each atom over its neighbours, with geometric biases.

    Scores ``s_ij = q_i . k_j / sqrt(d) + b(e_ij)`` per head (``e_ij`` an edge embedding, not
    rotation-invariant on purpose); values ``v_j`` (+ ``w(e_ij)`` with ``edge_values``);
    weights as in the module docstring. Bias-free projections: zero input gives zero output.
    With ``edge_gates`` the edge also multiplies the sender's key and value channel by channel,
    ``k_j ⊙ g_k(e_ij)`` and ``v_j ⊙ g_v(e_ij)`` (a continuous filter, as in SchNet's convolution):
    the geometry then modulates what each neighbour contributes instead of only adding to it,
    which the additive ``b`` and ``w`` cannot express.

    Shapes:
        x [n_atoms, C]; edge_feats [n_edges, edge_dim]; envelope [n_edges];
        sender/receiver [n_edges] -> [n_atoms, C].
    """

    def __init__(self, num_channels: int, num_heads: int, edge_dim: int, edge_values: bool = True,
                 edge_gates: bool = False) -> None:
        super().__init__()
        if num_channels % num_heads:
            raise ValueError(f"num_channels={num_channels} must be divisible by num_heads={num_heads}")
        self.C, self.H, self.D = int(num_channels), int(num_heads), int(num_channels) // int(num_heads)
        self.qkv = torch.nn.Linear(self.C, 3 * self.C, bias=False)
        self.edge_bias = torch.nn.Linear(edge_dim, self.H)
        self.edge_value = torch.nn.Linear(edge_dim, self.C, bias=False) if edge_values else None
        self.key_gate = torch.nn.Linear(edge_dim, self.C) if edge_gates else None
        self.value_gate = torch.nn.Linear(edge_dim, self.C) if edge_gates else None
        self.sink = torch.nn.Parameter(torch.zeros(self.H))
        self.out = torch.nn.Linear(self.C, self.C, bias=False)

    def scores(self, x: torch.Tensor, edge_feats: torch.Tensor, sender: torch.Tensor,
               receiver: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge scores ``[n_edges, H]`` and sender values ``[n_atoms, H, D]``."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.H, self.D).unbind(1)
        k_e = k[sender]  # [n_edges, H, D]
        if self.key_gate is not None:
            k_e = k_e * self.key_gate(edge_feats).view(-1, self.H, self.D)
        s = (q[receiver] * k_e).sum(-1) / math.sqrt(self.D) + self.edge_bias(edge_feats)
        return s, v

    def forward(self, x: torch.Tensor, edge_feats: torch.Tensor, envelope: torch.Tensor,
                sender: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        s, v = self.scores(x, edge_feats, sender, receiver)  # [n_edges, H], [n, H, D]
        sink = self.sink.to(x.dtype)
        m = segment_max(s, receiver, sink.expand(n, self.H))  # [n, H] stabiliser, cancels exactly
        w = torch.exp(s - m[receiver]) * envelope[:, None]  # [n_edges, H]
        denom = torch.exp(sink[None, :] - m) + scatter_sum(w, receiver, n)  # [n, H], >= exp(sink - m) > 0
        val = v[sender]  # [n_edges, H, D]
        if self.value_gate is not None:
            val = val * self.value_gate(edge_feats).view(-1, self.H, self.D)
        if self.edge_value is not None:
            val = val + self.edge_value(edge_feats).view(-1, self.H, self.D)
        o = scatter_sum(w[:, :, None] * val, receiver, n) / denom[:, :, None]
        return self.out(o.reshape(n, self.C))

    def dense(self, x: torch.Tensor, edge_feats: torch.Tensor, envelope: torch.Tensor,
              sender: torch.Tensor, receiver: torch.Tensor, graph: torch.Tensor | None = None,
              n_graphs: int = 1) -> torch.Tensor:
        """Same result as :meth:`forward` through one fused ``scaled_dot_product_attention`` call
        over all structures of the batch, padded to ``n_max`` atoms, with an additive mask
        ``[n_graphs, H, n_max, n_max + 1]`` (last key = the sink). Needs ``edge_values=False``.

        Edges repeating a (sender, receiver) pair (periodic images in a small cell) share ``q_i.k_j``
        and ``v_j``, so their weights add: the mask holds ``log Σ_images u exp(b)`` (a logsumexp over
        the images), exact. Pairs without an edge get ``-inf``.

        Args:
            graph: ``[n_atoms]`` structure of each atom, sorted (``None``: one structure).
            n_graphs: number of structures.

        Shapes: as :meth:`forward`; memory is O(n_graphs * n_max^2), so use it for small molecules.
        """
        if self.edge_value is not None or self.key_gate is not None:
            raise ValueError("dense (SDPA) attention needs edge_values=False and edge_gates=False: "
                             "edge-conditioned values and keys are not SDPA")
        n, H, D = x.shape[0], self.H, self.D
        if graph is None:
            graph = torch.zeros(n, dtype=torch.long, device=x.device)
        count = torch.bincount(graph, minlength=n_graphs)
        start = torch.cumsum(count, 0) - count
        local = torch.arange(n, device=x.device) - start[graph]  # [n] position inside its structure
        n_max = int(count.max()) if n else 0
        q, k, v = self.qkv(x).view(n, 3, H, D).unbind(1)

        def padded(t: torch.Tensor, extra: int) -> torch.Tensor:  # [n, H, D] -> [G, H, n_max + extra, D]
            out = t.new_zeros(n_graphs, n_max + extra, H, D)
            out[graph, local] = t
            return out.transpose(1, 2)

        # mask: one slot per (structure, head, receiver, sender); repeated pairs combined by logsumexp
        term = self.edge_bias(edge_feats) + torch.log(envelope)[:, None]  # [n_edges, H]
        g_e = graph[receiver]
        heads = torch.arange(H, device=x.device)
        slot = ((g_e[:, None] * H + heads) * n_max + local[receiver][:, None]) * n_max + local[sender][:, None]
        uniq, inverse = torch.unique(slot.flatten(), return_inverse=True)
        flat = term.flatten()
        top = torch.full((uniq.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
        top = top.scatter_reduce(0, inverse, flat.detach(), reduce="amax")  # stabiliser, cancels exactly
        total = torch.zeros_like(top).index_add(0, inverse, torch.exp(flat - top[inverse]))
        pairs = torch.full((n_graphs * H * n_max * n_max,), float("-inf"), dtype=x.dtype, device=x.device)
        pairs = pairs.index_put((uniq,), torch.log(total) + top).view(n_graphs, H, n_max, n_max)
        sink = self.sink.to(x.dtype)[None, :, None, None].expand(n_graphs, H, n_max, 1)
        mask = torch.cat([pairs, sink], dim=-1)  # [G, H, n_max, n_max + 1]
        o = torch.nn.functional.scaled_dot_product_attention(padded(q, 0), padded(k, 1), padded(v, 1), attn_mask=mask)
        o = o.transpose(1, 2)[graph, local]  # [n, H, D]
        return self.out(o.reshape(n, self.C))


class TransformerBlock(torch.nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (SiLU MLP).

    Shapes:
        x [n_atoms, C]; edge_feats [n_edges, edge_dim]; envelope [n_edges]; sender/receiver
        [n_edges] -> [n_atoms, C].
    """

    def __init__(self, num_channels: int, num_heads: int, edge_dim: int, mlp_ratio: float = 2.0,
                 edge_values: bool = True, edge_gates: bool = False) -> None:
        super().__init__()
        C = int(num_channels)
        hidden = max(1, round(mlp_ratio * C))
        self.norm_attn = torch.nn.LayerNorm(C)
        self.attn = NeighborAttention(C, num_heads, edge_dim, edge_values, edge_gates)
        self.norm_mlp = torch.nn.LayerNorm(C)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(C, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, C))

    def forward(self, x: torch.Tensor, edge_feats: torch.Tensor, envelope: torch.Tensor,
                sender: torch.Tensor, receiver: torch.Tensor, graph: torch.Tensor | None = None,
                n_graphs: int = 1) -> torch.Tensor:
        """Edge-wise attention, or with ``graph`` (``[n_atoms]`` structure index) the fused dense
        path :meth:`NeighborAttention.dense` over ``n_graphs`` padded structures."""
        y = self.norm_attn(x)
        if graph is None:
            x = x + self.attn(y, edge_feats, envelope, sender, receiver)
        else:
            x = x + self.attn.dense(y, edge_feats, envelope, sender, receiver, graph, n_graphs)
        return self.feed_forward(x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP half alone: the block's action on an atom without neighbours."""
        return x + self.mlp(self.norm_mlp(x))


__all__ = ["NeighborAttention", "TransformerBlock", "segment_max"]
