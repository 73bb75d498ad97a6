"""Ahead-of-time compiled potentials: ``mlip export`` writes an AOTInductor package (``.pt2``).

The package holds one compiled function, energy -> forces, stress and virial by autograd included
(the graph of :func:`mlip.models.outputs.predict`, traced through the backward), for one structure
with any number of atoms and edges. It runs without mlip's Python model code: from Python through
:class:`ExportedModel` (which the calculator, ``mlip md`` and ``mlip relax`` use for a ``.pt2``
path), and from C++ through ``torch::inductor::AOTIModelPackageLoader``. Inputs and outputs are
listed in :data:`INPUTS` and :data:`OUTPUTS` and in ``docs/md.md``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mlip.data.graph import GraphBatch
from mlip.models.base import PotentialModel
from mlip.models.outputs import predict
from mlip.models.tracing import SymbolicBatch, traceable_kernels
from mlip.nn.embedding import reads_charge_spin

__all__ = ["EXPORT_FORMAT", "INPUTS", "NOT_EXPORTABLE", "OUTPUTS", "ExportedModel", "export_model"]

#: version of the input/output layout below, stored in every package
EXPORT_FORMAT = 1
#: inputs of the exported function, in order: name, shape, dtype, unit (one structure, n_graphs = 1)
INPUTS = (
    ("positions", "[n_atoms, 3]", "model dtype", "Å"),
    ("numbers", "[n_atoms]", "int64", "atomic numbers"),
    ("cell", "[1, 3, 3]", "model dtype", "Å, rows are lattice vectors (zeros for a molecule)"),
    ("pbc", "[1, 3]", "bool", "periodic along each cell vector"),
    ("edge_index", "[2, n_edges]", "int64", "(sender, receiver), every pair closer than r_max"),
    ("unit_shifts", "[n_edges, 3]", "int64", "cell shift of the sender: edge = pos[s] - pos[r] + shift @ cell"),
    ("batch", "[n_atoms]", "int64", "zeros"),
    ("charge", "[1]", "model dtype", "total charge, e (NaN if the package's head does not use it)"),
    ("spin", "[1]", "model dtype", "spin multiplicity 2S+1 (NaN if the package's head does not use it)"),
)
#: outputs, in order: name, shape, unit
OUTPUTS = (
    ("energy", "[1]", "eV"),
    ("node_energy", "[n_atoms]", "eV"),
    ("forces", "[n_atoms, 3]", "eV/Å"),
    ("stress", "[1, 3, 3]", "eV/Å³, ASE sign (NaN for a zero-volume cell)"),
    ("virial", "[1, 3, 3]", "eV, -dE/dε"),
)
#: families whose forward cannot be traced into one graph valid for every structure, and why
NOT_EXPORTABLE = {
    "frame-averaged": (
        "its PCA frames are chosen by data-dependent branches (degenerate axes, mlip/nn/frames.py): "
        "torch.export would freeze the branch of the example structure, and a structure that takes "
        "another branch would fail at run time"
    ),
}


class EnergyForcesStress(torch.nn.Module):
    """The exported function: :data:`INPUTS` of one structure -> :data:`OUTPUTS` (a tuple).

    Forces, stress and virial come from :func:`mlip.models.outputs.predict` (autograd), traced with
    the rest; ``head`` is fixed when the module is built.
    """

    def __init__(self, model: PotentialModel, head: str = "default") -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                edge_index: torch.Tensor, unit_shifts: torch.Tensor, batch: torch.Tensor, charge: torch.Tensor,
                spin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nan = float("nan")
        counts = torch.zeros_like(charge, dtype=torch.long).index_add(0, batch, torch.ones_like(batch))  # [1]
        ptr = torch.cat([torch.zeros_like(counts), counts.cumsum(0)])
        graph = SymbolicBatch(
            # [n_edges, 2] storage, viewed as [2, n_edges]: the receiver row then starts at offset 1,
            # not n_edges (tracing with real values compares storage offsets and would pin n_edges)
            positions=positions, numbers=numbers, cell=cell, pbc=pbc, edge_index=edge_index.t().contiguous().t(),
            unit_shifts=unit_shifts, batch=batch, ptr=ptr, energy=torch.full_like(charge, nan),
            forces=torch.full_like(positions, nan), stress=torch.full_like(cell, nan), charge=charge, spin=spin,
            weight=torch.ones_like(charge), head=[self.head], isolated=torch.zeros_like(charge, dtype=torch.bool),
        )
        out = predict(self.model, graph, forces=True, stress=True)
        return tuple(out[name] for name, *_ in OUTPUTS)


def example_inputs(model: PotentialModel, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A rattled 4-atom fcc cell of the model's elements with edges within ``r_max``, as :data:`INPUTS`.

    Its atom and edge counts differ from each other and from every fixed size (1, 2, 3), so that
    tracing keeps them apart as symbols.
    """
    from ase.build import bulk

    from mlip.data.neighbors import neighbor_list

    # nearest neighbours at 0.55 r_max: a few shells inside the cutoff
    atoms = bulk("Cu", "fcc", a=0.55 * model.r_max * 2**0.5, cubic=True)
    atoms.numbers = [model.elements[i % len(model.elements)] for i in range(len(atoms))]
    atoms.rattle(0.02 * model.r_max, seed=0)
    f64 = torch.float64
    pos = torch.tensor(atoms.positions, dtype=f64)
    cell = torch.tensor(np.asarray(atoms.cell), dtype=f64)
    pbc = torch.ones(3, dtype=torch.bool)
    edge_index, shifts = neighbor_list(pos, cell, pbc, model.r_max, backend="torch")
    n = len(atoms)
    as_t = lambda x, dt=dtype: torch.as_tensor(x, dtype=dt, device=device)
    return (as_t(pos), as_t(atoms.numbers, torch.long), as_t(cell[None]), as_t(pbc[None], torch.bool),
            as_t(edge_index, torch.long), as_t(shifts, torch.long), as_t(torch.zeros(n), torch.long),
            as_t([0.0]), as_t([1.0]))


