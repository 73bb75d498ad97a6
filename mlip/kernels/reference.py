"""Pure-PyTorch tensor-product ops: the specification of every kernel, and the CPU path.

Irreps layout. Node features carry ``C`` channels of every ``l`` in ``0..lmax`` with the
natural parity ``(-1)^l`` (0e, 1o, 2e, 3o), packed densely as ``[n, C, (lmax+1)^2]``
in e3nn's real spherical-harmonic order (component ``m`` of degree ``l`` at ``l*l + l + m``).
Edge attributes are spherical harmonics ``Y_l(r̂)`` of the same layout (e3nn,
``normalization="component"``). A channel-wise ("uvu") path ``(l1, l2, l3)`` couples
``x_{l1}`` with ``Y_{l2}`` into ``l3`` by Clebsch-Gordan coefficients; only paths with
``l1 + l2 + l3`` even are used, which keeps natural parity and hence exact O(3)
equivariance (rotations *and* reflections).

The spherical-grid (Gaunt) product ``grid_product`` (used by the quadratic grid-mixing layer) is
specified in :mod:`mlip.kernels.reference_grid` and re-exported here, so this module is the whole
``torch`` backend. Triton kernels in :mod:`mlip.kernels.triton` keep these names and signatures.
"""
from __future__ import annotations

import functools
import math

import torch

from mlip.kernels.edge_conv import conv_tp_chunked
from mlip.kernels.reference_grid import gaunt_grid, grid_product  # noqa: F401 - part of the torch backend


@functools.cache
def tp_paths(lmax_in: int, lmax_sh: int, lmax_out: int) -> tuple[tuple[int, int, int], ...]:
    """All parity-preserving paths ``(l1, l2, l3)``, ordered by ``l3`` then ``l1`` then ``l2``.

    >>> tp_paths(1, 1, 1)
    ((0, 0, 0), (1, 1, 0), (0, 1, 1), (1, 0, 1))
    """
    paths = [
        (l1, l2, l3)
        for l3 in range(lmax_out + 1)
        for l1 in range(lmax_in + 1)
        for l2 in range(lmax_sh + 1)
        if abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0
    ]
    return tuple(paths)


def tp_out_dim(lmax_in: int, lmax_sh: int, lmax_out: int) -> int:
    """Width of the per-path output: ``sum_p (2 l3_p + 1)``."""
    return sum(2 * l3 + 1 for _, _, l3 in tp_paths(lmax_in, lmax_sh, lmax_out))


@functools.cache
def _cg_cpu(l1: int, l2: int, l3: int) -> torch.Tensor:
    from e3nn import o3

    # wigner_3j is normalised to unit Frobenius norm; sqrt(2 l3 + 1) gives unit-variance outputs
    return o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)


