"""The one builder of unlabelled inference batches, for the ASE calculator, batched relaxation and TorchSim.

Each structure's total charge, spin multiplicity and model head follow one policy
(:func:`structure_settings`): the value in ``atoms.info``, else the caller's default, else NaN
(head: ``"default"``). A structure whose head reads charge and spin (every head of a model built
with ``use_charge_spin``, or those in its ``charge_spin_heads``: :func:`uses_charge_spin`) is refused
when it lacks them (:func:`check_charge_spin`) rather than silently taken for a neutral singlet.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms

from mlip import keys as K
from mlip.data.graph import GraphBatch
from mlip.models.base import PotentialModel
from mlip.models.outputs import predict
from mlip.nn.embedding import reads_charge_spin

__all__ = [
    "check_charge_spin", "inference_batch", "info_scalar", "structure_settings", "structure_tensors",
    "uses_charge_spin",
]

#: the error a structure gets when its head reads charge and spin and it has none (``{heads}``:
#: empty, or " for head(s) [...]" naming them)
MISSING_CHARGE_SPIN = (
    "this model uses the total charge and spin multiplicity{heads}: set atoms.info['charge'] and "
    "atoms.info['spin'] (e.g. 0 and 1 for a neutral singlet) or pass charge=/spin= to MLIPCalculator "
    "(or to relax, relax_batch, MLIPTorchSimModel)"
)


def info_scalar(info: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """``info[key]`` as a float, else ``default``, else NaN.

    >>> info_scalar({"charge": 1}, "charge"), info_scalar({}, "spin", 2.0), info_scalar({}, "spin")
    (1.0, 2.0, nan)

    Raises:
        ValueError: the value is not a number.
    """
    value = info.get(key, default)
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"atoms.info[{key!r}] must be a number, got {value!r}") from err


def structure_settings(
    info: Mapping[str, Any], charge: float | None = None, spin: float | None = None, head: str = "default"
) -> tuple[float, float, str]:
    """``(charge, spin, head)`` of one structure: from ``info`` (``atoms.info``), else the defaults given.

    >>> structure_settings({"charge": -1, "head": "pbe"}, charge=0, spin=1)
    (-1.0, 1.0, 'pbe')
    >>> structure_settings({})
    (nan, nan, 'default')
    """
    return info_scalar(info, K.CHARGE, charge), info_scalar(info, K.SPIN, spin), str(info.get(K.HEAD, head))


def uses_charge_spin(model: PotentialModel, heads: Sequence[str]) -> list[bool]:
    """Whether ``model`` reads the charge and spin of structures with these heads (one flag each).

    The model config decides (:func:`mlip.nn.embedding.reads_charge_spin`); a committee reads them
    where any member does.
    """
    members = getattr(model, "models", None) or [model]
    flags = [reads_charge_spin(m.config, heads) for m in members]
    return [any(f) for f in zip(*flags)]


def check_charge_spin(charge: torch.Tensor, spin: torch.Tensor, heads: Sequence[str] | None = None,
                      needed: Sequence[bool] | None = None) -> None:
    """Raise the one clear error if some structure that needs them lacks its charge or spin (NaN).

    Args:
        heads: each structure's head, named in the error unless it is ``"default"``.
        needed: which structures need them (default: all), as :func:`uses_charge_spin` says.

    Shapes: charge, spin [n_graphs].
    """
    missing = ~(torch.isfinite(charge) & torch.isfinite(spin))
    if needed is not None:
        missing &= torch.as_tensor(list(needed), dtype=torch.bool, device=missing.device)
    if bool(missing.any()):
        which = ""
        if missing.numel() > 1:  # a batch of one is the calculator's structure: no index to name
            which = f" (missing for structure(s) {missing.nonzero().flatten().tolist()})"
        names = sorted({heads[g] for g in missing.nonzero().flatten().tolist()}) if heads is not None else []
        named = f" for head(s) {names}" if names and names != ["default"] else ""
        raise ValueError(MISSING_CHARGE_SPIN.format(heads=named) + which)


def structure_tensors(
    atoms: Atoms, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions, numbers, cell, pbc)`` of ``atoms`` as tensors: float64 Å, long, float64 Å (rows), bool.

    Shapes: positions [n_atoms, 3]; numbers [n_atoms]; cell [3, 3]; pbc [3].
    """
    return (
        torch.as_tensor(atoms.positions, dtype=torch.float64, device=device),
        torch.as_tensor(atoms.numbers, dtype=torch.long, device=device),
        torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64, device=device),
        torch.as_tensor(np.asarray(atoms.pbc, dtype=bool), device=device),
    )