def _trace(fn: EnergyForcesStress, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Trace ``fn`` with autograd included, then export it with dynamic atom and edge counts.

    ``torch.export`` does not trace through ``torch.autograd.grad``; ``make_fx`` does (it records the
    backward's ATen ops), so it runs first, as in nequip's AOTInductor path. Data-dependent checks
    (the unknown-element test in the models' forward) are resolved with the example's real values
    and become run-time assertions in the graph. opt_einsum is off while tracing: it plans a
    contraction from concrete sizes, which would pin the edge count.
    """
    import logging

    import torch._functorch.config as functorch_config
    from torch.fx.experimental.proxy_tensor import make_fx

    # each data-dependent check resolved from real values logs a warning: expected here, not news
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with torch.backends.opt_einsum.flags(enabled=False), \
                functorch_config.patch(fake_tensor_propagate_real_tensors=True):
            graph = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    finally:
        shapes_log.setLevel(level)
    n_atoms = torch.export.Dim("n_atoms", min=1)
    n_edges = torch.export.Dim("n_edges", min=0)
    atoms, edges = {0: n_atoms}, {0: n_edges}
    dynamic = (atoms, atoms, None, None, {1: n_edges}, edges, atoms, None, None)
    return torch.export.export(graph, example, dynamic_shapes=dynamic, strict=False)


def export_model(
    model: PotentialModel | str | os.PathLike,
    path: str | os.PathLike,
    head: str = "default",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> Path:
    """Compile ``model``'s energy/forces/stress function into an AOTInductor package at ``path``.

    Args:
        model: a model or model file (left unmodified).
        path: the ``.pt2`` file to write.
        head: the head the package evaluates (one per package).
        dtype: ``"float32"`` or ``"float64"``: fixed in the package.
        device: ``"cpu"`` or ``"cuda"``: the package runs only there.

    Returns:
        ``path``. The package's metadata (``mlip`` key, JSON) holds family, ``r_max``, elements, head,
        dtype, ``use_charge_spin`` (whether that head reads charge and spin), the mlip version and
        :data:`EXPORT_FORMAT`.

    Raises:
        ValueError: a family in :data:`NOT_EXPORTABLE`, an unknown head, or a path not ending in ``.pt2``.
    """
    from torch._inductor import aoti_compile_and_package

    from mlip import __version__
    from mlip.calculator.ase import prepare_model, resolve_device
    from mlip.dtypes import resolve_dtype

    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"{path}: an AOTInductor package must end in .pt2")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    net = prepare_model(model, dev, dt)
    if net.family in NOT_EXPORTABLE:
        raise ValueError(f"the {net.family!r} family cannot be exported: {NOT_EXPORTABLE[net.family]}")
    heads = list(getattr(net.config, "heads", ["default"]))
    if len(heads) > 1 and head not in heads:
        raise ValueError(f"head {head!r} is not one of the model's heads {heads}")
    meta = {
        "format": EXPORT_FORMAT, "family": net.family, "r_max": net.r_max, "elements": net.elements, "head": head,
        "dtype": str(dt).replace("torch.", ""), "use_charge_spin": reads_charge_spin(net.config, [head])[0],
        "mlip_version": __version__, "inputs": [i[0] for i in INPUTS], "outputs": [o[0] for o in OUTPUTS],
    }
    configs: dict[str, Any] = {"aot_inductor.metadata": {"mlip": json.dumps(meta)}}
    fn = EnergyForcesStress(net, head)
    example = example_inputs(net, dt, dev)
    with traceable_kernels(net, "torch-export"):
        fn(*example)  # fills the models' per-dtype caches before tracing, and fails early on a bad model
        program = _trace(fn, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs))


class ExportedModel:
    """A ``.pt2`` package written by :func:`export_model`, evaluated like a model.

    It has what the calculator, :func:`~mlip.md.relax_batch` and committees use: ``r_max``,
    ``elements``, ``config`` (``use_charge_spin``, ``heads``), ``family``, ``dtype``,
    :meth:`check_batch` and :meth:`predict_batch` (the keys of :func:`mlip.models.outputs.predict`).
    A batch of several structures is evaluated one structure per call.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not an mlip package, or one compiled for another device type.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from torch._inductor import aoti_load_package

        from mlip.calculator.ase import resolve_device

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no exported model at {self.path}")
        self.device = resolve_device(device)
        try:
            self._fn = aoti_load_package(str(self.path))
            meta = self._fn.get_metadata()
        except Exception as err:
            raise ValueError(f"{self.path}: not a readable AOTInductor package ({err})") from err
        if "mlip" not in meta:
            raise ValueError(f"{self.path}: an AOTInductor package, but not one written by mlip export")
        info = json.loads(meta["mlip"])
        built_for = meta.get("AOTI_DEVICE_KEY", "cpu")
        if built_for != self.device.type:
            raise ValueError(f"{self.path} was compiled for {built_for}, not {self.device.type}: "
                             f"export it again with --device {self.device.type}")
        self.family, self.r_max, self.head = info["family"], float(info["r_max"]), info["head"]
        self.elements = [int(z) for z in info["elements"]]
        self.dtype = getattr(torch, info["dtype"])
        self.config = SimpleNamespace(r_max=self.r_max, elements=self.elements, heads=[self.head],
                                      use_charge_spin=bool(info["use_charge_spin"]))

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, family={self.family!r}, dtype={self.dtype}, head={self.head!r})"

    def check_batch(self, batch: GraphBatch) -> None:
        """The element check of :meth:`PotentialModel.check_batch` (the same message)."""
        PotentialModel.check_batch(self, batch)  # reads only self.elements

    def _one(self, batch: GraphBatch, g: int) -> list[torch.Tensor]:
        """The package's outputs for structure ``g`` of ``batch``."""
        a, b = int(batch.ptr[g]), int(batch.ptr[g + 1])
        if batch.n_graphs == 1:
            keep, sl = slice(None), slice(None)
        else:
            keep, sl = batch.batch[batch.edge_index[1]] == g, slice(a, b)
        head = batch.head[g]
        if head not in (self.head, "default"):
            raise ValueError(f"{self.path} evaluates head {self.head!r}; structure {g} asks for {head!r}")
        to = lambda t: t.to(device=self.device, dtype=self.dtype)
        dev = self.device
        inputs = (
            to(batch.positions[sl]), batch.numbers[sl].to(dev), to(batch.cell[g:g + 1]), batch.pbc[g:g + 1].to(dev),
            (batch.edge_index[:, keep] - a).to(dev), batch.unit_shifts[keep].to(dev),
            torch.zeros(b - a, dtype=torch.long, device=dev), to(batch.charge[g:g + 1]), to(batch.spin[g:g + 1]),
        )
        return list(self._fn(*inputs))

    def predict_batch(self, batch: GraphBatch, forces: bool = True, stress: bool = False) -> dict[str, torch.Tensor]:
        """Energy, node energies, forces and (with ``stress``) stress and virial of every structure.

        Shapes: as :func:`mlip.models.outputs.predict`; float tensors in the package's dtype.
        """
        self.check_batch(batch)
        parts = [self._one(batch, g) for g in range(batch.n_graphs)]
        names = [name for name, *_ in OUTPUTS]
        out = {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(names)}
        if not stress:
            out.pop("stress"), out.pop("virial")
        return out
