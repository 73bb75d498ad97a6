"""Measured rotation-equivariance error of any potential: ``E(Rx) = E(x)``, ``F(Rx) = R F(x)``.

Exactly equivariant families reach floating-point round-off (~1e-7 relative in float32);
frame-averaged or learned-equivariance families report how far from exact they are. Used by
validation during training and by ``mlip evaluate``.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from mlip.data.graph import GraphBatch
from mlip.models.outputs import predict


def random_rotation(generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A uniformly random proper rotation matrix ``[3, 3]`` (det = +1), QR of a Gaussian matrix."""
    a = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def rotate_batch(batch: GraphBatch, rotation: torch.Tensor) -> GraphBatch:
    """Rotate positions, cell and vector/tensor labels of ``batch`` by ``rotation`` ``[3, 3]``.

    Row vectors transform as ``x -> x @ R^T``; integer unit shifts and the neighbour graph are
    unchanged, because rotating the cell with the atoms maps every periodic image to its image.
    """
    r = rotation.to(batch.positions.dtype).to(batch.positions.device)
    return dataclasses.replace(
        batch,
        positions=batch.positions @ r.T,
        cell=batch.cell @ r.T,
        forces=batch.forces @ r.T,
        stress=r @ batch.stress @ r.T,
    )


def equivariance_error(
    model: torch.nn.Module, batch: GraphBatch, n_rotations: int = 2, seed: int = 0
) -> dict[str, float]:
    """Largest and RMS deviation from exact rotation equivariance over random rotations.

    Returns (floats):
        ``energy_max`` (eV/atom): max over structures and rotations of ``|E(Rx) - E(x)| / n_atoms``;
        ``forces_max`` (eV/Å): max component of ``|F(Rx) - R F(x)|``;
        ``forces_rms`` (eV/Å): RMS of ``F(Rx) - R F(x)``;
        ``forces_rel``: ``forces_rms`` divided by the RMS of the predicted forces.
    """
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        ref = predict(model, batch, forces=True)
        e0 = ref["energy"].detach()
        f0 = ref["forces"].detach()
        n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(e0.dtype)
        e_max = f_max = 0.0
        sq = 0.0
        count = 0
        for _ in range(n_rotations):
            rot = random_rotation(gen).to(f0.dtype).to(f0.device)
            out = predict(model, rotate_batch(batch, rot), forces=True)
            de = ((out["energy"].detach() - e0) / n_atoms).abs()
            df = out["forces"].detach() - f0 @ rot.T
            e_max = max(e_max, float(de.max()))
            f_max = max(f_max, float(df.abs().max()))
            sq += float(df.double().square().sum())
            count += df.numel()
    finally:
        model.train(was_training)
    f_rms = math.sqrt(sq / max(count, 1))
    scale = float(f0.double().square().mean().sqrt())
    return {
        "energy_max": e_max,
        "forces_max": f_max,
        "forces_rms": f_rms,
        "forces_rel": f_rms / scale if scale > 0 else math.nan,
    }


def is_exact_by_construction(model: torch.nn.Module) -> bool:
    """Whether the model declares exact rotation equivariance (``exactly_equivariant``: a class
    attribute, which a family may override per instance when exactness depends on its config);
    unknown families are treated as approximate and measured."""
    inner = getattr(model, "module", model)
    return bool(getattr(inner, "exactly_equivariant", False))
