"""Stress in a batch that mixes a molecule (no cell: NaN stress) with a crystal: the crystal's stress
trains with finite gradients."""
from __future__ import annotations

import torch
from ase.build import bulk, molecule

from mlip.data.graph import collate
from mlip.data.transforms import atoms_to_graph
from mlip.models.base import build_model
from mlip.models.outputs import predict


def test_molecule_next_to_a_crystal_keeps_stress_gradients_finite():
    model = build_model("equivariant", {"r_max": 4.0, "num_channels": 8, "lmax": 1, "num_layers": 1,
                                        "elements": [1, 6, 29], "avg_num_neighbors": 10.0}).double().train()
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.rattle(0.05, seed=0)
    batch = collate([atoms_to_graph(molecule("CH4"), 4.0), atoms_to_graph(crystal, 4.0)])
    out = predict(model, batch, forces=True, stress=True, create_graph=True)
    assert torch.isnan(out["stress"][0]).all() and torch.isfinite(out["stress"][1]).all()
    assert float(out["stress"][1].abs().max()) > 1e-6
    (out["stress"][1].square().sum() + out["forces"].square().sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
