"""Neighbour lists: edge-for-edge equality with ASE, ordering, batching, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.neighborlist import primitive_neighbor_list

from mlip.data.neighbors import _torch_neighbor_list, available_backends, batch_neighbor_list, neighbor_list


def ase_edges(pos: np.ndarray, cell: np.ndarray, pbc, r_max: float) -> dict:
    """{(receiver, sender, shift): distance} from ASE (float64 arithmetic)."""
    i, j, S, d = primitive_neighbor_list(
        "ijSd", np.asarray(pbc), np.asarray(cell, dtype=np.float64), np.asarray(pos, dtype=np.float64), r_max
    )
    return {(a, b, tuple(s)): dist for a, b, s, dist in zip(i.tolist(), j.tolist(), S.tolist(), d.tolist())}


def our_edges(pos, cell, pbc, r_max: float, backend: str = "torch", dtype=torch.float64) -> dict:
    p = torch.as_tensor(np.asarray(pos), dtype=dtype)
    c = torch.as_tensor(np.asarray(cell), dtype=dtype)
    ei, shifts = neighbor_list(p, c, torch.tensor(pbc), r_max, backend=backend)
    assert ei.dtype == torch.long and shifts.dtype == torch.long
    assert ei.shape[0] == 2 and shifts.shape == (ei.shape[1], 3)
    sender, receiver = ei
    vec = p.double()[sender] - p.double()[receiver] + shifts.double() @ c.double()
    dist = torch.linalg.norm(vec, dim=1)
    out = {}
    for r, s, sh, d in zip(receiver.tolist(), sender.tolist(), shifts.tolist(), dist.tolist()):
        key = (r, s, tuple(sh))
        assert key not in out, f"duplicate edge {key}"
        out[key] = d
    return out


def assert_same_as_ase(pos, cell, pbc, r_max, backend="torch", dtype=torch.float64):
    # ASE sees exactly the values we see (a float32 input is widened to float64 for both)
    pos64 = torch.as_tensor(np.asarray(pos), dtype=dtype).double().numpy()
    cell64 = torch.as_tensor(np.asarray(cell), dtype=dtype).double().numpy()
    ref = ase_edges(pos64, cell64, pbc, r_max)
    got = our_edges(pos, cell, pbc, r_max, backend=backend, dtype=dtype)
    assert set(got) == set(ref), (
        f"{len(set(got) - set(ref))} extra, {len(set(ref) - set(got))} missing edges vs ASE"
    )
    keys = sorted(ref)
    np.testing.assert_allclose([got[k] for k in keys], [ref[k] for k in keys], rtol=0, atol=1e-10)
    assert all(d < r_max for d in got.values())
    # the inverse of every edge is an edge (full list)
    assert all((s, r, tuple(-x for x in sh)) in got for r, s, sh in got)
    return got


def random_triclinic(seed: int, n: int = 24, scale: float = 6.0):
    rng = np.random.default_rng(seed)
    cell = np.eye(3) * scale + rng.normal(scale=1.2, size=(3, 3))
    pos = rng.uniform(0, 1, size=(n, 3)) @ cell
    return pos, cell


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_triclinic_full_pbc(seed):
    pos, cell = random_triclinic(seed)
    edges = assert_same_as_ase(pos, cell, [True, True, True], 4.5)
    assert len(edges) > 100  # non-trivial: many periodic images


@pytest.mark.parametrize(
    "pbc", [[True, True, False], [False, True, False], [True, False, True], [False, False, True]]
)
def test_mixed_pbc(pbc):
    pos, cell = random_triclinic(7)
    edges = assert_same_as_ase(pos, cell, pbc, 4.5)
    for _, _, sh in edges:  # no shifts along non-periodic directions
        assert all(s == 0 for s, p in zip(sh, pbc) if not p)


def test_slab_with_zero_and_skewed_nonperiodic_vector():
    pos, cell = random_triclinic(3)
    pos = pos.copy()
    pos[:, 2] *= 3.0  # atoms spread beyond the cell along the non-periodic direction
    ref = assert_same_as_ase(pos, cell, [True, True, False], 4.0)
    # the cell vector along a non-periodic direction is irrelevant: zero, skewed or tiny
    for c in (np.zeros(3), np.array([3.0, -2.0, 0.4]), np.array([0.0, 0.0, 1e-3])):
        cell2 = cell.copy()
        cell2[2] = c
        assert our_edges(pos, cell2, [True, True, False], 4.0) == pytest.approx(ref, abs=1e-10)
    # even a NaN row there is ignored
    cell_nan, cell_zero = torch.tensor(cell), torch.tensor(cell)
    cell_nan[2], cell_zero[2] = float("nan"), 0.0
    pbc = torch.tensor([True, True, False])
    for backend in available_backends():
        a = neighbor_list(torch.tensor(pos), cell_nan, pbc, 4.0, backend=backend)
        b = neighbor_list(torch.tensor(pos), cell_zero, pbc, 4.0, backend="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape[1] == len(ref)


def test_molecule_zero_cell():
    atoms = molecule("C6H6")
    got = assert_same_as_ase(atoms.positions, np.zeros((3, 3)), [False] * 3, 2.5)
    assert all(sh == (0, 0, 0) for _, _, sh in got)
    # far-apart fragments: nothing connects them
    pos = np.concatenate([atoms.positions, atoms.positions + [200.0, 0, 0]])
    got2 = assert_same_as_ase(pos, np.zeros((3, 3)), [False] * 3, 2.5)
    assert len(got2) == 2 * len(got)


def test_cell_much_smaller_than_cutoff():
    atoms = bulk("Cu", "fcc", a=3.61)  # one atom, primitive cell, heights ~2.08 Å
    got = assert_same_as_ase(atoms.positions, atoms.cell.array, [True] * 3, 6.0)
    # every edge is an image of atom 0: fcc shells a*sqrt(k/2) below 6 Å hold 12+6+24+12+24 points
    assert len(got) == 78
    assert all(r == 0 and s == 0 for r, s, _ in got)


def test_triclinic_small_cell_many_images():
    pos, cell = random_triclinic(11, n=3, scale=2.0)
    assert_same_as_ase(pos, cell, [True, True, True], 5.0)
    assert_same_as_ase(pos, cell, [True, False, True], 5.0)


def test_atoms_outside_the_cell():
    pos, cell = random_triclinic(5)
    rng = np.random.default_rng(5)
    n_img = rng.integers(-3, 4, size=(len(pos), 3))  # atom i moved by n_img[i] cells
    outside = pos + n_img @ cell
    got = assert_same_as_ase(outside, cell, [True] * 3, 4.5)
    inside = our_edges(pos, cell, [True] * 3, 4.5)
    # shifts refer to the positions as given: S_outside = S_inside + n_img[i] - n_img[j]
    moved = {(r, s, tuple(np.array(sh) + n_img[r] - n_img[s])): d for (r, s, sh), d in inside.items()}
    assert set(moved) == set(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_inputs(dtype):
    pos, cell = random_triclinic(2)
    assert_same_as_ase(pos, cell, [True] * 3, 4.5, dtype=dtype)
    assert_same_as_ase(pos, cell, [True, True, False], 4.5, dtype=dtype)


@pytest.mark.parametrize("backend", available_backends())
def test_every_backend_returns_identical_tensors(backend):
    pos, cell = random_triclinic(4)
    p, c = torch.tensor(pos), torch.tensor(cell)
    for pbc in ([True] * 3, [True, False, True], [False] * 3):
        ref = neighbor_list(p, c, torch.tensor(pbc), 4.5, backend="torch")
        got = neighbor_list(p, c, torch.tensor(pbc), 4.5, backend=backend)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_ordering_is_receiver_sender_shift_and_deterministic():
    pos, cell = random_triclinic(6, n=10, scale=4.0)
    p, c, pbc = torch.tensor(pos), torch.tensor(cell), torch.tensor([True] * 3)
    ei, sh = neighbor_list(p, c, pbc, 5.0)
    rows = list(zip(ei[1].tolist(), ei[0].tolist(), map(tuple, sh.tolist())))
    assert rows == sorted(rows)
    ei2, sh2 = neighbor_list(p, c, pbc, 5.0)
    assert torch.equal(ei, ei2) and torch.equal(sh, sh2)


def test_chunked_candidates_match_unchunked():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=1)
    p, c, pbc = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), torch.tensor([True] * 3)
    ref = _torch_neighbor_list(p, c, pbc, 5.0)
    for bins_per_cutoff in (1, 3):
        got = _torch_neighbor_list(p, c, pbc, 5.0, max_pairs_per_chunk=1500, bins_per_cutoff=bins_per_cutoff)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert_same_as_ase(atoms.positions, atoms.cell.array, [True] * 3, 5.0)


def test_sparse_system_in_huge_box():
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [100.0, 100.0, 100.0], [199.0, 199.5, 199.0]])
    got = assert_same_as_ase(pos, np.eye(3) * 200.0, [True] * 3, 3.0)
    assert {(r, s) for r, s, _ in got} == {(0, 1), (1, 0), (0, 3), (3, 0), (1, 3), (3, 1)}
    assert_same_as_ase(pos * 1e3, np.zeros((3, 3)), [False] * 3, 3.0)


def test_empty_and_single_atom():
    ei, sh = neighbor_list(torch.zeros(0, 3), torch.eye(3) * 3, torch.tensor([True] * 3), 2.0)
    assert ei.shape == (2, 0) and sh.shape == (0, 3)
    ei, sh = neighbor_list(torch.zeros(1, 3), torch.zeros(3, 3), torch.tensor([False] * 3), 2.0)
    assert ei.shape == (2, 0)


def test_batch_matches_per_structure():
    structures = [random_triclinic(s, n=5 + 3 * s, scale=4.0 + s) for s in range(3)]
    pbcs = [[True] * 3, [True, True, False], [False] * 3]
    structures.append((molecule("H2O").positions, np.zeros((3, 3))))
    pbcs.append([False] * 3)
    pos = torch.tensor(np.concatenate([p for p, _ in structures]))
    cell = torch.tensor(np.stack([c for _, c in structures]))
    pbc = torch.tensor(pbcs)
    sizes = [len(p) for p, _ in structures]
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ei, sh = batch_neighbor_list(pos, cell, pbc, batch, 4.0)
    expected_e, expected_s, offset = [], [], 0
    for (p, c), pb in zip(structures, pbcs):
        e, s = neighbor_list(torch.tensor(p), torch.tensor(c), torch.tensor(pb), 4.0)
        expected_e.append(e + offset)
        expected_s.append(s)
        offset += len(p)
    assert torch.equal(ei, torch.cat(expected_e, 1)) and torch.equal(sh, torch.cat(expected_s))
    # an unsorted batch vector gives the same edges, in global indices
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))
    ei_p, sh_p = batch_neighbor_list(pos[perm], cell, pbc, batch[perm], 4.0)
    ref = {(s, r, tuple(x)) for s, r, x in zip(ei[0].tolist(), ei[1].tolist(), sh.tolist())}
    got = {
        (int(perm[s]), int(perm[r]), tuple(x))
        for s, r, x in zip(ei_p[0].tolist(), ei_p[1].tolist(), sh_p.tolist())
    }
    assert got == ref


def test_errors():
    pos = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        neighbor_list(pos, torch.zeros(3, 3, dtype=torch.float64), torch.tensor([True] * 3), 3.0)
    with pytest.raises(ValueError, match="zero"):
        neighbor_list(pos, torch.zeros(3, 3, dtype=torch.float64), torch.tensor([True, True, False]), 3.0)
    bad = pos.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        neighbor_list(bad, torch.eye(3, dtype=torch.float64) * 3, torch.tensor([True] * 3), 3.0)
    with pytest.raises(ValueError, match="backend"):
        neighbor_list(pos, torch.eye(3, dtype=torch.float64), torch.tensor([True] * 3), 3.0, backend="nope")
    with pytest.raises(ValueError, match="r_max"):
        neighbor_list(pos, torch.eye(3, dtype=torch.float64), torch.tensor([True] * 3), -1.0)


@pytest.mark.parametrize("backend,module", [("vesin", "vesin"), ("matscipy", "matscipy.neighbours")])
def test_missing_optional_backend_is_a_clear_error(monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=f"pip install {backend}"):
        neighbor_list(torch.rand(3, 3), torch.eye(3) * 5, torch.tensor([True] * 3), 2.0, backend=backend)
