"""Graph containers: one structure (:class:`AtomGraph`) and a concatenated batch (:class:`GraphBatch`).

Batching concatenates atoms and edges without padding; ``edge_index`` is offset by
each structure's first atom. Missing labels are NaN (a molecule's stress, an
unlabelled frame's energy); the loss masks them with ``torch.isfinite``. Missing
total charge / spin multiplicity are NaN as well, so a model trained with them can
refuse such a structure instead of silently assuming a neutral singlet.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Sequence

import numpy as np
import torch

_NAN = float("nan")


@dataclass
class AtomGraph:
    """One structure with its neighbour graph and labels (float64 on the CPU).

    Shapes:
        positions [n_atoms, 3] Å; numbers [n_atoms]; cell [3, 3] Å (rows are lattice
        vectors, zeros for a molecule); pbc [3]; edge_index [2, n_edges] (sender, receiver);
        unit_shifts [n_edges, 3] integer; energy [] eV; forces [n_atoms, 3] eV/Å;
        stress [3, 3] eV/Å³ (ASE sign); charge [] e; spin [] (multiplicity 2S+1); weight [];
        isolated [] bool: an isolated-atom reference frame (sets E0s; not a training or test
        structure), as the readers flag it; a one-atom periodic cell is not one.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    edge_index: torch.Tensor
    unit_shifts: torch.Tensor
    energy: torch.Tensor = field(default_factory=lambda: torch.tensor(_NAN, dtype=torch.float64))
    forces: torch.Tensor | None = None
    stress: torch.Tensor = field(default_factory=lambda: torch.full((3, 3), _NAN, dtype=torch.float64))
    charge: torch.Tensor = field(default_factory=lambda: torch.tensor(_NAN, dtype=torch.float64))
    spin: torch.Tensor = field(default_factory=lambda: torch.tensor(_NAN, dtype=torch.float64))
    weight: torch.Tensor = field(default_factory=lambda: torch.tensor(1.0, dtype=torch.float64))
    head: str = "default"
    isolated: torch.Tensor = field(default_factory=lambda: torch.tensor(False))

    def __post_init__(self) -> None:
        if self.forces is None:
            self.forces = torch.full_like(self.positions, _NAN)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])


