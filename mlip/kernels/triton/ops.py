"""Triton twins of :mod:`mlip.kernels.reference` and :mod:`mlip.kernels.reference_grid`: same names, same signatures.

``conv_tp`` runs gather + channel-wise tensor product + radial weighting + scatter-sum in one
kernel per direction, differentiable to any order (forces, and force-loss training).
``grid_product`` is the fused spherical-grid (Gaunt) product. Both run on CUDA tensors, or on
the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).
``symmetric_contraction`` has no fused kernel yet: it is the torch reference, re-exported.
"""
from __future__ import annotations

import torch

from mlip.kernels.backends import BACKENDS
from mlip.kernels.reference import (  # noqa: F401 - the reference's names (helpers are torch, shared)
    SPLINE_ROWS,
    clebsch_gordan,
    spline_coefficients,
    spline_weights,
    # no fused kernel yet for the node-wise body-order contraction (a few small matmuls per node,
    # not per edge): this backend runs the torch reference, listed so that the model calls every
    # product through one backend module; a fused kernel would replace it in place
    symmetric_contraction,
    tp_out_dim,
    tp_paths,
)
from mlip.kernels.reference_grid import _check_shapes, gaunt_grid  # noqa: F401
from mlip.kernels.triton.autograd import conv_tp_autograd, conv_tp_spline_autograd
from mlip.kernels.triton.conv import csr_graph
from mlip.kernels.triton.grid import grid_product_autograd

#: what this module declares in the registry (dtypes, degrees, devices); the checks below enforce it
_BACKEND = BACKENDS["triton"]
DTYPES = _BACKEND.dtypes
MAX_LMAX = _BACKEND.max_lmax


def check_inputs(dtype: torch.dtype, device: torch.device, lmaxes: tuple[int, ...] = ()) -> None:
    """Raise a clear error for a dtype, device or ``lmax`` the Triton kernels do not support.

    Models resolve their backend for their device and dtype before they run (``select_backend``);
    this covers direct calls of the ops."""
    if dtype not in DTYPES:
        raise TypeError(f"triton kernels support {DTYPES}, got {dtype}; use kernel='torch'")
    if not _BACKEND.runs_on(device):
        raise RuntimeError(
            f"triton kernels run on CUDA tensors (got device {device}); use kernel='torch' or 'auto' "
            "(or set TRITON_INTERPRET=1 before importing triton, for testing on the CPU)"
        )
    for lmax in lmaxes:
        if not 0 <= lmax <= MAX_LMAX:
            raise ValueError(f"triton conv_tp supports lmax 0..{MAX_LMAX}, got {lmax}; use kernel='torch'")


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
    """Fused convolution; same contract as :func:`mlip.kernels.reference.conv_tp`.

    Receivers are visited in CSR order (edges sorted by receiver once, cached for the edge
    list), so each output row is written once, without atomics: results are deterministic.

    Shapes:
        node_feats [n_nodes, C, (lmax_in+1)^2]; edge_attrs [n_edges, (lmax_sh+1)^2];
        edge_weights [n_edges, n_paths, C]; sender, receiver [n_edges]
        -> [n_nodes, C, tp_out_dim(lmax_in, lmax_sh, lmax_out)].
    """
    paths = tp_paths(lmax_in, lmax_sh, lmax_out)
    if edge_weights.shape[1] != len(paths):
        raise ValueError(f"edge_weights has {edge_weights.shape[1]} paths, expected {len(paths)}")
    check_inputs(node_feats.dtype, node_feats.device, (lmax_in, lmax_sh, lmax_out))
    n_edges, c = sender.shape[0], node_feats.shape[1]
    expect = {
        "node_feats": ((node_feats.shape[0], c, (lmax_in + 1) ** 2), node_feats),
        "edge_attrs": ((n_edges, (lmax_sh + 1) ** 2), edge_attrs),
        "edge_weights": ((n_edges, len(paths), c), edge_weights),
        "receiver": ((n_edges,), receiver),
    }
    for name, (shape, t) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"conv_tp: {name} has shape {tuple(t.shape)}, expected {shape}")
        if t.is_floating_point() and t.dtype != node_feats.dtype:
            raise TypeError(f"conv_tp: {name} is {t.dtype} but node_feats is {node_feats.dtype}")
    graph = csr_graph(sender, receiver, int(n_nodes))
    return conv_tp_autograd(node_feats, edge_attrs, edge_weights, graph, (lmax_in, lmax_sh, lmax_out))


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
    """Fused convolution with the radial spline folded in; contract of :func:`mlip.kernels.reference.conv_tp_spline`.

    Each program rebuilds an edge's radial-weight tile from its 4 spline values and 4 rows of
    ``table`` (small: it stays in cache), so neither the per-edge weights ``[n_edges, P, C]`` nor
    their gradient is written to memory; the gradient of ``spline_vals`` is reduced over channels
    in registers, the table's gradient is summed over edges with atomic adds.

    Shapes:
        node_feats [n_nodes, C, (lmax_in+1)^2]; edge_attrs [n_edges, (lmax_sh+1)^2];
        spline_vals [n_edges, 4]; spline_idx [n_edges] int64; table [K, n_paths, C]
        -> [n_nodes, C, tp_out_dim(lmax_in, lmax_sh, lmax_out)].
    """
    paths = tp_paths(lmax_in, lmax_sh, lmax_out)
    check_inputs(node_feats.dtype, node_feats.device, (lmax_in, lmax_sh, lmax_out))
    n_edges, c = sender.shape[0], node_feats.shape[1]
    expect = {
        "node_feats": ((node_feats.shape[0], c, (lmax_in + 1) ** 2), node_feats),
        "edge_attrs": ((n_edges, (lmax_sh + 1) ** 2), edge_attrs),
        "spline_vals": ((n_edges, SPLINE_ROWS), spline_vals),
        "spline_idx": ((n_edges,), spline_idx),
        "table": ((table.shape[0], len(paths), c), table),
        "receiver": ((n_edges,), receiver),
    }
    for name, (shape, t) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"conv_tp_spline: {name} has shape {tuple(t.shape)}, expected {shape}")
        if t.is_floating_point() and t.dtype != node_feats.dtype:
            raise TypeError(f"conv_tp_spline: {name} is {t.dtype} but node_feats is {node_feats.dtype}")
    if spline_idx.dtype != torch.int64:
        raise TypeError(f"conv_tp_spline: spline_idx must be int64, got {spline_idx.dtype}")
    graph = csr_graph(sender, receiver, int(n_nodes))
    return conv_tp_spline_autograd(node_feats, edge_attrs, spline_vals, spline_idx, table, graph,
                                   (lmax_in, lmax_sh, lmax_out))


def grid_product(a: torch.Tensor, b: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> torch.Tensor:
    """Fused spherical-grid product; same contract as :func:`mlip.kernels.reference_grid.grid_product`.

    Shapes:
        a, b [n, C, D]; to_grid [G, D]; from_grid [D_out, G] -> [n, C, D_out].
    """
    _check_shapes(a, b, to_grid, from_grid)
    check_inputs(a.dtype, a.device)
    for name, t in (("b", b), ("to_grid", to_grid), ("from_grid", from_grid)):
        if t.dtype != a.dtype:
            raise TypeError(f"grid_product: {name} is {t.dtype} but a is {a.dtype}")
    return grid_product_autograd(a, b, to_grid, from_grid)
