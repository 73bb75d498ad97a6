"""GraphDataset, make_loader and open_dataset: graphs, bounded batches, shuffling, HDF5 streaming."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from mlip.data.datasets import ConcatSource, GraphDataset, make_loader, open_dataset
from mlip.data.formats import DataError, HDF5Reader, write_hdf5
from mlip.data.graph import AtomGraph
from mlip.data.transforms import atoms_to_graph

R_MAX = 3.2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_frames(n: int = 12, seed: int = 0) -> list[Atoms]:
    """Labelled canonical frames of varied size: EMT crystals (stress) and molecules (charge/spin)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        if i % 3 == 2:
            a = molecule(["CH4", "H2O", "NH3"][(i // 3) % 3])
            a.info["charge"] = float(i % 2)
            a.info["spin"] = 1.0 + float(i % 2)
            a.info["energy"] = float(rng.normal())
            a.arrays["forces"] = rng.normal(size=(len(a), 3))
        else:
            a = bulk(["Cu", "Au"][i % 2], "fcc", a=3.7, cubic=bool(i % 4 == 0)).repeat((1 + i % 3, 1, 1))
            a.positions += rng.normal(scale=0.05, size=a.positions.shape)
            a.calc = EMT()
            energy, forces, stress = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
            a.calc = None
            a.info["energy"], a.info["stress"] = float(energy), stress
            a.arrays["forces"] = forces
            a.info["weight"] = 2.0
        a.info["source"] = f"made frame {i}"
        frames.append(a)
    return frames


def assert_graph_equal(g: AtomGraph, h: AtomGraph) -> None:
    for name in ("positions", "numbers", "cell", "pbc", "edge_index", "unit_shifts", "energy", "forces",
                 "stress", "charge", "spin", "weight"):
        torch.testing.assert_close(getattr(g, name), getattr(h, name), rtol=0, atol=0, equal_nan=True, msg=name)
    assert g.head == h.head


def test_dataset_items_equal_atoms_to_graph():
    frames = make_frames()
    ds = GraphDataset(frames, R_MAX)
    assert len(ds) == len(frames)
    for i, atoms in enumerate(frames):
        assert_graph_equal(ds[i], atoms_to_graph(atoms, R_MAX))
    np.testing.assert_array_equal(ds.n_atoms, [len(a) for a in frames])
    edges = ds.n_edges
    np.testing.assert_array_equal(edges, [atoms_to_graph(a, R_MAX).n_edges for a in frames])
    assert ds.n_edges is edges  # computed once, then cached
    assert edges.min() > 0


def test_head_override():
    frames = make_frames(4)
    frames[0].info["head"] = "pbe"
    assert GraphDataset(frames, R_MAX)[0].head == "pbe"
    assert GraphDataset(frames, R_MAX)[1].head == "default"
    tagged = GraphDataset(frames, R_MAX, head="wb97")
    assert {tagged[i].head for i in range(4)} == {"wb97"}


@pytest.fixture(scope="module")
def dataset15() -> tuple[GraphDataset, list[AtomGraph]]:
    """A 15-structure dataset with its edge counts cached, and the reference graphs."""
    frames = make_frames(15)
    ds = GraphDataset(frames, R_MAX)
    ds.n_edges  # noqa: B018 (fill the cache once for all tests)
    return ds, [atoms_to_graph(a, R_MAX) for a in frames]


@pytest.mark.parametrize("bounds", [{"max_atoms": 10}, {"max_edges": 150}, {"max_graphs": 3},
                                    {"max_atoms": 9, "max_edges": 120, "max_graphs": 2}])
def test_loader_respects_bounds_and_covers_every_index_once(bounds, dataset15):
    ds, graphs = dataset15
    np.testing.assert_array_equal(ds.n_edges, [g.n_edges for g in graphs])
    loader = make_loader(ds, shuffle=True, seed=3, **bounds)
    batches = loader.batch_sampler.batches()
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(ds)))  # every index exactly once per epoch
    n_batches = 0
    for batch, idx in zip(loader, batches):
        n_batches += 1
        assert batch.n_graphs == len(idx)
        if len(idx) > 1:  # a single over-sized structure may form a batch of its own
            assert batch.n_atoms <= bounds.get("max_atoms", 10**9)
            assert batch.n_edges <= bounds.get("max_edges", 10**9)
            assert batch.n_graphs <= bounds.get("max_graphs", 10**9)
        # the batch holds exactly those structures, in that order
        torch.testing.assert_close(batch.positions, torch.cat([graphs[i].positions for i in idx]))
        torch.testing.assert_close(batch.energy, torch.stack([graphs[i].energy for i in idx]))
        assert batch.n_edges == sum(graphs[i].n_edges for i in idx)
    assert n_batches == len(batches) > 1


def test_shuffle_reproducible_by_seed(dataset15):
    ds, _ = dataset15
    a = make_loader(ds, max_atoms=12, shuffle=True, seed=7).batch_sampler.batches()
    b = make_loader(ds, max_atoms=12, shuffle=True, seed=7).batch_sampler.batches()
    c = make_loader(ds, max_atoms=12, shuffle=True, seed=8).batch_sampler.batches()
    plain = make_loader(ds, max_atoms=12).batch_sampler.batches()
    assert a == b
    assert a != c
    assert [i for bt in plain for i in bt] == list(range(15))  # no shuffle: file order
    # set_epoch reshuffles, reproducibly
    sampler = make_loader(ds, max_atoms=12, shuffle=True, seed=7).batch_sampler
    sampler.set_epoch(1)
    e1 = sampler.batches()
    assert e1 != a and sorted(i for bt in e1 for i in bt) == list(range(15))
    sampler.set_epoch(0)
    assert sampler.batches() == a


def test_make_loader_needs_a_bound():
    with pytest.raises(ValueError, match="at least one"):
        make_loader(GraphDataset(make_frames(2), R_MAX))


def test_hdf5_dataset_equals_in_memory(tmp_path):
    frames = make_frames(10)
    h5 = tmp_path / "frames.h5"
    write_hdf5(frames, h5)
    mem = GraphDataset(frames, R_MAX)
    disk = open_dataset(h5, R_MAX)
    assert isinstance(disk.source, HDF5Reader)
    assert len(disk) == len(mem)
    np.testing.assert_array_equal(disk.n_atoms, mem.n_atoms)
    np.testing.assert_array_equal(disk.n_edges, mem.n_edges)
    for i in range(len(mem)):
        assert_graph_equal(disk[i], mem[i])
    # batches from worker processes (the reader is pickled and reopened) equal in-memory ones
    for b_disk, b_mem in zip(make_loader(disk, max_atoms=16, num_workers=1), make_loader(mem, max_atoms=16)):
        torch.testing.assert_close(b_disk.forces, b_mem.forces, equal_nan=True)
        torch.testing.assert_close(b_disk.edge_index, b_mem.edge_index)


def test_open_dataset_concatenates_formats_and_tags_head(tmp_path):
    frames = make_frames(9)
    xyz, h5 = tmp_path / "a.xyz", tmp_path / "b.h5"
    ase.io.write(xyz, frames[:4], format="extxyz")
    write_hdf5(frames[4:], h5)
    ds = open_dataset([xyz, h5], R_MAX, head="mixed")
    assert isinstance(ds.source, ConcatSource) and len(ds) == 9
    np.testing.assert_array_equal(ds.n_atoms, [len(a) for a in frames])
    assert {ds[i].head for i in range(9)} == {"mixed"}
    for i in (0, 3, 4, 8):
        g, ref = ds[i], atoms_to_graph(frames[i], R_MAX)
        torch.testing.assert_close(g.positions, ref.positions, atol=1e-8, rtol=0)  # extxyz keeps 8 decimals
        torch.testing.assert_close(g.energy, ref.energy)
        assert g.n_edges == ref.n_edges
    assert ds.source[-1].info["source"] == f"{h5} frame 4"


def test_open_dataset_required_labels(tmp_path):
    frames = make_frames(6)
    del frames[4].arrays["forces"]
    h5, xyz = tmp_path / "f.h5", tmp_path / "f.xyz"
    write_hdf5(frames, h5)
    ase.io.write(xyz, frames, format="extxyz")
    assert len(open_dataset(h5, R_MAX, required=("energy",))) == 6
    for path in (h5, xyz):
        with pytest.raises(DataError, match=r"frame 4.*forces"):
            open_dataset(path, R_MAX, required=("energy", "forces"))
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "missing.xyz", R_MAX)


def test_bundled_data_opens():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "emt_crystals.xyz"
    ds = open_dataset(path, r_max=4.0, required=("energy", "forces"))
    assert len(ds) == int(ds.n_atoms.size) > 300
    g = ds[0]
    assert torch.isfinite(g.stress).all() and g.n_edges > 0
