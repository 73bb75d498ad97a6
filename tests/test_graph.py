"""GraphBatch: collate/split round trip, edge vectors, bounded batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mlip.data.graph import AtomGraph, BoundedBatchSampler, collate


def _graph(n: int, e: int, seed: int, periodic: bool) -> AtomGraph:
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g, dtype=torch.float64) * 4
    cell = torch.eye(3, dtype=torch.float64) * 4 if periodic else torch.zeros(3, 3, dtype=torch.float64)
    ei = torch.randint(0, n, (2, e), generator=g)
    shifts = torch.randint(-1, 2, (e, 3), generator=g) if periodic else torch.zeros(e, 3, dtype=torch.long)
    return AtomGraph(
        positions=pos, numbers=torch.randint(1, 30, (n,), generator=g), cell=cell,
        pbc=torch.tensor([periodic] * 3), edge_index=ei, unit_shifts=shifts,
        energy=torch.tensor(float(seed), dtype=torch.float64), forces=torch.rand(n, 3, dtype=torch.float64),
        head="mol" if not periodic else "crystal",
    )


def test_collate_offsets_and_split_round_trip():
    graphs = [_graph(3, 5, 0, False), _graph(4, 7, 1, True), _graph(2, 1, 2, True)]
    b = collate(graphs)
    assert b.n_graphs == 3 and b.n_atoms == 9 and b.n_edges == 13
    assert b.ptr.tolist() == [0, 3, 7, 9]
    assert b.batch.tolist() == [0] * 3 + [1] * 4 + [2] * 2
    # edges stay inside their own structure
    assert torch.equal(b.batch[b.edge_index[0]], b.batch[b.edge_index[1]])
    for g, back in zip(graphs, b.split()):
        assert torch.equal(g.edge_index, back.edge_index)
        assert torch.equal(g.positions, back.positions)
        assert torch.equal(g.unit_shifts, back.unit_shifts)
        assert back.head == g.head
    # missing labels are NaN, present labels kept
    assert torch.isnan(b.stress).all() and torch.isnan(b.charge).all()
    assert b.energy.tolist() == [0.0, 1.0, 2.0]


def test_edge_vectors_follow_ase_convention():
    g = _graph(4, 6, 3, True)
    b = collate([g])
    s, r = g.edge_index
    expected = g.positions[s] - g.positions[r] + g.unit_shifts.double() @ g.cell
    assert torch.allclose(b.edge_vectors(), expected)


def test_to_casts_floats_only():
    b = collate([_graph(3, 4, 0, True)]).to(dtype=torch.float32)
    assert b.positions.dtype == torch.float32 and b.numbers.dtype == torch.long
    assert b.unit_shifts.dtype == torch.long and b.pbc.dtype == torch.bool


@pytest.mark.parametrize("max_atoms,max_edges", [(10, None), (None, 40), (12, 30)])
def test_bounded_sampler_respects_bounds_and_covers_all(max_atoms, max_edges):
    rng = np.random.default_rng(0)
    n_atoms = rng.integers(1, 9, size=50)
    n_edges = n_atoms * rng.integers(1, 4, size=50)
    sampler = BoundedBatchSampler(n_atoms, n_edges, max_atoms=max_atoms, max_edges=max_edges, shuffle=True, seed=3)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(50))
    for b in batches:
        if len(b) > 1:
            if max_atoms is not None:
                assert n_atoms[b].sum() <= max_atoms
            if max_edges is not None:
                assert n_edges[b].sum() <= max_edges
    # reproducible for a seed, reshuffled per epoch
    again = BoundedBatchSampler(n_atoms, n_edges, max_atoms=max_atoms, max_edges=max_edges, shuffle=True, seed=3)
    assert list(again) == batches
    again.set_epoch(1)
    assert list(again) != batches


def test_oversized_structure_gets_its_own_batch():
    sampler = BoundedBatchSampler([3, 20, 3], max_atoms=10)
    assert list(sampler) == [[0], [1], [2]]


def test_sampler_needs_a_bound():
    with pytest.raises(ValueError, match="at least one"):
        BoundedBatchSampler([1, 2])
