"""Equivariant layers on dense natural-parity irreps ``[n, C, (lmax+1)^2]``.

The edge convolution (gather, channel-wise tensor product with spherical harmonics, radial
weighting, scatter) is delegated to a kernel backend's ``conv_tp``, and the symmetric (body-order)
contraction of node features with themselves to its ``symmetric_contraction`` (the layers take the
backend's ops, ``KernelBackend.ops`` of :mod:`mlip.kernels`; the reference by default). The layers
here hold the weights and do the cheap node-wise parts around them: per-``l`` channel mixing and the
linear map over tensor-product paths.
"""
from __future__ import annotations

import math

import torch

from mlip.kernels import KernelOps, reference
from mlip.kernels.reference import (
    channelwise_product,
    contraction_lmax2,
    pair_blocks,
    pair_paths,
    tp_out_dim,
    tp_paths,
)
from mlip.nn.irreps import irreps_dim, l_slice


class EquivariantLinear(torch.nn.Module):
    """Per-degree channel mixing ``y_l = x_l W_l / sqrt(C_in)`` (no bias: exact O(3) equivariance).

    Degrees above ``lmax_in`` come out as zeros.

    Shapes:
        x [n, C_in, (lmax_in+1)^2] -> [n, C_out, (lmax_out+1)^2].
    """

    def __init__(self, c_in: int, c_out: int, lmax_in: int, lmax_out: int) -> None:
        super().__init__()
        self.c_in, self.c_out, self.lmax_in, self.lmax_out = c_in, c_out, lmax_in, lmax_out
        self.weight = torch.nn.Parameter(torch.randn(min(lmax_in, lmax_out) + 1, c_in, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / math.sqrt(self.c_in)
        outs = []
        for l in range(self.lmax_out + 1):
            if l <= self.lmax_in:
                xl = x[:, :, l_slice(l)]  # [n, C_in, 2l+1]
                outs.append(torch.einsum("ncm,cd->ndm", xl, w[l]))
            else:
                outs.append(x.new_zeros(x.shape[0], self.c_out, 2 * l + 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class SpeciesLinear(torch.nn.Module):
    """Element-dependent per-degree channel mixing ``y_l = x_l W_l[element] / sqrt(C_in)``.

    One ``C_in x C_out`` matrix per element and degree (MACE's one-hot ``skip_tp``, written as a
    lookup instead of a tensor product with one-hot node attributes). It acts on channels only,
    with the same matrix for every ``m`` of a degree, so it is exactly O(3)-equivariant; it has no
    bias, so zero features stay zero. Degrees above ``lmax_in`` come out as zeros.

    The atoms of each element present are mixed by one matmul (no ``[n_atoms, C_in, C_out]``
    gather of per-atom matrices).

    Shapes:
        x [n, C_in, (lmax_in+1)^2], element [n] (row in the element list) -> [n, C_out, (lmax_out+1)^2].
    """

    def __init__(self, num_elements: int, c_in: int, c_out: int, lmax_in: int, lmax_out: int) -> None:
        super().__init__()
        self.c_in, self.c_out, self.lmax_in, self.lmax_out = c_in, c_out, lmax_in, lmax_out
        self.weight = torch.nn.Parameter(torch.randn(num_elements, min(lmax_in, lmax_out) + 1, c_in, c_out))

    def forward(self, x: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
        lmin = min(self.lmax_in, self.lmax_out)
        d_min, d_out = irreps_dim(lmin), irreps_dim(self.lmax_out)
        out = x.new_zeros(x.shape[0], self.c_out, d_min)
        scale = 1.0 / math.sqrt(self.c_in)
        idxs, parts = [], []
        for e in torch.unique(element).tolist():
            idx = torch.nonzero(element == e).squeeze(1)  # [n_e] atoms of element e
            xe = x.index_select(0, idx) * scale
            ye = [torch.einsum("ncm,cd->ndm", xe[:, :, l_slice(l)], self.weight[e, l]) for l in range(lmin + 1)]
            parts.append(torch.cat(ye, dim=-1))  # [n_e, C_out, (lmin+1)^2]
            idxs.append(idx)
        if parts:
            out = out.index_copy(0, torch.cat(idxs), torch.cat(parts))
        if d_min < d_out:
            out = torch.cat([out, out.new_zeros(out.shape[0], self.c_out, d_out - d_min)], dim=-1)
        return out


class PathLinear(torch.nn.Module):
    """Mix the per-path outputs of ``conv_tp`` into ``C`` channels of each degree.

    ``conv_tp`` orders paths by ``l3``, so the paths of one output degree are contiguous:
    ``y_l3 = sum_{p: l3_p = l3} sum_c x_p[c] W_l3[c, p, :] / sqrt(C P_l3)``.

    Shapes:
        x [n, C, tp_out_dim(lmax_in, lmax_sh, lmax_out)] -> [n, C_out, (lmax_out+1)^2].
    """

    def __init__(self, num_channels: int, c_out: int, lmax_in: int, lmax_sh: int, lmax_out: int) -> None:
        super().__init__()
        paths = tp_paths(lmax_in, lmax_sh, lmax_out)
        self.groups: list[tuple[int, int, int]] = []  # (l3, start, n_paths)
        start = 0
        for l3 in range(lmax_out + 1):
            n_p = sum(1 for p in paths if p[2] == l3)
            self.groups.append((l3, start, n_p))
            start += n_p * (2 * l3 + 1)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(num_channels * n_p, c_out)) for _, _, n_p in self.groups]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        outs = []
        for (l3, start, n_p), w in zip(self.groups, self.weights):
            d = 2 * l3 + 1
            xl = x[:, :, start : start + n_p * d].reshape(n, c * n_p, d)  # [n, C*P, 2l3+1]
            outs.append(torch.einsum("nqm,qd->ndm", xl, w) / math.sqrt(c * n_p))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class ConvTP(torch.nn.Module):
    """Edge convolution through a kernel backend's ops: ``ops.conv_tp`` (see :mod:`mlip.kernels.reference`).

    Shapes:
        node_feats [n, C, (lmax_in+1)^2]; edge_attrs [n_edges, (lmax_sh+1)^2];
        edge_weights [n_edges, n_paths, C] -> [n, C, tp_out_dim(lmax_in, lmax_sh, lmax_out)].
    """

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int) -> None:
        super().__init__()
        self.lmax_in, self.lmax_sh, self.lmax_out = lmax_in, lmax_sh, lmax_out
        self.n_paths = len(tp_paths(lmax_in, lmax_sh, lmax_out))
        self.out_dim = tp_out_dim(lmax_in, lmax_sh, lmax_out)

    def forward(
        self,
        ops: KernelOps,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_weights: torch.Tensor,
        sender: torch.Tensor,
        receiver: torch.Tensor,
    ) -> torch.Tensor:
        return ops.conv_tp(
            node_feats, edge_attrs, edge_weights, sender, receiver, node_feats.shape[0],
            self.lmax_in, self.lmax_sh, self.lmax_out,
        )


class ChannelwiseProduct(torch.nn.Module):
    """Node-wise channel-wise tensor product ``z_l3[c] = sum_p w_p[c] CG_p(x_l1[c] ⊗ y_l2[c])``.

    A thin module over :func:`mlip.kernels.reference.channelwise_product` (paths in
    :func:`~mlip.kernels.reference.pair_blocks` order); with ``symmetric`` (``x`` is ``y``), only
    ``l1 <= l2`` blocks are used.

    Shapes:
        x [n, C, (lmax1+1)^2], y [n, C, (lmax2+1)^2], weights [n or 1, n_paths, C]
        -> [n, C, (lmax_out+1)^2].
    """

    def __init__(self, lmax1: int, lmax2: int, lmax_out: int, symmetric: bool = False) -> None:
        super().__init__()
        self.lmax1, self.lmax2, self.lmax_out, self.symmetric = lmax1, lmax2, lmax_out, symmetric
        self.blocks = pair_blocks(lmax1, lmax2, lmax_out, symmetric)
        self.n_paths = pair_paths(lmax1, lmax2, lmax_out, symmetric)

    def forward(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return channelwise_product(x, y, weights, self.lmax1, self.lmax2, self.lmax_out, self.symmetric)


class SymmetricContraction(torch.nn.Module):
    """Body-order expansion of node features with themselves (MACE's product basis, our own coupling).

    ``B = w1 ⊙ A + P2(A ⊗ A) [+ P3(P2(A ⊗ A) ⊗ A)]`` with channel-wise CG products and learnable
    per-path, per-channel (optionally per-element) weights: a polynomial of degree ``correlation``
    in ``A`` whose terms have body order up to ``correlation + 1``. Only parity-preserving
    couplings are used, so it is exactly O(3)-equivariant. Zero input gives zero output.

    The module holds the weight tables; the products run through a kernel backend's
    ``symmetric_contraction`` (specified by :func:`mlip.kernels.reference.symmetric_contraction`).

    Shapes:
        A [n, C, (lmax_in+1)^2], element [n] -> [n, C, (lmax_out+1)^2].
    """

    def __init__(self, num_channels: int, lmax_in: int, lmax_out: int, correlation: int, num_elements: int) -> None:
        super().__init__()
        if correlation not in (1, 2, 3):
            raise ValueError(f"correlation must be 1, 2 or 3, got {correlation}")
        self.lmax_in, self.lmax_out, self.correlation = lmax_in, lmax_out, correlation
        n_w = max(num_elements, 1)
        lmin = min(lmax_in, lmax_out)
        self.w1 = torch.nn.Parameter(torch.ones(n_w, lmin + 1, num_channels))
        self.w2 = self.w3 = None
        if correlation >= 2:
            l2 = contraction_lmax2(lmax_in, lmax_out, correlation)
            n2 = pair_paths(lmax_in, lmax_in, l2, symmetric=True)
            self.w2 = torch.nn.Parameter(torch.randn(n_w, n2, num_channels) * 0.5)
        if correlation >= 3:
            n3 = pair_paths(l2, lmax_in, lmax_out)
            self.w3 = torch.nn.Parameter(torch.randn(n_w, n3, num_channels) * 0.25)

    def forward(self, A: torch.Tensor, element: torch.Tensor, ops: KernelOps | None = None) -> torch.Tensor:
        """``ops``: a kernel backend's ops (``KernelBackend.ops``), whose ``symmetric_contraction`` runs
        (``None``: the reference).

        Shapes:
            A [n, C, (lmax_in+1)^2], element [n] (row in the element list) -> [n, C, (lmax_out+1)^2].
        """
        ops = reference if ops is None else ops
        rows = element if self.w1.shape[0] > 1 else torch.zeros_like(element)
        return ops.symmetric_contraction(A, rows, self.w1, self.w2, self.w3,
                                             self.lmax_in, self.lmax_out, self.correlation)
