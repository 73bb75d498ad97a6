"""Energy -> forces, stress and virial: the only place mlip differentiates a potential.

Stress uses the symmetric strain trick (Knuth et al., Comput. Phys. Commun. 190, 33 (2015);
as in nequip's ``grad_output.py``): positions and cell are displaced by a symmetric strain
``ε`` that is zero-valued but tracked by autograd, edge vectors are rebuilt from integer
unit shifts and the strained cell, and

    F = -dE/dr,   virial = -dE/dε,   stress = (1/V) dE/dε   (ASE sign: + is tensile).
"""
from __future__ import annotations

import torch

from mlip.data.graph import GraphBatch
from mlip.models.base import PotentialModel


def predict(
    model: PotentialModel,
    batch: GraphBatch,
    forces: bool = True,
    stress: bool = False,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Evaluate ``model`` on ``batch`` and derive forces (and stress) by autograd.

    Args:
        forces: compute ``F = -dE/dr`` (a model with ``direct_forces`` returns its head's forces instead).
        stress: compute stress and virial (NaN for structures with zero cell volume).
        create_graph: keep the graph of the derivatives (training on forces/stress).

    Returns:
        dict with ``energy`` [n_graphs] eV, ``node_energy`` [n_atoms] eV, and if asked
        ``forces`` [n_atoms, 3] eV/Å, ``stress`` [n_graphs, 3, 3] eV/Å³, ``virial`` [n_graphs, 3, 3] eV.
    """
    model.check_batch(batch)
    # a model with a direct force head (attribute ``direct_forces``) returns ``forces`` from forward:
    # taken as they are (not -dE/dr, not conservative); stress still comes from the energy
    direct = forces and bool(getattr(getattr(model, "module", model), "direct_forces", False))
    forces = forces and not direct
    if not (forces or stress):
        return model(batch, batch.edge_vectors())
    with torch.enable_grad():
        pos_leaf = batch.positions.detach().requires_grad_(forces)
        positions, cell = pos_leaf, batch.cell
        inputs = [pos_leaf] if forces else []
        if stress:
            eps = torch.zeros_like(batch.cell, requires_grad=True)  # [n_graphs, 3, 3]
            sym = 0.5 * (eps + eps.transpose(1, 2))
            positions = positions + torch.einsum("ni,nij->nj", positions, sym[batch.batch])
            cell = cell + torch.bmm(cell, sym)
            inputs.append(eps)
        out = model(batch, batch.edge_vectors(positions, cell))
        grads = torch.autograd.grad(out["energy"].sum(), inputs, create_graph=create_graph, allow_unused=True)
    result = dict(out)
    grads = list(grads)
    if forces:
        g = grads.pop(0)
        result["forces"] = -g if g is not None else torch.zeros_like(batch.positions)
    if stress:
        g = grads.pop(0)
        if g is None:
            g = torch.zeros_like(batch.cell)
        volume = torch.linalg.det(batch.cell).abs()[:, None, None]
        result["virial"] = -g
        # divide by a safe volume: dividing by zero inside torch.where would make its gradient NaN
        # for the whole batch when molecules and stress-labelled crystals train together
        safe = torch.where(volume > 0, volume, torch.ones_like(volume))
        result["stress"] = torch.where(volume > 0, g / safe, torch.full_like(g, float("nan")))
    return result
