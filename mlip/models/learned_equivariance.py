"""The ``learned-equivariance`` family: a plain, non-equivariant transformer with atoms as tokens
that *learns* rotation symmetry through a loss in its embedding space (TransIP, Elhag et al.,
"Learning Inter-Atomic Potentials without Explicit Equivariance", arXiv 2510.00027).

Architecture. Tokens start from a species embedding (plus a total charge / spin multiplicity
embedding for OMol25-like data). Geometry enters non-equivariantly: each edge gets an embedding of
its raw Cartesian components ``edge_vec / r_max`` and of its length through a Bessel basis with a
smooth envelope; per layer, the edge embedding gives attention biases and value offsets of a
neighbour-restricted pre-norm transformer block (:mod:`mlip.nn.attention`). Translation invariance
is exact (relative vectors only), permutation invariance exact (a graph network), rotation symmetry
is *not* built in.

Symmetry modes (``symmetry_mode``), all acting only while the module is in training mode:

- ``"none"``: train on the data as given;
- ``"augment"``: rotation augmentation baseline: each structure is seen under a fresh random
  rotation ``R1`` at every step. Rotating the edge vectors inside ``forward`` is the same as rotating
  the structure and its force/stress labels, because forces and stress come from autograd through
  ``E(R1 x)`` in the original frame;
- ``"learned"``: augmentation as above **plus** the TransIP embedding-alignment loss. For a second
  random rotation ``R2`` per structure, the features ``h_l(x)`` and ``h_l(R2 x)`` of every block
  ``l`` are computed, and a learned transformation network ``T_l(h, R)`` conditioned on the nine
  entries of ``R`` is trained to predict the latter from the former:

      L_align = w / L * sum_l sum_{P in (inv, rest)} mean |P[T_l(h_l(x), R2) - h_l(R2 x)]|^2
                                                   / mean |P[h_l(R2 x) - h_l^iso]|^2

  over the invariant channels and the other channels separately, ``h_l^iso`` being the features
  the atom would have without neighbours (the denominators are detached: they remove the trivial
  minimum of shrinking all features, and keep the small invariant block from being drowned by the
  rest; subtracting ``h^iso`` measures the error against the part of the features that the
  neighbours create, which is what the energy reads, rather than against the species embedding
  that dominates ``|h|``). ``T_l(h, R) = h + mask * W2[(W1 h) * g(R)]``: the
  multiplicative conditioning can represent maps linear in ``R`` (the ``l = 1`` representation) and,
  through ``g``'s MLP, more. ``mask`` is zero on the first ``invariant_channels`` channels: there
  ``T`` is the identity (the trivial representation), and the energy head reads only those channels,
  so the alignment loss directly pushes per-atom energies toward invariance while the other
  channels are free to learn any R-dependent representation. By default both branches receive
  gradients (the rotated branch is also a training sample); ``alignment_stop_grad`` detaches the
  target ``h_l(R2 x)`` instead (BYOL-style). ``forward`` returns the term as ``aux_loss`` (a 0-d
  tensor, already weighted by ``equivariance_loss_weight``), which a training loop adds to the
  energy/force loss.

Readout: a bias-free MLP of the invariant channels, minus the same MLP applied to the features an
isolated atom would have (the blocks' feed-forward halves alone), so an isolated atom has exactly
``E0`` (the shift is weighted by its bond count); then scale/shift and per-element, per-head E0s. Forces and stress are conservative
by autograd in :mod:`mlip.models.outputs`; ``direct_forces`` adds a force head whose output is
returned as ``forces`` (*not* the gradient of the energy: non-conservative, drifts in NVE).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mlip.data.graph import GraphBatch
from mlip.models.base import PotentialModel, register, seeded
from mlip.nn.attention import TransformerBlock
from mlip.nn.embedding import ChargeSpinEmbedding, SpeciesEmbedding
from mlip.nn.radial import BesselBasis, PolynomialEnvelope
from mlip.nn.readout import AtomicEnergies, MLPReadout, head_index, select_head
from mlip.nn.scatter import scatter_sum

SYMMETRY_MODES = ("learned", "augment", "none")
ATTENTION = ("edge", "dense")


@dataclass
class LearnedEquivarianceConfig:
    """Hyperparameters of the ``learned-equivariance`` family (a plain dict/YAML maps onto these).

    ``symmetry_mode`` is ``"learned"`` (augmentation + embedding alignment loss weighted by
    ``equivariance_loss_weight``), ``"augment"`` (random rotations only) or ``"none"``.
    ``invariant_channels`` (default ``num_channels // 2``; 0 = none) are the channels on which the
    transformation network is the identity and which the energy head reads. ``attention`` is
    ``"edge"`` (edge-wise scatter softmax; any structure) or ``"dense"`` (one fused
    ``scaled_dot_product_attention`` call per block over the padded structures of the batch, the
    same result; needs ``edge_values: false`` and ``edge_gates: false``; memory O(n_graphs n_max^2):
    for small molecules). ``edge_gates`` multiplies each neighbour's key and value by a function of
    the edge (:class:`mlip.nn.attention.NeighborAttention`); model files written before the option
    load with ``false``.
    ``direct_forces`` adds a non-conservative force head (``forward`` then also returns ``forces``).
    """

    r_max: float = 5.0
    elements: list = field(default_factory=list)
    num_channels: int = 64
    num_heads: int = 4
    num_layers: int = 4
    mlp_ratio: float = 2.0
    num_radial: int = 8
    envelope_p: int = 5
    edge_values: bool = True
    edge_gates: bool = True
    attention: str = "edge"
    readout_hidden: int = 32
    invariant_channels: int | None = None
    symmetry_mode: str = "learned"
    equivariance_loss_weight: float = 1.0e4
    transform_hidden: int = 64
    alignment_stop_grad: bool = False
    use_charge_spin: bool = False
    charge_spin_heads: list | None = None
    direct_forces: bool = False
    heads: list = field(default_factory=lambda: ["default"])
    e0s: Any = None
    scale: float = 1.0
    shift: float = 0.0
    shift_by_coordination: bool = True
    pair_repulsion: bool = False  # add ZBL repulsion below covalent bond lengths (mlip.nn.repulsion)
    seed: int | None = 0


def _validate(cfg: LearnedEquivarianceConfig) -> None:
    name = "learned-equivariance"
    if cfg.symmetry_mode not in SYMMETRY_MODES:
        raise ValueError(f"{name}: symmetry_mode must be one of {SYMMETRY_MODES}, got {cfg.symmetry_mode!r}")
    if cfg.attention not in ATTENTION:
        raise ValueError(f"{name}: attention must be one of {ATTENTION}, got {cfg.attention!r}")
    if cfg.attention == "dense" and (cfg.edge_values or cfg.edge_gates):
        raise ValueError(f"{name}: attention='dense' (SDPA) needs edge_values: false and edge_gates: false")
    if int(cfg.num_layers) < 1:
        raise ValueError(f"{name}: num_layers must be >= 1, got {cfg.num_layers}")
    if int(cfg.num_channels) % int(cfg.num_heads):
        raise ValueError(f"{name}: num_channels={cfg.num_channels} must be divisible by num_heads={cfg.num_heads}")
    inv = cfg.invariant_channels
    if inv is not None and not 0 <= int(inv) <= int(cfg.num_channels):
        raise ValueError(f"{name}: invariant_channels must be in 0..num_channels, got {inv}")
    if float(cfg.equivariance_loss_weight) < 0:
        raise ValueError(f"{name}: equivariance_loss_weight must be >= 0, got {cfg.equivariance_loss_weight}")
    if not cfg.heads:
        raise ValueError(f"{name}: heads must list at least one head name")


def _mlp(sizes: list[int], bias: bool = True) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(torch.nn.SiLU())
    return torch.nn.Sequential(*layers)


def random_rotations(n: int, dtype: torch.dtype, device: torch.device | str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` uniformly random proper rotations from normalised Gaussian quaternions (torch RNG).

    Shapes: -> [n, 3, 3] (``det = +1``).
    """
    q = torch.randn(n, 4, dtype=torch.float64, generator=generator).to(device)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).view(n, 3, 3)
    return R.to(dtype)


