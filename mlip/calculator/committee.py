"""A committee of models: the mean prediction and the spread between members (an uncertainty estimate).

Members trained on the same data from different random initialisations (the ``seed`` of the model
and training configs) agree where the data constrain them and disagree elsewhere; the spread of
their forces is the usual trigger for active learning (DP-GEN's "model deviation").
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from mlip.data.graph import GraphBatch

__all__ = ["Committee"]


class Committee:
    """Several models evaluated on the same batch.

    Args:
        models: two or more loaded models (:class:`~mlip.models.base.PotentialModel`, or exported
            packages, see :mod:`mlip.export`), all with the same cutoff ``r_max``: they share one
            neighbour list.

    :meth:`predict_batch` returns the committee mean of ``energy``, ``node_energy``, ``forces``,
    ``stress`` and ``virial`` (so forces stay the gradient of the mean energy), and the spread:
    ``energy_std`` [n_graphs] eV (population standard deviation over members) and ``forces_std``
    [n_atoms] eV/Å, ``sqrt(mean_k |F_k,i - mean F_i|²)`` for atom ``i`` (the norm of the per-component
    standard deviations).

    Raises:
        ValueError: fewer than two models, or members with different ``r_max``.
    """

    def __init__(self, models: Sequence[Any]) -> None:
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"a committee needs at least two models, got {len(models)}")
        cutoffs = sorted({float(m.r_max) for m in models})
        if len(cutoffs) > 1:
            raise ValueError(f"committee members must share r_max (one neighbour list); got {cutoffs} Å")
        self.models = models
        self.r_max = cutoffs[0]
        # every member must know an element: the committee knows the elements common to all
        self.elements = sorted(set.intersection(*(set(m.elements) for m in models)))
        # charge and spin: mlip.calculator.inference.uses_charge_spin asks every member
        self.config = SimpleNamespace(r_max=self.r_max, elements=self.elements)

    def __len__(self) -> int:
        return len(self.models)

    def check_batch(self, batch: GraphBatch) -> None:
        """Every member's element check (the first unknown element raises, naming it)."""
        for model in self.models:
            model.check_batch(batch)

    def predict_batch(self, batch: GraphBatch, forces: bool = True, stress: bool = False) -> dict[str, torch.Tensor]:
        """Mean outputs and spread of the members on ``batch`` (see the class docstring for keys and shapes)."""
        from mlip.calculator.ase import evaluate_model

        outs = [{k: v.detach() for k, v in evaluate_model(m, batch, forces=forces, stress=stress).items()}
                for m in self.models]
        keys = [k for k in ("energy", "node_energy", "forces", "stress", "virial") if all(k in o for o in outs)]
        stacked = {k: torch.stack([o[k] for o in outs]) for k in keys}  # [n_models, ...]
        result = {k: v.mean(0) for k, v in stacked.items()}
        result["energy_std"] = stacked["energy"].std(0, correction=0)
        if "forces" in stacked:
            dev = stacked["forces"] - result["forces"]  # [n_models, n_atoms, 3]
            result["forces_std"] = (dev * dev).sum(-1).mean(0).sqrt()
        return result
