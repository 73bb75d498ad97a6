"""The ``equivariant`` family: a NequIP/MACE-style message-passing potential with Facet's
spline radial functions and spherical-grid mixing (arXiv 2509.08418).

Per layer: equivariant linear -> edge convolution (channel-wise CG product of sender features
with edge spherical harmonics, per-edge radial weights, sum over neighbours; through the
``mlip.kernels`` backend) -> linear over paths -> symmetric contraction (body order; the backend's
``symmetric_contraction``) -> linear -> residual (optionally an element-dependent linear skip) ->
spherical-grid MLP mixing (residual; with the default quadratic MLP its product is the backend's
``grid_product``). The backend (a :class:`mlip.kernels.KernelBackend`) is resolved when the model is
built, loaded, moved or cast, not in ``forward``, and handed to every product layer.
Each layer's scalars feed an energy readout; per-element, per-head E0s are added. Forces and stress
come from :mod:`mlip.models.outputs`. The default configuration is exactly O(3)-equivariant.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mlip.data.graph import GraphBatch
from mlip.kernels import (
    KERNEL_NAMES,
    BackendUnavailableError,
    KernelBackend,
    KernelOps,
    check_buildable,
    select_backend,
)
from mlip.kernels.reference import spline_coefficients
from mlip.models import backend_check
from mlip.models.base import PotentialModel, register, seeded
from mlip.nn.embedding import ChargeSpinEmbedding, SpeciesEmbedding
from mlip.nn.irreps import spherical_harmonics
from mlip.nn.radial import BesselBasis, MLPRadial, PolynomialEnvelope, SplineBasis, SplineRadial
from mlip.nn.readout import AtomicEnergies, LinearReadout, MLPReadout, head_index, select_head
from mlip.nn.s2grid import ACTIVATIONS, GridMixing
from mlip.nn.scatter import scatter_sum
from mlip.nn.tensor_product import ConvTP, EquivariantLinear, PathLinear, SpeciesLinear, SymmetricContraction


@dataclass
class EquivariantConfig:
    """Hyperparameters of the ``equivariant`` family (a plain dict/YAML maps onto these fields).

    ``lmax`` is the degree of the edge spherical harmonics and of the messages; ``hidden_lmax``
    (default ``lmax``) that of the node features kept between layers (MACE-MP medium: 3 and 1).
    ``mixing="grid"`` with the default ``grid_activation="quadratic"`` (on a grid of degree
    ``>= 3 hidden_lmax``, the default) or ``mixing="none"`` is exactly O(3)-equivariant;
    ``grid_activation="silu"`` is only approximately rotation-equivariant (exactly
    parity-equivariant; error in ``docs/equivariant.md``). ``skip_per_element`` makes the residual
    skip of layers after the first an element-dependent per-degree channel mixing (MACE's
    ``skip_tp``; exact, and the bulk of MACE-MP medium's parameter count). ``edge_chunk_size``
    (``None``: off; on a backend that declares ``edge_chunking``, the torch reference) runs each
    layer's radial weights and edge convolution over chunks of that many edges under activation
    checkpointing, so the per-edge tensors ``[chunk, C, (lmax+1)^2]`` are recomputed in the backward
    instead of kept for all edges (bounded memory for large cells, same numbers, about one extra
    convolution of compute).
    """

    r_max: float = 5.0
    elements: list = field(default_factory=list)
    num_channels: int = 32
    lmax: int = 2
    hidden_lmax: int | None = None
    num_layers: int = 2
    num_radial: int = 8
    radial: str = "spline"
    spline_knots: int = 16
    radial_mlp: list = field(default_factory=lambda: [64, 64])
    envelope_p: int = 5
    correlation: int = 3
    contraction_per_element: bool = True
    mixing: str = "grid"
    grid_activation: str = "quadratic"
    grid_degree: int | None = None
    grid_hidden: int | None = None
    skip_per_element: bool = False
    readout_hidden: int = 16
    use_charge_spin: bool = False
    charge_spin_heads: list | None = None
    heads: list = field(default_factory=lambda: ["default"])
    e0s: Any = None
    avg_num_neighbors: float | None = None
    scale: float = 1.0
    shift: float = 0.0
    shift_by_coordination: bool = True
    pair_repulsion: bool = False  # add ZBL repulsion below covalent bond lengths (mlip.nn.repulsion)
    kernel: str = "auto"
    edge_chunk_size: int | None = None
    seed: int | None = 0


def _validate(cfg: EquivariantConfig) -> None:
    if not 1 <= int(cfg.lmax) <= 3:
        raise ValueError(f"equivariant: lmax must be 1..3, got {cfg.lmax}")
    if cfg.hidden_lmax is not None and not 0 <= int(cfg.hidden_lmax) <= int(cfg.lmax):
        raise ValueError(f"equivariant: hidden_lmax must be 0..lmax={cfg.lmax}, got {cfg.hidden_lmax}")
    if cfg.radial not in ("spline", "mlp"):
        raise ValueError(f"equivariant: radial must be 'spline' or 'mlp', got {cfg.radial!r}")
    if cfg.mixing not in ("grid", "none"):
        raise ValueError(f"equivariant: mixing must be 'grid' or 'none', got {cfg.mixing!r}")
    if cfg.grid_activation not in ACTIVATIONS:
        raise ValueError(
            f"equivariant: grid_activation must be one of {ACTIVATIONS}, got {cfg.grid_activation!r}"
        )
    if int(cfg.num_layers) < 1:
        raise ValueError(f"equivariant: num_layers must be >= 1, got {cfg.num_layers}")
    if not cfg.heads:
        raise ValueError("equivariant: heads must list at least one head name")
    if cfg.kernel not in KERNEL_NAMES:
        raise ValueError(f"equivariant: kernel must be one of {KERNEL_NAMES}, got {cfg.kernel!r}")
    if cfg.edge_chunk_size is not None and (isinstance(cfg.edge_chunk_size, bool) or int(cfg.edge_chunk_size) < 1):
        raise ValueError(f"equivariant: edge_chunk_size must be a positive integer or None, got {cfg.edge_chunk_size!r}")


def _spline_in_kernel(radial: str, backend: KernelBackend) -> bool:
    """Whether the convolution evaluates the radial spline per edge (``conv_tp_spline``): only a
    spline radial can be folded into 4 table rows, and only a backend that fuses it gains from it
    (on the reference one matmul ``basis @ W`` is faster)."""
    return radial == "spline" and backend.fuses("conv_tp_spline")


@dataclass
class EdgeInputs:
    """Per-edge tensors of one forward, shared by every layer.

    The radial part comes in the form the backend's convolution takes (:func:`_spline_in_kernel`):
    the dense basis for ``conv_tp``, or the 4 non-zero spline values (times the envelope) and the
    first knot of each edge for ``conv_tp_spline``; the other form is ``None``.

    Shapes:
        attrs [n_edges, (lmax+1)^2]; envelope [n_edges]; sender, receiver [n_edges];
        basis [n_edges, K]; spline_vals [n_edges, 4]; spline_idx [n_edges] (int64).
    """

    attrs: torch.Tensor
    envelope: torch.Tensor
    sender: torch.Tensor
    receiver: torch.Tensor
    basis: torch.Tensor | None = None
    spline_vals: torch.Tensor | None = None
    spline_idx: torch.Tensor | None = None


class InteractionBlock(torch.nn.Module):
    """One message-passing layer, ``[n, C, (lmax_in+1)^2] -> [n, C, (lmax_out+1)^2]``.

    Shapes:
        h [n_atoms, C, (lmax_in+1)^2]; edges: :class:`EdgeInputs`; element [n_atoms].
    """

    def __init__(self, cfg: EquivariantConfig, lmax_in: int, lmax_out: int, residual: bool) -> None:
        super().__init__()
        C, lsh = int(cfg.num_channels), int(cfg.lmax)
        lmax_msg = lsh if cfg.correlation > 1 else lmax_out
        self.linear_up = EquivariantLinear(C, C, lmax_in, lmax_in)
        self.conv = ConvTP(lmax_in, lsh, lmax_msg)
        n_out = self.conv.n_paths * C
        self.radial_kind = cfg.radial
        if cfg.radial == "spline":
            self.radial = SplineRadial(int(cfg.spline_knots), n_out)
        else:
            self.radial = MLPRadial(int(cfg.num_radial), list(cfg.radial_mlp), n_out)
        self.path_linear = PathLinear(C, C, lmax_in, lsh, lmax_msg)
        n_elem = len(cfg.elements) if cfg.contraction_per_element else 1
        self.contraction = SymmetricContraction(C, lmax_msg, lmax_out, int(cfg.correlation), n_elem)
        self.linear_out = EquivariantLinear(C, C, lmax_out, lmax_out)
        # the first layer has no skip: its input is the species embedding, a per-element constant,
        # and a skip of it would give an isolated atom an energy other than E0
        self.skip: torch.nn.Module | None = None
        if residual:
            self.skip = (SpeciesLinear(len(cfg.elements), C, C, lmax_in, lmax_out) if cfg.skip_per_element
                         else EquivariantLinear(C, C, lmax_in, lmax_out))
        self.mixing = None
        if cfg.mixing == "grid" and lmax_out > 0:
            self.mixing = GridMixing(C, lmax_out, hidden=cfg.grid_hidden, degree=cfg.grid_degree,
                                     activation=cfg.grid_activation)
        self.inv_avg = 1.0 / float(cfg.avg_num_neighbors or 1.0)
        self.C = C
        self.edge_chunk_size = None if cfg.edge_chunk_size is None else int(cfg.edge_chunk_size)

    def forward(
        self, backend: KernelBackend, h: torch.Tensor, edges: EdgeInputs, element: torch.Tensor,
        extra_scalars: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ops = backend.ops
        x = self.linear_up(h)
        if _spline_in_kernel(self.radial_kind, backend):
            table = self.radial.weight.view(-1, self.conv.n_paths, self.C)  # [K, P, C]
            m = ops.conv_tp_spline(x, edges.attrs, edges.spline_vals, edges.spline_idx, table, edges.sender,
                                   edges.receiver, x.shape[0], self.conv.lmax_in, self.conv.lmax_sh, self.conv.lmax_out)
        elif self.edge_chunk_size is not None and backend.edge_chunking:
            m = self._chunked_conv(ops, x, edges)
        else:
            m = self._edge_conv(ops, x, edges.attrs, edges.basis, edges.envelope, edges.sender, edges.receiver,
                                x.shape[0])
        m = m * self.inv_avg
        A = self.path_linear(m)  # [n, C, (lmax_msg+1)^2]
        out = self.linear_out(self.contraction(A, element, ops))  # ops.symmetric_contraction
        if isinstance(self.skip, SpeciesLinear):
            out = out + self.skip(h, element)
        elif self.skip is not None:
            out = out + self.skip(h)
        if extra_scalars is not None:
            # added to the l = 0 column, padded with zeros rather than sliced: a last layer keeps only
            # l = 0, and the empty slice of the other degrees broke torch.export's trace
            out = out + torch.nn.functional.pad(extra_scalars[:, :, None], (0, out.shape[-1] - 1))
        if self.mixing is not None:
            out = out + self.mixing(out, ops)  # quadratic: ops.grid_product (Gaunt product)
        return out

    def _edge_conv(
        self, ops: KernelOps, x: torch.Tensor, edge_attrs: torch.Tensor, radial_basis: torch.Tensor,
        envelope: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor, n_out: int,
    ) -> torch.Tensor:
        """Radial weights and convolution of a set of edges into ``n_out`` receiver rows.

        Shapes:
            x [n_atoms, C, (lmax_in+1)^2]; edge_attrs [E, (lmax_sh+1)^2]; radial_basis [E, K];
            envelope [E]; sender [E]; receiver [E] (in ``0..n_out-1``) -> [n_out, C, D_out].
        """
        # [E, P, C] in channel-major memory: the torch backend's convolution reads it per channel
        w = self.radial(radial_basis, envelope, groups=self.conv.n_paths)
        return ops.conv_tp(x, edge_attrs, w, sender, receiver, n_out,
                           self.conv.lmax_in, self.conv.lmax_sh, self.conv.lmax_out)

    def _chunked_conv(self, ops: KernelOps, x: torch.Tensor, edges: EdgeInputs) -> torch.Tensor:
        """:meth:`_edge_conv` over chunks of ``edge_chunk_size`` edges, each under activation checkpointing.

        Autograd keeps only each chunk's inputs (slices of the edge tensors, and ``x`` once); the
        per-edge weights, gathered features and messages ``[chunk, C, D]`` are recomputed chunk by
        chunk in the backward, which also works for the double backward of force training
        (non-reentrant checkpointing). A chunk writes only the receiver rows ``lo..hi`` it touches;
        the collate order sorts edges by receiver, so these ranges barely overlap, but any edge order
        gives the same sum. The pieces are summed into ``[n_atoms, C, D]`` by one ``index_add``.

        Shapes:
            x [n_atoms, C, (lmax_in+1)^2]; edges with ``basis`` -> [n_atoms, C, D_out].
        """
        from torch.utils.checkpoint import checkpoint

        n_edges, size = int(edges.sender.shape[0]), int(self.edge_chunk_size)
        parts, rows = [], []
        for s in range(0, n_edges, size):
            rec = edges.receiver[s : s + size]
            lo, hi = int(rec.min()), int(rec.max()) + 1
            part = checkpoint(self._edge_conv, ops, x, edges.attrs[s : s + size], edges.basis[s : s + size],
                              edges.envelope[s : s + size], edges.sender[s : s + size], rec - lo, hi - lo,
                              use_reentrant=False, preserve_rng_state=False)
            parts.append(part)  # [hi - lo, C, D_out]
            rows.append(torch.arange(lo, hi, device=rec.device))
        d_out = self.conv.out_dim
        out = x.new_zeros((x.shape[0], self.C, d_out))
        if not parts:  # no edges at all
            return out
        return out.index_add(0, torch.cat(rows), torch.cat(parts))


@register("equivariant")
class EquivariantModel(PotentialModel):
    """Equivariant message-passing potential (see module docstring).

    Shapes:
        forward(batch, edge_vec [n_edges, 3] Å) -> {"node_energy": [n_atoms] eV, "energy": [n_graphs] eV}.
    """

    Config = EquivariantConfig
    #: the default config is exactly O(3)-equivariant; each instance overrides this from its config
    #: (``False`` when a layer mixes on a SiLU grid or on a grid too coarse for the quadratic MLP),
    #: and :func:`mlip.train.equivariance.is_exact_by_construction` reads the instance
    exactly_equivariant = True

    def __init__(self, config: EquivariantConfig) -> None:
        super().__init__(config)
        _validate(config)
        cfg = config
        with seeded(cfg.seed):
            C = int(cfg.num_channels)
            lh = int(cfg.lmax if cfg.hidden_lmax is None else cfg.hidden_lmax)
            self.embedding = SpeciesEmbedding(list(cfg.elements), C)
            self.charge_spin = ChargeSpinEmbedding.for_config(cfg, C)
            self.envelope = PolynomialEnvelope(cfg.r_max, int(cfg.envelope_p))
            if cfg.radial == "spline":
                self.radial_basis: torch.nn.Module = SplineBasis(cfg.r_max, int(cfg.spline_knots))
            else:
                self.radial_basis = BesselBasis(cfg.r_max, int(cfg.num_radial))
            L = int(cfg.num_layers)
            self.layers = torch.nn.ModuleList()
            self.readouts = torch.nn.ModuleList()
            n_heads = len(cfg.heads)
            for i in range(L):
                last = i == L - 1
                self.layers.append(InteractionBlock(cfg, 0 if i == 0 else lh, 0 if last else lh, residual=i > 0))
                self.readouts.append(MLPReadout(C, int(cfg.readout_hidden), n_heads) if last else LinearReadout(C, n_heads))
        self.atomic_energies = AtomicEnergies(cfg.e0s, list(cfg.heads), list(cfg.elements), cfg.scale, cfg.shift,
                                              bool(cfg.shift_by_coordination))
        self.exactly_equivariant = all(layer.mixing is None or layer.mixing.exact for layer in self.layers)
        #: the :class:`~mlip.kernels.KernelBackend` every product layer runs on, resolved from
        #: ``config.kernel`` for the parameters' device and dtype; ``None`` where the named backend
        #: cannot run (``kernel_unavailable`` says why)
        self.kernel_backend: KernelBackend | None = None
        self.kernel_unavailable: str | None = None
        check_buildable(cfg.kernel, int(cfg.lmax))  # what no move or cast fixes (lmax, triton missing) fails now
        self._resolve_kernel_backend()

    def _resolve_kernel_backend(self) -> None:
        """Select ``kernel_backend`` for where the parameters are, in their dtype.

        An explicit backend that cannot run on this device or in this dtype is not an error yet: a
        ``kernel: triton`` model is built on the CPU and then moved to a GPU (what no move fixes raised
        at build, ``check_buildable``; ``load_model`` raises for the device it loads onto). ``forward``
        raises the reason if it runs here.
        """
        p = self.embedding.weight
        try:
            self.kernel_backend = select_backend(self.config.kernel, p.device, p.dtype, int(self.config.lmax))
            self.kernel_unavailable = None
        except BackendUnavailableError as err:
            self.kernel_backend, self.kernel_unavailable = None, str(err)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> EquivariantModel:
        # .to(), .cuda(), .cpu(), .double(), .float(), .half() all move or cast through here: the
        # backend follows the parameters' new device and dtype
        out = super()._apply(fn, recurse)
        self._resolve_kernel_backend()
        return out

    def set_edge_chunk_size(self, edge_chunk_size: int | None) -> None:
        """Turn edge chunking on (``N`` edges per chunk) or off (``None``) on a built or loaded model.

        Updates ``config.edge_chunk_size`` (so a later save keeps it) and every layer; the weights and
        the results do not change (see :class:`EquivariantConfig`).
        """
        cfg = dataclasses.replace(self.config, edge_chunk_size=edge_chunk_size)
        _validate(cfg)
        self.config.edge_chunk_size = cfg.edge_chunk_size
        for layer in self.layers:
            layer.edge_chunk_size = None if edge_chunk_size is None else int(edge_chunk_size)

    def forward(self, batch: GraphBatch, edge_vec: torch.Tensor) -> dict[str, torch.Tensor]:
        sender, receiver = batch.edge_index[0], batch.edge_index[1]
        n_atoms, n_graphs = batch.n_atoms, batch.n_graphs
        element = self.embedding.index(batch.numbers)  # [n_atoms]
        if bool((element < 0).any()):
            self.check_batch(batch)
        h = self.embedding.weight[element].to(edge_vec.dtype)[:, :, None]  # [n_atoms, C, 1]
        extra = None
        if self.charge_spin is not None:
            extra = self.charge_spin.per_atom(batch, edge_vec.dtype)
            h = h + extra[:, :, None]
        r = edge_vec.norm(dim=-1)  # [n_edges]
        edge_attrs = spherical_harmonics(int(self.config.lmax), edge_vec)  # [n_edges, (lmax+1)^2]
        envelope = self.envelope(r)
        backend = self.kernel_backend
        if backend is None:
            raise BackendUnavailableError(self.kernel_unavailable)
        if not backend.is_reference:
            # compared with the reference once per (device, dtype), then a set lookup
            backend_check.ensure_checked(self, edge_vec.device, edge_vec.dtype)
        if _spline_in_kernel(self.config.radial, backend):
            # the kernel evaluates the spline per edge: 4 basis values and a knot index, not [E, K]
            vals, idx = spline_coefficients(r, float(self.config.r_max), int(self.config.spline_knots))
            edges = EdgeInputs(edge_attrs, envelope, sender, receiver, spline_vals=vals * envelope[:, None], spline_idx=idx)
        else:
            edges = EdgeInputs(edge_attrs, envelope, sender, receiver, basis=self.radial_basis(r))
        graph_head = head_index(self.config.heads, batch.head, device=element.device)
        atom_head = graph_head[batch.batch]
        node_energy = torch.zeros(n_atoms, dtype=edge_vec.dtype, device=edge_vec.device)
        for i, (layer, readout) in enumerate(zip(self.layers, self.readouts)):
            h = layer(backend, h, edges, element, extra_scalars=extra if i == 0 else None)
            node_energy = node_energy + select_head(readout(h[:, :, 0]), atom_head)
        node_energy = self.finish_node_energy(node_energy, element, atom_head, batch, r, envelope)
        energy = scatter_sum(node_energy, batch.batch, n_graphs)
        return {"node_energy": node_energy, "energy": energy}


def num_parameters(model: torch.nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["EdgeInputs", "EquivariantConfig", "EquivariantModel", "InteractionBlock", "num_parameters"]
