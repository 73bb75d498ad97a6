"""Per-atom inputs: species embedding and the total charge / spin multiplicity embedding.

Which structures read their total charge and spin is decided here, per head, for every family
(:func:`reads_charge_spin`): a model config's ``use_charge_spin`` switches the embedding on, and
``charge_spin_heads`` (unset: every head) names the heads whose structures read it, e.g. the
molecules' head of a run that mixes OMol25-style molecules with MPTrj-style crystals.
:func:`check_charge_spin` refuses those structures when their charge/spin are missing or
impossible, instead of silently assuming a neutral singlet; the other heads' structures may leave
them missing and get no charge/spin contribution.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


class SpeciesEmbedding(torch.nn.Module):
    """Atomic number -> ``num_channels`` scalars (one learnable vector per known element).

    Shapes:
        numbers [n_atoms] (atomic numbers Z) -> [n_atoms, num_channels].
    """

    def __init__(self, elements: list[int], num_channels: int) -> None:
        super().__init__()
        if not elements:
            raise ValueError("the model needs a non-empty list of elements (atomic numbers)")
        self.elements = [int(z) for z in elements]
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("z_index", table, persistent=False)
        self.weight = torch.nn.Parameter(torch.randn(len(self.elements), num_channels))

    def index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Row of each atom's element in ``elements`` (``[n_atoms]``, int64)."""
        return self.z_index[numbers]

    def forward(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.weight[self.index(numbers)]


def reads_charge_spin(config: Any, heads: Sequence[str]) -> list[bool]:
    """Whether each structure, by its head name, reads its total charge and spin under a model config.

    ``use_charge_spin`` false: none. True with ``charge_spin_heads`` unset (``None``, as in models
    saved before the field existed): every structure. Otherwise the structures whose head is
    listed; a single-head model evaluates every structure with its one head (as
    :func:`mlip.nn.readout.head_index` does), so all of them. A config without these fields (an
    exported package's namespace, a test model) counts them as unset.

    Shapes: heads: n_graphs names -> n_graphs flags.
    """
    if not getattr(config, "use_charge_spin", False):
        return [False] * len(heads)
    listed = getattr(config, "charge_spin_heads", None)
    if listed is None or len(getattr(config, "heads", None) or ["default"]) == 1:
        return [True] * len(heads)
    return [h in listed for h in heads]


def check_charge_spin_config(config: Any) -> None:
    """Raise ``ValueError`` if ``charge_spin_heads`` names a head the model lacks, lists none while
    ``use_charge_spin`` is true, or lists some while it is false."""
    listed = getattr(config, "charge_spin_heads", None)
    if listed is None:
        return
    if not getattr(config, "use_charge_spin", False):
        if listed:
            raise ValueError(f"charge_spin_heads {list(listed)} is set but use_charge_spin is false")
        return
    heads = list(getattr(config, "heads", None) or ["default"])
    unknown = [h for h in listed if h not in heads]
    if not listed or unknown:
        raise ValueError(f"charge_spin_heads {list(listed)} must name some of the model's heads {heads} "
                         "(leave it unset for every head, or set use_charge_spin: false for none)")


def check_charge_spin(
    numbers: torch.Tensor, batch: torch.Tensor, charge: torch.Tensor, spin: torch.Tensor, n_graphs: int,
    heads: Sequence[str] | None = None, used: Sequence[bool] | None = None,
) -> None:
    """Raise ``ValueError`` unless every structure checked has a possible (charge, multiplicity) pair.

    Rules: charge and multiplicity finite integers, multiplicity ``>= 1``, and
    ``n_electrons - (multiplicity - 1)`` even with ``n_electrons = sum(Z) - charge``.

    Args:
        heads: each structure's head, named in the error when given.
        used: which structures to check (default: all), see :func:`reads_charge_spin`.

    Shapes:
        numbers, batch [n_atoms]; charge, spin [n_graphs] (spin = multiplicity 2S+1).
    """
    zsum = torch.zeros(n_graphs, dtype=torch.float64, device=numbers.device)
    zsum.index_add_(0, batch, numbers.to(torch.float64))
    q = charge.detach().to(torch.float64).cpu()
    s = spin.detach().to(torch.float64).cpu()
    zsum = zsum.cpu()
    for g in range(n_graphs):
        if used is not None and not used[g]:
            continue
        qg, sg, zg = float(q[g]), float(s[g]), int(zsum[g])
        where = f"structure {g} in the batch (charge={qg}, spin multiplicity={sg})"
        if not (math.isfinite(qg) and math.isfinite(sg)):
            trained = "this model was" if heads is None else f"head {heads[g]!r} of this model was"
            raise ValueError(
                f"{where}: {trained} trained with total charge and spin; give both "
                "(atoms.info['charge'], atoms.info['spin']) rather than leaving them missing"
            )
        if qg != round(qg):
            raise ValueError(f"{where}: total charge must be an integer")
        if sg != round(sg) or sg < 1:
            raise ValueError(f"{where}: spin multiplicity 2S+1 must be an integer >= 1")
        n_el = zg - round(qg)
        if n_el < 0:
            raise ValueError(f"{where}: charge exceeds the total nuclear charge {zg}")
        if (n_el - (round(sg) - 1)) % 2 != 0:
            raise ValueError(
                f"{where}: impossible pair, {n_el} electrons cannot have multiplicity {round(sg)} "
                "(n_electrons - (multiplicity - 1) must be even)"
            )


def check_batch_charge_spin(config: Any, batch: Any) -> list[bool]:
    """:func:`check_charge_spin` on the structures of ``batch`` (a ``GraphBatch``) that read their
    charge and spin under ``config`` (naming the head in the error when the config lists heads).

    Returns:
        Those structures' flags, n_graphs bools (:func:`reads_charge_spin`).
    """
    used = reads_charge_spin(config, batch.head)
    if any(used):
        per_head = getattr(config, "charge_spin_heads", None) is not None
        check_charge_spin(batch.numbers, batch.batch, batch.charge, batch.spin, batch.n_graphs,
                          batch.head if per_head else None, used)
    return used


class ChargeSpinEmbedding(torch.nn.Module):
    """Total charge and spin multiplicity of each structure -> ``num_channels`` scalars.

    A bias-free SiLU MLP of ``(charge, multiplicity - 1)``; the same vector goes to every atom
    of the structure (:meth:`per_atom`, which applies the model config's per-head choice).

    Shapes:
        charge, spin [n_graphs] -> [n_graphs, num_channels].
    """

    def __init__(self, num_channels: int, config: Any, hidden: int = 32) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(2, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, num_channels) / math.sqrt(hidden))
        #: the model config whose ``use_charge_spin``, ``charge_spin_heads`` and ``heads`` decide
        #: which structures read the embedding (:func:`reads_charge_spin`)
        self.config = config

    @classmethod
    def for_config(cls, config: Any, num_channels: int) -> ChargeSpinEmbedding | None:
        """The embedding a family's config asks for: ``None`` without ``use_charge_spin``.

        Raises:
            ValueError: an inconsistent ``charge_spin_heads`` (:func:`check_charge_spin_config`).
        """
        check_charge_spin_config(config)
        return cls(num_channels, config) if config.use_charge_spin else None

    def forward(self, charge: torch.Tensor, spin: torch.Tensor) -> torch.Tensor:
        x = torch.stack([charge, spin - 1.0], dim=-1).to(self.w1.dtype)
        return torch.nn.functional.silu(x @ self.w1) @ self.w2

    def per_atom(self, batch: Any, dtype: torch.dtype) -> torch.Tensor:
        """Each atom's structure embedding, zero where the structure's head reads no charge and spin.

        Such structures' charge and spin (NaN when missing, or any value) are not looked at, so their
        prediction does not depend on them. The others are checked (:func:`check_charge_spin`).

        Shapes: batch a ``GraphBatch`` (numbers, batch [n_atoms]; charge e, spin 2S+1 [n_graphs];
        head: n_graphs names) -> [n_atoms, num_channels] in ``dtype``.
        """
        used = check_batch_charge_spin(self.config, batch)
        charge, spin = batch.charge.to(dtype), batch.spin.to(dtype)
        if all(used):
            return self(charge, spin)[batch.batch]
        mask = torch.tensor(used, device=charge.device)
        # a neutral singlet in place of the unread values keeps NaN out of the weights' gradients;
        # the mask makes their contribution exactly zero whatever the MLP gives for it
        emb = self(torch.where(mask, charge, 0.0), torch.where(mask, spin, 1.0))
        return torch.where(mask[:, None], emb, 0.0)[batch.batch]