def inference_batch(
    positions: torch.Tensor,
    numbers: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    edge_index: torch.Tensor,
    unit_shifts: torch.Tensor,
    batch: torch.Tensor,
    charge: Sequence[float] | torch.Tensor,
    spin: Sequence[float] | torch.Tensor,
    head: Sequence[str],
    dtype: torch.dtype,
    needs_charge_spin: bool | Sequence[bool] = False,
) -> GraphBatch:
    """An unlabelled :class:`GraphBatch` (NaN energy, forces, stress) in ``dtype`` on ``positions``' device.

    Args:
        positions, numbers, cell, pbc: the structures, concatenated (atoms) or stacked (cells).
        edge_index, unit_shifts: edges with indices into ``positions`` (see
            :func:`mlip.data.neighbors.batch_neighbor_list`).
        batch: structure index of every atom, sorted (structure ``g`` holds a contiguous run).
        charge, spin: per structure, NaN where unknown (see :func:`structure_settings`); head: per structure.
        dtype: float dtype of the model.
        needs_charge_spin: per structure (or one flag for all), whether the model reads its charge and
            spin (:func:`uses_charge_spin`): a NaN there raises.

    Shapes:
        positions [n_atoms, 3] Å; numbers, batch [n_atoms]; cell [n_graphs, 3, 3] Å; pbc [n_graphs, 3];
        edge_index [2, n_edges]; unit_shifts [n_edges, 3]; charge, spin [n_graphs]; head: n_graphs str.

    Raises:
        ValueError: a structure that ``needs_charge_spin`` lacks its charge or spin.
    """
    dev = positions.device
    n_graphs, n_atoms = int(cell.shape[0]), int(positions.shape[0])
    charge_t = torch.as_tensor(charge, dtype=dtype, device=dev).reshape(n_graphs)
    spin_t = torch.as_tensor(spin, dtype=dtype, device=dev).reshape(n_graphs)
    one_flag = isinstance(needs_charge_spin, bool)
    needed = [needs_charge_spin] * n_graphs if one_flag else list(needs_charge_spin)
    if any(needed):
        check_charge_spin(charge_t, spin_t, head, needed)
    ptr = torch.zeros(n_graphs + 1, dtype=torch.long, device=dev)
    ptr[1:] = torch.cumsum(torch.bincount(batch, minlength=n_graphs), 0)
    nan = math.nan
    return GraphBatch(
        positions=positions.to(dtype),
        numbers=numbers.to(device=dev, dtype=torch.long),
        cell=cell.to(device=dev, dtype=dtype),
        pbc=pbc.to(device=dev, dtype=torch.bool),
        edge_index=edge_index.to(dev),
        unit_shifts=unit_shifts.to(dev),
        batch=batch.to(dev),
        ptr=ptr,
        energy=torch.full((n_graphs,), nan, dtype=dtype, device=dev),
        forces=torch.full((n_atoms, 3), nan, dtype=dtype, device=dev),
        stress=torch.full((n_graphs, 3, 3), nan, dtype=dtype, device=dev),
        charge=charge_t,
        spin=spin_t,
        weight=torch.ones(n_graphs, dtype=dtype, device=dev),
        head=[str(h) for h in head],
        isolated=torch.zeros(n_graphs, dtype=torch.bool, device=dev),  # inference has no reference frames
    )


def evaluate_model(model: Any, batch: GraphBatch, forces: bool = True, stress: bool = False) -> dict[str, torch.Tensor]:
    """:func:`mlip.models.outputs.predict` for a model; a committee or an exported package (anything with
    ``predict_batch``) evaluates itself. Same keys, shapes and units as ``predict``."""
    own = getattr(model, "predict_batch", None)
    if own is not None:
        return own(batch, forces=forces, stress=stress)
    return predict(model, batch, forces=forces, stress=stress)