def clebsch_gordan(l1: int, l2: int, l3: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Real Clebsch-Gordan tensor ``[2l1+1, 2l2+1, 2l3+1]`` (e3nn basis, component-normalised)."""
    return _cg_cpu(l1, l2, l3).to(dtype=dtype, device=device)


def conv_tp(
    node_feats: torch.Tensor,
    edge_attrs: torch.Tensor,
    edge_weights: torch.Tensor,
    sender: torch.Tensor,
    receiver: torch.Tensor,
    n_nodes: int,
    lmax_in: int,
    lmax_sh: int,
    lmax_out: int,
) -> torch.Tensor:
    """Fused-convolution specification: gather, channel-wise TP, radial weighting, scatter-sum.

    ``out[i, c, p] = sum_{e: receiver[e]=i} w[e, p, c] * sum_{m1,m2} x[sender[e], c, l1 m1] Y[e, l2 m2] CG_p[m1, m2, m3]``

    Args:
        node_feats: ``[n_nodes, C, (lmax_in+1)^2]`` sender features.
        edge_attrs: ``[n_edges, (lmax_sh+1)^2]`` spherical harmonics of edge directions.
        edge_weights: ``[n_edges, n_paths, C]`` per-edge, per-path, per-channel radial weights.
        sender, receiver: ``[n_edges]`` atom indices (messages aggregate at the receiver).
        n_nodes: number of output rows.

    Returns:
        ``[n_nodes, C, tp_out_dim(...)]``: per-path outputs concatenated in ``tp_paths`` order.
    """
    paths = tp_paths(lmax_in, lmax_sh, lmax_out)
    if edge_weights.shape[1] != len(paths):
        raise ValueError(f"edge_weights has {edge_weights.shape[1]} paths, expected {len(paths)}")
    # All paths at once: fold the harmonics into one per-edge coupling matrix
    # M_e[i, k] = sum_j Y[e, j] U[j, i, k] (U: every path's CG block), then one batched matmul with
    # the gathered sender features, weighted per output column by its path's radial weight; run
    # over cache-sized chunks of edges with a recomputing backward (mlip.kernels.edge_conv)
    u, one_hot = _dense_coupling(lmax_in, lmax_sh, lmax_out, node_feats.dtype, node_feats.device)
    return conv_tp_chunked(node_feats, edge_attrs, edge_weights, sender, receiver, n_nodes, u, one_hot)


@functools.cache
def _dense_coupling_cpu(lmax_in: int, lmax_sh: int, lmax_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``U [(lmax_sh+1)^2, (lmax_in+1)^2 * D_out]`` (float64) and the path of each output column."""
    paths = tp_paths(lmax_in, lmax_sh, lmax_out)
    d_in, d_sh, k_out = (lmax_in + 1) ** 2, (lmax_sh + 1) ** 2, tp_out_dim(lmax_in, lmax_sh, lmax_out)
    u = torch.zeros(d_sh, d_in, k_out, dtype=torch.float64)
    path_of = torch.zeros(k_out, dtype=torch.long)
    k = 0
    for p, (l1, l2, l3) in enumerate(paths):
        cg = _cg_cpu(l1, l2, l3)  # [2l1+1, 2l2+1, 2l3+1]
        u[l2 * l2 : (l2 + 1) ** 2, l1 * l1 : (l1 + 1) ** 2, k : k + 2 * l3 + 1] = cg.permute(1, 0, 2)
        path_of[k : k + 2 * l3 + 1] = p
        k += 2 * l3 + 1
    return u.reshape(d_sh, d_in * k_out), path_of


_COUPLING_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _dense_coupling(lmax_in: int, lmax_sh: int, lmax_out: int, dtype: torch.dtype, device: torch.device):
    key = (lmax_in, lmax_sh, lmax_out, dtype, str(device))
    if key not in _COUPLING_CACHE:
        u, path_of = _dense_coupling_cpu(lmax_in, lmax_sh, lmax_out)
        one_hot = torch.nn.functional.one_hot(path_of, len(tp_paths(lmax_in, lmax_sh, lmax_out))).T
        _COUPLING_CACHE[key] = (u.to(dtype=dtype, device=device), one_hot.to(dtype=dtype, device=device))
    return _COUPLING_CACHE[key]


def conv_tp_per_path(
    node_feats: torch.Tensor,
    edge_attrs: torch.Tensor,
    edge_weights: torch.Tensor,
    sender: torch.Tensor,
    receiver: torch.Tensor,
    n_nodes: int,
    lmax_in: int,
    lmax_sh: int,
    lmax_out: int,
) -> torch.Tensor:
    """:func:`conv_tp` written path by path, literally as its formula (a readable oracle for tests)."""
    paths = tp_paths(lmax_in, lmax_sh, lmax_out)
    x = node_feats.index_select(0, sender)  # [n_edges, C, (lmax_in+1)^2]
    msgs = []
    for p, (l1, l2, l3) in enumerate(paths):
        cg = clebsch_gordan(l1, l2, l3, node_feats.dtype, node_feats.device)
        x1 = x[:, :, l1 * l1 : (l1 + 1) ** 2]  # [n_edges, C, 2l1+1]
        y2 = edge_attrs[:, l2 * l2 : (l2 + 1) ** 2]  # [n_edges, 2l2+1]
        m = torch.einsum("eci,ej,ijk->eck", x1, y2, cg) * edge_weights[:, p, :, None]
        msgs.append(m)
    msg = torch.cat(msgs, dim=-1)  # [n_edges, C, D_out]
    out = torch.zeros((n_nodes,) + msg.shape[1:], dtype=msg.dtype, device=msg.device)
    return out.index_add_(0, receiver, msg)


# --------------------------------------------------------------------------------------------
# convolution with the radial spline folded in (the fused-spline kernel's specification)
# --------------------------------------------------------------------------------------------
#: table rows that one edge touches: the 4 non-zero uniform cubic B-spline basis functions
SPLINE_ROWS = 4


def spline_coefficients(r: torch.Tensor, r_max: float, num_knots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 non-zero values of the uniform cubic B-spline basis at ``r`` and the first knot they belong to.

    Same basis as :class:`mlip.nn.radial.SplineBasis` (knot ``k`` at ``k h``, ``h = r_max / (K - 1)``):
    ``SplineBasis(r)[e, idx[e] + j] == vals[e, j]`` for the knots ``idx[e] + j`` inside ``0..K-1``,
    and every other basis value is zero. Differentiable in ``r`` (``idx`` is piecewise constant).

    Shapes:
        r [n_edges] Å -> vals [n_edges, 4], idx [n_edges] (int64, from -1 to K - 1).
    """
    h = float(r_max) / (int(num_knots) - 1)
    u = r / h
    i = torch.floor(u.detach())
    t = u - i  # [n_edges], in [0, 1)
    s = 1.0 - t
    vals = torch.stack(
        [s * s * s / 6.0, 2.0 / 3.0 - t * t + 0.5 * t * t * t, 2.0 / 3.0 - s * s + 0.5 * s * s * s, t * t * t / 6.0],
        dim=-1,
    )
    return vals, i.to(torch.int64) - 1


def spline_weights(spline_vals: torch.Tensor, spline_idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-edge radial weights ``w[e, p, c] = sum_j vals[e, j] table[idx[e] + j, p, c]`` (rows outside
    ``0..K-1`` count as zero): what the fused kernel rebuilds in registers.

    Shapes:
        spline_vals [n_edges, 4], spline_idx [n_edges], table [K, n_paths, C] -> [n_edges, n_paths, C].
    """
    k = table.shape[0]
    w = None
    for j in range(SPLINE_ROWS):
        rows = spline_idx + j
        valid = (rows >= 0) & (rows < k)
        term = table.index_select(0, rows.clamp(0, k - 1)) * (spline_vals[:, j] * valid)[:, None, None]
        w = term if w is None else w + term
    return w


def conv_tp_spline(
    node_feats: torch.Tensor,
    edge_attrs: torch.Tensor,
    spline_vals: torch.Tensor,
    spline_idx: torch.Tensor,
    table: torch.Tensor,
    sender: torch.Tensor,
    receiver: torch.Tensor,
    n_nodes: int,
    lmax_in: int,
    lmax_sh: int,
    lmax_out: int,
) -> torch.Tensor:
    """:func:`conv_tp` with radial weights from a cubic-spline table: ``conv_tp(..., spline_weights(...), ...)``.

    With ``vals, idx = spline_coefficients(r, r_max, K)`` scaled by the envelope and ``table`` the
    ``[K, P, C]`` view of :class:`mlip.nn.radial.SplineRadial`'s weight, this is the model's
    convolution; the Triton twin never writes the per-edge weights ``[n_edges, P, C]`` to memory.

    Args:
        spline_vals: ``[n_edges, 4]`` basis values (times the envelope).
        spline_idx: ``[n_edges]`` int64, first table row of each edge.
        table: ``[K, n_paths, C]`` spline coefficients per path and channel.
        (other arguments as :func:`conv_tp`)

    Returns:
        ``[n_nodes, C, tp_out_dim(...)]``.
    """
    w = spline_weights(spline_vals, spline_idx, table)
    return conv_tp(node_feats, edge_attrs, w, sender, receiver, n_nodes, lmax_in, lmax_sh, lmax_out)


# --------------------------------------------------------------------------------------------
# node-wise channel-wise products and the symmetric (body-order) contraction
# --------------------------------------------------------------------------------------------
@functools.cache
def pair_blocks(lmax1: int, lmax2: int, lmax_out: int, symmetric: bool = False) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """``(l1, l2, (l3, ...))`` blocks of the parity-preserving couplings of ``x_l1 ⊗ y_l2 -> l3``.

    Ordered by ``l1`` then ``l2``; ``l1 <= l2`` only when ``symmetric`` (``x`` is ``y``). A
    product's path ``p`` counts the ``l3`` of every block in this order.

    >>> pair_blocks(1, 1, 1, symmetric=True)
    ((0, 0, (0,)), (0, 1, (1,)), (1, 1, (0,)))
    """
    blocks = []
    for l1 in range(lmax1 + 1):
        for l2 in range(lmax2 + 1):
            if symmetric and l2 < l1:
                continue
            l3s = tuple(l3 for l3 in range(abs(l1 - l2), min(l1 + l2, lmax_out) + 1) if (l1 + l2 + l3) % 2 == 0)
            if l3s:
                blocks.append((l1, l2, l3s))
    return tuple(blocks)


def pair_paths(lmax1: int, lmax2: int, lmax_out: int, symmetric: bool = False) -> int:
    """Number of paths (weights per channel) of :func:`channelwise_product`."""
    return sum(len(l3s) for _, _, l3s in pair_blocks(lmax1, lmax2, lmax_out, symmetric))


@functools.cache
def _pair_cg_cpu(lmax1: int, lmax2: int, lmax_out: int, symmetric: bool
                 ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """The tables of :func:`channelwise_product` (float64, int64):

    * per block, all its CG matrices side by side, laid out for ``y_l2 @ cg``:
      ``[2l2+1, (2l1+1) * sum_l3 (2l3+1)]``;
    * ``path [K]``: the path of each of the ``K`` product columns (blocks, then their ``l3``, in order);
    * ``slots [K, (lmax_out+1)^2]``: 0/1, which output component each column adds to.
    """
    mats, path, slot = [], [], []
    for l1, l2, l3s in pair_blocks(lmax1, lmax2, lmax_out, symmetric):
        block = torch.cat([_cg_cpu(l1, l2, l3) for l3 in l3s], dim=2)  # [2l1+1, 2l2+1, k]
        mats.append(block.permute(1, 0, 2).reshape(2 * l2 + 1, -1))
        for l3 in l3s:
            path += [path[-1] + 1 if path else 0] * (2 * l3 + 1)
            slot += range(l3 * l3, (l3 + 1) ** 2)
    slots = torch.zeros(len(slot), (lmax_out + 1) ** 2, dtype=torch.float64)
    slots[torch.arange(len(slot)), torch.tensor(slot)] = 1.0
    return tuple(mats), torch.tensor(path), slots


_PAIR_CG_CACHE: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]] = {}


def _pair_cg(lmax1: int, lmax2: int, lmax_out: int, symmetric: bool, dtype: torch.dtype,
             device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """:func:`_pair_cg_cpu`'s tables in ``dtype`` on ``device`` (cached)."""
    key = (lmax1, lmax2, lmax_out, symmetric, dtype, str(device))
    if key not in _PAIR_CG_CACHE:
        mats, path, slots = _pair_cg_cpu(lmax1, lmax2, lmax_out, symmetric)
        _PAIR_CG_CACHE[key] = (tuple(m.to(dtype=dtype, device=device) for m in mats), path.to(device),
                               slots.to(dtype=dtype, device=device))
    return _PAIR_CG_CACHE[key]


def channelwise_product(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    lmax1: int,
    lmax2: int,
    lmax_out: int,
    symmetric: bool = False,
) -> torch.Tensor:
    """Node-wise channel-wise tensor product ``z_l3[c] = sum_p w_p[c] CG_p(x_l1[c] ⊗ y_l2[c])``.

    Paths ``p`` run over :func:`pair_blocks` (``symmetric``: ``l1 <= l2`` only, for ``x`` is ``y``).
    Per ``(l1, l2)`` block (all its ``l3`` at once): ``y_l2 @ CG`` by one matmul, then one
    ``(1 x 2l1+1) @ (2l1+1 x k)`` product with ``x_l1`` per node and channel (the outer product
    ``x_l1 ⊗ y_l2``, whose backward is a pair of reductions, is never formed); then every column
    times its path's weight, and a matmul with a 0/1 matrix sums the columns into the output.

    Args:
        x: ``[n, C, (lmax1+1)^2]``.
        y: ``[n, C, (lmax2+1)^2]``.
        weights: ``[n or 1, pair_paths(...), C]`` per-path, per-channel weights.

    Returns:
        ``[n, C, (lmax_out+1)^2]``.
    """
    n, c = x.shape[0], x.shape[1]
    mats, path, slots = _pair_cg(lmax1, lmax2, lmax_out, symmetric, x.dtype, x.device)
    xs = x.split([2 * l + 1 for l in range(lmax1 + 1)], dim=-1)  # one split: one gradient for all blocks' slices
    ys = y.split([2 * l + 1 for l in range(lmax2 + 1)], dim=-1)
    z = []
    for (l1, l2, _), cg in zip(pair_blocks(lmax1, lmax2, lmax_out, symmetric), mats):
        t = torch.matmul(ys[l2], cg).view(n, c, 2 * l1 + 1, -1)  # [n, C, 2l1+1, k]
        z.append(torch.matmul(xs[l1][:, :, None, :], t).squeeze(2))  # [n, C, k]
    w = weights[:, path, :].transpose(1, 2)  # [n or 1, C, K]
    return torch.matmul(torch.cat(z, dim=-1) * w, slots)


def contraction_lmax2(lmax_in: int, lmax_out: int, correlation: int) -> int:
    """Degree of the second-order term ``A ⊗ A``: ``lmax_in`` when a third order follows, else ``lmax_out``."""
    return lmax_in if correlation >= 3 else lmax_out


def symmetric_contraction(
    A: torch.Tensor,
    element: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor | None,
    w3: torch.Tensor | None,
    lmax_in: int,
    lmax_out: int,
    correlation: int,
) -> torch.Tensor:
    """Body-order expansion of node features with themselves, weights looked up per node by ``element``.

    ``B = w1 ⊙ A + P2(A ⊗ A; w2) [+ P3(P2'(A ⊗ A) ⊗ A; w3)]`` where ``P2`` is the symmetric
    :func:`channelwise_product` of ``A`` with itself into degree ``contraction_lmax2(...)`` (its
    ``l <= lmax_out`` part enters ``B``) and ``P3`` couples that with ``A`` into ``lmax_out``: a
    polynomial of degree ``correlation`` in ``A``, exactly O(3)-equivariant, zero at ``A = 0``.

    Args:
        A: ``[n, C, (lmax_in+1)^2]`` node features.
        element: ``[n]`` int64, each node's row in the weight tables.
        w1: ``[n_rows, min(lmax_in, lmax_out)+1, C]`` linear weights per degree.
        w2: ``[n_rows, pair_paths(lmax_in, lmax_in, lmax2, True), C]`` (``None`` for correlation 1).
        w3: ``[n_rows, pair_paths(lmax2, lmax_in, lmax_out), C]`` (``None`` below correlation 3).

    Returns:
        ``[n, C, (lmax_out+1)^2]``.
    """
    if correlation not in (1, 2, 3):
        raise ValueError(f"symmetric_contraction: correlation must be 1, 2 or 3, got {correlation}")
    if (w2 is None) != (correlation < 2) or (w3 is None) != (correlation < 3):
        raise ValueError(f"symmetric_contraction: correlation {correlation} needs w2 (>= 2) and w3 (3) exactly")
    n, c = A.shape[0], A.shape[1]
    lmin = min(lmax_in, lmax_out)
    d_out = (lmax_out + 1) ** 2
    degree = torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmin + 1)]).to(A.device)
    out = A[:, :, : (lmin + 1) ** 2] * w1[element][:, degree, :].permute(0, 2, 1)  # [n, C, (lmin+1)^2]
    if lmin < lmax_out:
        out = torch.cat([out, A.new_zeros(n, c, d_out - out.shape[-1])], dim=-1)
    if correlation >= 2:
        l2 = contraction_lmax2(lmax_in, lmax_out, correlation)
        x2 = channelwise_product(A, A, w2[element], lmax_in, lmax_in, l2, symmetric=True)  # [n, C, (l2+1)^2]
        if x2.shape[-1] >= d_out:
            out = out + x2[:, :, :d_out]
        else:  # l2 < lmax_out: only with lmax_in < lmax_out and correlation 3
            out = out + torch.cat([x2, x2.new_zeros(n, c, d_out - x2.shape[-1])], dim=-1)
        if correlation >= 3:
            out = out + channelwise_product(x2, A, w3[element], l2, lmax_in, lmax_out)
    return out
