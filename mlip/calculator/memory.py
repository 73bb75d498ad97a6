"""Predicted memory of an energy + forces (+ stress) call, and the edge chunking that keeps it in budget.

A model's memory in such a call is what autograd keeps for the backward, which grows with the
edges and the atoms, plus transients of the same kind. :class:`MemoryModel` measures the first part
once per model (saved-tensor bytes of two small probe crystals, fitted as ``a · n_edges + b · n_atoms``,
unchunked and with edge chunking when the model offers it) and :func:`plan_edge_chunks` picks the
largest edge chunk whose predicted peak fits a budget, or says why nothing fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: peak over saved bytes: backward transients (gradients of the saved per-edge tensors) about double it
PEAK_FACTOR = 2.0
#: the chunk size the probes are measured with; the per-chunk transient scales from it
PROBE_CHUNK = 64
#: share of the available memory used when no budget is given
DEFAULT_BUDGET_SHARE = 0.8
GIB = float(1 << 30)


class MemoryBudgetError(MemoryError):
    """The predicted peak memory of a call exceeds the budget even with the smallest edge chunks."""


def available_memory(device: torch.device) -> float | None:
    """Bytes free for new allocations on ``device`` (CUDA: the driver's free memory; CPU: Linux's
    MemAvailable), or ``None`` when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def default_budget(device: torch.device) -> float | None:
    """:data:`DEFAULT_BUDGET_SHARE` of :func:`available_memory` (bytes), ``None`` when unknown."""
    free = available_memory(device)
    return None if free is None else DEFAULT_BUDGET_SHARE * free


def saved_bytes(model: torch.nn.Module, batch) -> int:
    """Bytes of the distinct storages autograd saves for the forces (and stress) of ``batch``."""
    from mlip.models.outputs import predict

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        predict(model, batch, forces=True, stress=bool(batch.pbc.all()))
    return sum(storages.values())