def rotate_rows(vec: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Row vectors ``v -> R v`` with one rotation per row: ``[n, 3], [n, 3, 3] -> [n, 3]``."""
    return torch.einsum("nij,nj->ni", rotation, vec)


class RotationTransform(torch.nn.Module):
    """The learned transformation network ``T(h, R) = h + mask * W2[(W1 h) * g(R)]``.

    ``g(R) = A vec(R) + MLP(vec(R))``; ``mask`` is 0 on the first ``invariant_channels``
    channels (identity there) and 1 elsewhere.

    Shapes:
        h [n_atoms, C]; rotation [n_atoms, 3, 3] -> [n_atoms, C].
    """

    def __init__(self, num_channels: int, hidden: int, invariant_channels: int) -> None:
        super().__init__()
        C = int(num_channels)
        self.w_in = torch.nn.Linear(C, hidden, bias=False)
        self.r_linear = torch.nn.Linear(9, hidden, bias=False)
        self.r_mlp = _mlp([9, hidden, hidden])
        self.w_out = torch.nn.Linear(hidden, C, bias=False)
        mask = torch.ones(C)
        mask[: int(invariant_channels)] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, h: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        r = rotation.reshape(-1, 9).to(h.dtype)
        g = self.r_linear(r) + self.r_mlp(r)  # [n, hidden]
        return h + self.mask.to(h.dtype) * self.w_out(self.w_in(h) * g)


@register("learned-equivariance")
class LearnedEquivarianceModel(PotentialModel):
    """Non-equivariant neighbour-attention transformer with learned rotation symmetry (see the
    module docstring).

    ``forward(batch, edge_vec)`` returns ``node_energy`` [n_atoms] and ``energy`` [n_graphs] in eV
    (E0s included); in training mode with ``symmetry_mode="learned"`` also ``aux_loss`` (0-d, the
    weighted alignment loss); with ``direct_forces`` also ``forces`` [n_atoms, 3] eV/Å from the
    (non-conservative) force head.

    Shapes:
        edge_vec [n_edges, 3] Å.
    """

    Config = LearnedEquivarianceConfig
    #: rotation symmetry is learned, never exact: evaluation measures it
    exactly_equivariant = False

    def __init__(self, config: LearnedEquivarianceConfig) -> None:
        super().__init__(config)
        _validate(config)
        cfg = config
        C = int(cfg.num_channels)
        self.n_inv = C // 2 if cfg.invariant_channels is None else int(cfg.invariant_channels)
        n_read = self.n_inv if self.n_inv > 0 else C
        with seeded(cfg.seed):
            K = int(cfg.num_radial)
            self.embedding = SpeciesEmbedding(list(cfg.elements), C)
            self.charge_spin = ChargeSpinEmbedding.for_config(cfg, C)
            self.envelope = PolynomialEnvelope(cfg.r_max, int(cfg.envelope_p))
            self.radial_basis = BesselBasis(cfg.r_max, K)
            self.edge_embedding = _mlp([K + 3, C, C])
            self.blocks = torch.nn.ModuleList([
                TransformerBlock(C, int(cfg.num_heads), C, float(cfg.mlp_ratio), bool(cfg.edge_values),
                                 bool(cfg.edge_gates))
                for _ in range(int(cfg.num_layers))
            ])
            self.readout = MLPReadout(n_read, int(cfg.readout_hidden), len(cfg.heads))
            self.force_head = _mlp([C, C, 3], bias=False) if cfg.direct_forces else None
            self.transforms = None
            if cfg.symmetry_mode == "learned":
                self.transforms = torch.nn.ModuleList([
                    RotationTransform(C, int(cfg.transform_hidden), self.n_inv) for _ in range(int(cfg.num_layers))
                ])
        self.atomic_energies = AtomicEnergies(cfg.e0s, list(cfg.heads), list(cfg.elements), cfg.scale, cfg.shift,
                                              bool(cfg.shift_by_coordination))

    @property
    def direct_forces(self) -> bool:
        return bool(self.config.direct_forces)

    # ------------------------------------------------------------------ features
    def initial_features(self, batch: GraphBatch, element: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Token embeddings ``[n_atoms, C]``: species (+ charge/spin of the structure)."""
        h0 = self.embedding.weight[element].to(dtype)
        if self.charge_spin is not None:
            h0 = h0 + self.charge_spin.per_atom(batch, dtype)
        return h0

    def features(self, batch: GraphBatch, edge_vec: torch.Tensor, h0: torch.Tensor) -> list[torch.Tensor]:
        """Features after each block, ``num_layers`` tensors ``[n_atoms, C]``.

        Shapes: edge_vec [n_edges, 3] Å (in whatever frame the model should see); h0 [n_atoms, C].
        """
        sender, receiver = batch.edge_index[0], batch.edge_index[1]
        r = edge_vec.norm(dim=-1)  # [n_edges]
        envelope = self.envelope(r)
        edge_in = torch.cat([self.radial_basis(r) * envelope[:, None], edge_vec / self.r_max], dim=-1)
        edge_feats = self.edge_embedding(edge_in)  # [n_edges, C], not rotation-invariant on purpose
        dense = self.config.attention == "dense"
        graph = batch.batch if dense else None  # dense: one fused SDPA call per block over the batch
        h, out = h0, []
        for block in self.blocks:
            h = block(h, edge_feats, envelope, sender, receiver, graph, batch.n_graphs)
            out.append(h)
        return out

    def isolated_features(self, element: torch.Tensor, h0: torch.Tensor, all_layers: bool = False
                          ) -> torch.Tensor | list[torch.Tensor]:
        """Features an atom would have without neighbours (attention contributes 0): after the last
        block, or after every block with ``all_layers``.

        Shapes: element [n_atoms]; h0 [n_atoms, C] -> [n_atoms, C] (a list of ``num_layers`` of them).
        """
        table = self.charge_spin is None  # depends on the element only: run the small table
        x = self.embedding.weight.to(h0.dtype) if table else h0
        out = []
        for block in self.blocks:
            x = block.feed_forward(x)
            out.append(x[element] if table else x)
        return out if all_layers else out[-1]

    def _readout_input(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, : self.n_inv] if self.n_inv > 0 else h

    # ------------------------------------------------------------------ forward
    def forward(self, batch: GraphBatch, edge_vec: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        dtype, device = edge_vec.dtype, edge_vec.device
        n_graphs = batch.n_graphs
        receiver = batch.edge_index[1]
        element = self.embedding.index(batch.numbers)  # [n_atoms]
        if bool((element < 0).any()):
            self.check_batch(batch)
        h0 = self.initial_features(batch, element, dtype)

        rotate = self.training and cfg.symmetry_mode in ("augment", "learned")
        vec = edge_vec
        if rotate:  # augmentation: the model sees R1 x; autograd returns forces in the lab frame
            R1 = random_rotations(n_graphs, dtype, device)
            vec = rotate_rows(edge_vec, R1[batch.batch[receiver]])
        hs = self.features(batch, vec, h0)
        h_iso = self.isolated_features(element, h0)

        graph_head = head_index(cfg.heads, batch.head, device=element.device)
        atom_head = graph_head[batch.batch]
        e = self.readout(self._readout_input(hs[-1])) - self.readout(self._readout_input(h_iso))
        r = edge_vec.norm(dim=-1)
        node_energy = self.finish_node_energy(select_head(e, atom_head), element, atom_head, batch, r, self.envelope(r))
        out = {"node_energy": node_energy, "energy": scatter_sum(node_energy, batch.batch, n_graphs)}
        if self.force_head is not None:
            f = self.force_head(hs[-1] - h_iso)  # [n_atoms, 3] in the frame the model saw
            out["forces"] = rotate_rows(f, R1[batch.batch].transpose(1, 2)) if rotate else f
        if self.training and self.transforms is not None and float(cfg.equivariance_loss_weight) > 0:
            out["aux_loss"] = float(cfg.equivariance_loss_weight) * self.alignment_loss(batch, vec, h0, hs)
        return out

    def alignment_loss(self, batch: GraphBatch, edge_vec: torch.Tensor, h0: torch.Tensor,
                       hs: list[torch.Tensor] | None = None, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """Unweighted embedding alignment loss (module docstring) for random rotations, one per
        structure (or the given ``rotation`` [n_graphs, 3, 3]).

        Shapes: edge_vec [n_edges, 3] Å; h0 [n_atoms, C]; hs: :meth:`features` of ``edge_vec``.
        """
        if self.transforms is None:
            raise ValueError("alignment_loss needs symmetry_mode='learned' (the transformation networks)")
        if hs is None:
            hs = self.features(batch, edge_vec, h0)
        R2 = rotation if rotation is not None else random_rotations(batch.n_graphs, edge_vec.dtype, edge_vec.device)
        R2 = R2.to(edge_vec.dtype)
        hs_rot = self.features(batch, rotate_rows(edge_vec, R2[batch.batch[batch.edge_index[1]]]), h0)
        R_atom = R2[batch.batch]  # [n_atoms, 3, 3]
        element = self.embedding.index(batch.numbers)
        isolated = self.isolated_features(element, h0, all_layers=True)
        total = edge_vec.new_zeros(())
        k = self.n_inv
        for T, h, h_rot, h_iso in zip(self.transforms, hs, hs_rot, isolated):
            target = h_rot.detach() if self.config.alignment_stop_grad else h_rot
            sq = (T(h, R_atom) - target).square()  # [n_atoms, C]
            # normalised by the part of the target that neighbours create (what the energy reads:
            # E ~ readout(h) - readout(h_iso)), not by |h|^2, which the species embedding dominates
            scale = (target - h_iso).detach().square()
            # invariant and transformed channels normalised separately, so neither dominates
            for sl in (slice(0, k), slice(k, None)):
                if sq[:, sl].numel():
                    total = total + sq[:, sl].mean() / (scale[:, sl].mean() + 1e-12)
        return total / len(hs)


def num_parameters(model: torch.nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "LearnedEquivarianceConfig", "LearnedEquivarianceModel", "RotationTransform", "num_parameters",
    "random_rotations", "rotate_rows",
]