@dataclass
class GraphBatch:
    """A batch of structures, concatenated without padding.

    Shapes:
        positions [n_atoms, 3] Å; numbers [n_atoms]; batch [n_atoms]; ptr [n_graphs + 1];
        cell [n_graphs, 3, 3] Å; pbc [n_graphs, 3]; edge_index [2, n_edges] (sender, receiver);
        unit_shifts [n_edges, 3]; energy [n_graphs] eV; forces [n_atoms, 3] eV/Å;
        stress [n_graphs, 3, 3] eV/Å³; charge, spin, weight [n_graphs]; head: list of n_graphs str;
        isolated [n_graphs] bool (isolated-atom reference frames, see :class:`AtomGraph`).
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    edge_index: torch.Tensor
    unit_shifts: torch.Tensor
    batch: torch.Tensor
    ptr: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor
    charge: torch.Tensor
    spin: torch.Tensor
    weight: torch.Tensor
    head: list[str]
    isolated: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.isolated is None:
            self.isolated = torch.zeros(self.n_graphs, dtype=torch.bool, device=self.ptr.device)

    @property
    def n_graphs(self) -> int:
        return int(self.ptr.shape[0] - 1)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def sender(self) -> torch.Tensor:
        return self.edge_index[0]

    @property
    def receiver(self) -> torch.Tensor:
        return self.edge_index[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GraphBatch":
        """Move to ``device``; floating-point tensors are cast to ``dtype`` if given."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if dtype is not None and v.is_floating_point():
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device=device)
            out[f.name] = v
        return GraphBatch(**out)

    def edge_vectors(self, positions: torch.Tensor | None = None, cell: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors from each receiver to its sender's periodic image, ``[n_edges, 3]`` in Å.

        ``edge_vec = pos[sender] - pos[receiver] + unit_shifts @ cell[graph]`` (ASE's ``D``
        with ``i = receiver``, ``j = sender``). ``positions``/``cell`` default to the batch's own;
        pass strained ones to get stress from the same autograd call as forces.
        """
        pos = self.positions if positions is None else positions
        cel = self.cell if cell is None else cell
        sender, receiver = self.edge_index
        shifts = torch.einsum("ei,eij->ej", self.unit_shifts.to(pos.dtype), cel[self.batch[receiver]])
        return pos[sender] - pos[receiver] + shifts

    def split(self) -> list[AtomGraph]:
        """Undo :func:`collate` (labels included)."""
        out = []
        ptr = self.ptr.tolist()
        for g in range(self.n_graphs):
            a, b = ptr[g], ptr[g + 1]
            emask = self.batch[self.edge_index[1]] == g
            out.append(
                AtomGraph(
                    positions=self.positions[a:b], numbers=self.numbers[a:b], cell=self.cell[g],
                    pbc=self.pbc[g], edge_index=self.edge_index[:, emask] - a,
                    unit_shifts=self.unit_shifts[emask], energy=self.energy[g], forces=self.forces[a:b],
                    stress=self.stress[g], charge=self.charge[g], spin=self.spin[g],
                    weight=self.weight[g], head=self.head[g], isolated=self.isolated[g],
                )
            )
        return out


def collate(graphs: Sequence[AtomGraph]) -> GraphBatch:
    """Concatenate structures into one :class:`GraphBatch` (no padding)."""
    if len(graphs) == 0:
        raise ValueError("collate() needs at least one structure")
    n_atoms = torch.tensor([g.n_atoms for g in graphs], dtype=torch.long)
    ptr = torch.zeros(len(graphs) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(n_atoms, 0)
    edge_index = torch.cat([g.edge_index + ptr[i] for i, g in enumerate(graphs)], dim=1)
    return GraphBatch(
        positions=torch.cat([g.positions for g in graphs]),
        numbers=torch.cat([g.numbers for g in graphs]),
        cell=torch.stack([g.cell for g in graphs]),
        pbc=torch.stack([g.pbc for g in graphs]),
        edge_index=edge_index,
        unit_shifts=torch.cat([g.unit_shifts for g in graphs]),
        batch=torch.repeat_interleave(torch.arange(len(graphs)), n_atoms),
        ptr=ptr,
        energy=torch.stack([g.energy for g in graphs]),
        forces=torch.cat([g.forces for g in graphs]),
        stress=torch.stack([g.stress for g in graphs]),
        charge=torch.stack([g.charge for g in graphs]),
        spin=torch.stack([g.spin for g in graphs]),
        weight=torch.stack([g.weight for g in graphs]),
        head=[g.head for g in graphs],
        isolated=torch.stack([torch.as_tensor(g.isolated, dtype=torch.bool) for g in graphs]),
    )


class BoundedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields lists of dataset indices whose totals stay within bounds.

    A batch closes before adding a structure would exceed ``max_atoms``, ``max_edges`` or
    ``max_graphs`` (any bound may be ``None``). A single structure larger than a bound
    forms a batch of its own (it cannot be split).

    Args:
        n_atoms: atoms per structure, length = dataset size.
        n_edges: edges per structure (needed only with ``max_edges``).
        shuffle: reshuffle every epoch with ``seed + epoch`` (call :meth:`set_epoch`).
    """

    def __init__(
        self,
        n_atoms: Sequence[int],
        n_edges: Sequence[int] | None = None,
        max_atoms: int | None = None,
        max_edges: int | None = None,
        max_graphs: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if max_atoms is None and max_edges is None and max_graphs is None:
            raise ValueError("BoundedBatchSampler needs at least one of max_atoms, max_edges, max_graphs")
        if max_edges is not None and n_edges is None:
            raise ValueError("max_edges needs the per-structure edge counts n_edges")
        self.n_atoms = np.asarray(n_atoms, dtype=np.int64)
        self.n_edges = None if n_edges is None else np.asarray(n_edges, dtype=np.int64)
        self.max_atoms, self.max_edges, self.max_graphs = max_atoms, max_edges, max_graphs
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.n_atoms))
        return np.random.default_rng(self.seed + self.epoch).permutation(len(self.n_atoms))

    def batches(self) -> list[list[int]]:
        out: list[list[int]] = []
        cur: list[int] = []
        atoms = edges = 0
        for i in self._order().tolist():
            a = int(self.n_atoms[i])
            e = int(self.n_edges[i]) if self.n_edges is not None else 0
            full = cur and (
                (self.max_atoms is not None and atoms + a > self.max_atoms)
                or (self.max_edges is not None and edges + e > self.max_edges)
                or (self.max_graphs is not None and len(cur) + 1 > self.max_graphs)
            )
            if full:
                out.append(cur)
                cur, atoms, edges = [], 0, 0
            cur.append(i)
            atoms += a
            edges += e
        if cur and not (self.drop_last and out):
            out.append(cur)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
