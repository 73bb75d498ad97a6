"""Per-atom inputs: species embedding and the total charge / spin multiplicity embedding.

:func:`check_charge_spin` refuses structures whose charge/spin are missing or impossible,
instead of silently assuming a neutral singlet.
"""
from __future__ import annotations

import math

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


def check_charge_spin(
    numbers: torch.Tensor, batch: torch.Tensor, charge: torch.Tensor, spin: torch.Tensor, n_graphs: int
) -> None:
    """Raise ``ValueError`` unless every structure has a possible (charge, multiplicity) pair.

    Rules: charge and multiplicity finite integers, multiplicity ``>= 1``, and
    ``n_electrons - (multiplicity - 1)`` even with ``n_electrons = sum(Z) - charge``.

    Shapes:
        numbers, batch [n_atoms]; charge, spin [n_graphs] (spin = multiplicity 2S+1).
    """
    zsum = torch.zeros(n_graphs, dtype=torch.float64, device=numbers.device)
    zsum.index_add_(0, batch, numbers.to(torch.float64))
    q = charge.detach().to(torch.float64).cpu()
    s = spin.detach().to(torch.float64).cpu()
    zsum = zsum.cpu()
    for g in range(n_graphs):
        qg, sg, zg = float(q[g]), float(s[g]), int(zsum[g])
        where = f"structure {g} in the batch (charge={qg}, spin multiplicity={sg})"
        if not (math.isfinite(qg) and math.isfinite(sg)):
            raise ValueError(
                f"{where}: this model was trained with total charge and spin; give both "
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


class ChargeSpinEmbedding(torch.nn.Module):
    """Total charge and spin multiplicity of each structure -> ``num_channels`` scalars.

    A bias-free SiLU MLP of ``(charge, multiplicity - 1)``; the same vector goes to every atom
    of the structure.

    Shapes:
        charge, spin [n_graphs] -> [n_graphs, num_channels].
    """

    def __init__(self, num_channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(2, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, num_channels) / math.sqrt(hidden))

    def forward(self, charge: torch.Tensor, spin: torch.Tensor) -> torch.Tensor:
        x = torch.stack([charge, spin - 1.0], dim=-1).to(self.w1.dtype)
        return torch.nn.functional.silu(x @ self.w1) @ self.w2