def _probe_batches(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> list:
    """Two periodic crystals of 27 atoms of the model's elements, one dense (~100 neighbours each)
    and one sparse (~10): the same atoms and very different edges separate the two costs."""
    from ase import Atoms

    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph

    out = []
    for spacing in (0.35, 0.8):
        a = 3 * spacing * float(model.r_max)
        rng = np.random.default_rng(1)
        frac = (np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) / 3
        pos = (frac + rng.uniform(-0.03, 0.03, frac.shape)) * a
        numbers = [int(model.elements[i % len(model.elements)]) for i in range(len(pos))]
        atoms = Atoms(numbers=numbers, positions=pos, cell=np.eye(3) * a, pbc=True, info={"charge": 0.0, "spin": 1.0})
        out.append(collate([atoms_to_graph(atoms, float(model.r_max))]).to(device, dtype))
    return out


@dataclass
class MemoryModel:
    """Saved bytes per edge and per atom of one model (dtype, device), unchunked and chunked.

    ``chunked_per_edge`` is ``None`` for a model without edge chunking (``set_edge_chunk_size``).
    """

    per_edge: float
    per_atom: float
    chunked_per_edge: float | None
    chunked_per_atom: float | None

    @classmethod
    def measure(cls, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> MemoryModel:
        batches = _probe_batches(model, device, dtype)
        plain = _fit(model, batches)
        if not hasattr(model, "set_edge_chunk_size"):
            return cls(*plain, None, None)
        before = model.config.edge_chunk_size
        try:
            model.set_edge_chunk_size(PROBE_CHUNK)
            chunked = _fit(model, batches)
        finally:
            model.set_edge_chunk_size(before)
        return cls(*plain, *chunked)

    def peak(self, n_atoms: int, n_edges: int, chunk: int | None = None) -> float:
        """Predicted peak bytes of one call; ``chunk``: edges per chunk (``None``: unchunked)."""
        if chunk is None or self.chunked_per_edge is None:
            return PEAK_FACTOR * (self.per_edge * n_edges + self.per_atom * n_atoms)
        saved = self.chunked_per_edge * n_edges + self.chunked_per_atom * n_atoms
        return PEAK_FACTOR * (saved + self.per_edge * min(chunk, n_edges))  # one chunk's transient


def _fit(model: torch.nn.Module, batches: list) -> tuple[float, float]:
    """Least-squares ``saved = a · n_edges + b · n_atoms`` over the probes, both terms >= 0."""
    rows = np.array([[b.n_edges, b.n_atoms] for b in batches], dtype=np.float64)
    y = np.array([saved_bytes(model, b) for b in batches], dtype=np.float64)
    a, b = np.linalg.lstsq(rows, y, rcond=None)[0]
    if a < 0 or b < 0:  # degenerate probes: charge everything to the edges
        a, b = float(y.max() / rows[:, 0].min()), 0.0
    return float(a), float(b)


def plan_edge_chunks(memory: MemoryModel, n_atoms: int, n_edges: int, budget: float | None) -> int | None:
    """Edges per chunk for a call to fit ``budget`` bytes: ``None`` when the unchunked call fits.

    Raises:
        MemoryBudgetError: not even single-edge chunks fit, or the model cannot chunk; the message
            says what was predicted and what to set.
    """
    if budget is None or memory.peak(n_atoms, n_edges) <= budget:
        return None
    if memory.chunked_per_edge is not None:
        saved = PEAK_FACTOR * (memory.chunked_per_edge * n_edges + memory.chunked_per_atom * n_atoms)
        chunk = int((budget - saved) / (PEAK_FACTOR * memory.per_edge))
        if chunk >= 1:
            return min(chunk, n_edges)
    best = memory.peak(n_atoms, n_edges, 1 if memory.chunked_per_edge is not None else None)
    raise MemoryBudgetError(
        f"{n_atoms} atoms, {n_edges} edges: predicted peak {best / GIB:.2f} GiB "
        f"({'with the smallest edge chunks' if memory.chunked_per_edge is not None else 'this model cannot chunk edges'})"
        f" exceeds the budget max_memory_gb={budget / GIB:.2f}; raise max_memory_gb (MLIPCalculator(max_memory_gb=...), "
        "mlip md/relax --max-memory-gb), use float32 or a device with more memory, or a smaller structure")


#: generous bytes per edge and per atom of any family: below this nothing needs measuring
UPPER_PER_EDGE, UPPER_PER_ATOM = 1 << 18, 1 << 20


def quick_upper_bound(n_atoms: int, n_edges: int) -> float:
    """An upper bound of any model's peak bytes (no measurement): calls below the budget by this
    bound skip :class:`MemoryModel` entirely."""
    return PEAK_FACTOR * (UPPER_PER_EDGE * n_edges + UPPER_PER_ATOM * n_atoms)


def budget_bytes(max_memory_gb: float | None, device: torch.device) -> float | None:
    """``max_memory_gb`` in bytes, or the default share of the free memory when it is ``None``."""
    if max_memory_gb is None:
        return default_budget(device)
    if not (isinstance(max_memory_gb, (int, float)) and math.isfinite(max_memory_gb) and max_memory_gb > 0):
        raise ValueError(f"max_memory_gb must be a positive number of GiB, got {max_memory_gb!r}")
    return float(max_memory_gb) * GIB


class BudgetedPredictor:
    """Energy, forces (and stress) of one model, its edge work chunked when the predicted peak memory
    of a call would exceed the budget: the one place the calculator and batched relaxation run the
    model. The model's memory is measured on the first call that might not fit (small probes, once).
    A committee or an exported package (anything with ``predict_batch``) evaluates itself, unchunked.

    Shapes: a :class:`~mlip.data.graph.GraphBatch` -> :func:`mlip.models.outputs.predict`'s outputs.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.memory: MemoryModel | None = None

    def __call__(self, batch, stress: bool, max_memory_gb: float | None) -> dict[str, torch.Tensor]:
        from mlip.calculator.inference import evaluate_model

        if hasattr(self.model, "predict_batch"):  # a committee or an exported package: no edge chunking
            return evaluate_model(self.model, batch, forces=True, stress=stress)
        budget = budget_bytes(max_memory_gb, self.device)
        chunk = None
        if budget is not None and quick_upper_bound(batch.n_atoms, batch.n_edges) > budget:
            if self.memory is None:
                self.memory = MemoryModel.measure(self.model, self.device, self.dtype)
            chunk = plan_edge_chunks(self.memory, batch.n_atoms, batch.n_edges, budget)
        if chunk is None:
            return evaluate_model(self.model, batch, forces=True, stress=stress)
        before = self.model.config.edge_chunk_size
        self.model.set_edge_chunk_size(chunk)
        try:
            return evaluate_model(self.model, batch, forces=True, stress=stress)
        finally:
            self.model.set_edge_chunk_size(before)

