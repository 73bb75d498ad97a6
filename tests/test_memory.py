"""Memory budget of the calculator: predicted peak memory, automatic edge chunking that leaves
results unchanged, and a clear error (no stale results) when nothing fits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from mlip.calculator import MLIPCalculator
from mlip.calculator.memory import MemoryBudgetError, MemoryModel, saved_bytes
from mlip.data.graph import collate
from mlip.data.transforms import atoms_to_graph
from mlip.models.base import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"r_max": 4.0, "num_channels": 8, "lmax": 2, "hidden_lmax": 1, "num_layers": 2, "correlation": 2,
         "elements": [29], "avg_num_neighbors": 20.0}


def _model(family: str = "equivariant"):
    cfg = SMALL if family == "equivariant" else {"r_max": 4.0, "elements": [29], "num_channels": 8}
    return build_model(family, cfg).double().eval()


def _crystal(k: int = 3):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(k)
    atoms.rattle(0.05, seed=0)
    return atoms


def test_memory_model_predicts_saved_bytes_of_a_larger_structure():
    model = _model()
    memory = MemoryModel.measure(model, torch.device("cpu"), torch.float64)
    assert memory.per_edge > 0 and memory.chunked_per_edge is not None
    assert memory.chunked_per_edge < 0.5 * memory.per_edge  # chunking keeps per-edge tensors out
    batch = collate([atoms_to_graph(_crystal(3), model.r_max)])
    measured = saved_bytes(model, batch)
    fitted = memory.per_edge * batch.n_edges + memory.per_atom * batch.n_atoms
    assert 0.7 * measured < fitted < 1.4 * measured, (fitted, measured)


def test_a_small_budget_chunks_the_edges_and_changes_nothing(monkeypatch):
    model = _model()
    atoms = _crystal(3)
    atoms.calc = MLIPCalculator(model, dtype="float64")
    want_f, want_s = atoms.get_forces(), atoms.get_stress()
    calc = MLIPCalculator(model, dtype="float64", max_memory_gb=1e-9)  # measure the model, then size
    memory = MemoryModel.measure(model, torch.device("cpu"), torch.float64)
    n_edges = collate([atoms_to_graph(atoms, model.r_max)]).n_edges
    unchunked = memory.peak(len(atoms), n_edges)
    chunked = memory.peak(len(atoms), n_edges, chunk=n_edges // 8)
    calc.max_memory_gb = 0.5 * (unchunked + chunked) / 2**30  # fits only with chunks
    chunks = []
    real = type(model).set_edge_chunk_size
    monkeypatch.setattr(type(model), "set_edge_chunk_size", lambda self, k: (chunks.append(k), real(self, k))[1])
    other = atoms.copy()
    other.calc = calc
    np.testing.assert_allclose(other.get_forces(), want_f, rtol=0, atol=1e-10)
    np.testing.assert_allclose(other.get_stress(), want_s, rtol=0, atol=1e-12)
    used = [k for k in chunks if k not in (None, 64)]  # 64: the measurement's probe chunk
    assert used and all(0 < k < n_edges for k in used)
    assert model.config.edge_chunk_size is None  # the user's model is left as it was


@pytest.mark.parametrize("family", ["equivariant", "frame-averaged"])
def test_nothing_fits_raises_before_computing_and_keeps_no_results(family):
    model = _model(family)
    atoms = _crystal(2)
    calc = MLIPCalculator(model, dtype="float64")
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.results
    calc.max_memory_gb = 1e-9
    atoms.positions[0, 0] += 0.01
    why = "smallest edge chunks" if family == "equivariant" else "cannot chunk edges"
    with pytest.raises(MemoryBudgetError, match=why) as err:
        atoms.get_potential_energy()
    assert "raise max_memory_gb" in str(err.value)
    assert calc.results == {} and calc.atoms is None


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "8"])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="max_memory_gb"):
        MLIPCalculator(_model(), max_memory_gb=bad)


def test_md_and_relax_commands_take_the_budget(tmp_path):
    from ase.io import write
    from click.testing import CliRunner

    from mlip.cli.main import main
    from mlip.models.base import save_model

    save_model(_model(), tmp_path / "model.pt")
    write(tmp_path / "cu.xyz", _crystal(2))
    base_md = ["md", str(tmp_path / "model.pt"), str(tmp_path / "cu.xyz"), "--steps", "2", "--dtype", "float64",
               "--out", str(tmp_path / "md.xyz"), "--no-progress"]
    ok = CliRunner().invoke(main, base_md + ["--max-memory-gb", "4"])
    assert ok.exit_code == 0, ok.output
    tiny = CliRunner().invoke(main, base_md + ["--max-memory-gb", "1e-9"])
    assert tiny.exit_code == 1 and "max_memory_gb" in tiny.output and "Traceback" not in tiny.output
    for mode in ("--sequential", "--batched"):
        relax = CliRunner().invoke(main, ["relax", str(tmp_path / "model.pt"), str(tmp_path / "cu.xyz"), mode,
                                          "--max-memory-gb", "1e-9", "--out", str(tmp_path / "relaxed")])
        assert relax.exit_code == 1 and "max_memory_gb" in relax.output, (mode, relax.output)


def test_batched_relaxation_chunks_to_the_budget_and_changes_nothing(monkeypatch):
    """``relax_batch`` runs every step's batched call through the same budget as the calculator:
    a budget that fits only with edge chunks gives the same relaxed structures, and one that
    nothing fits raises before the first step."""
    from mlip.md.relaxation import relax_batch

    model = _model()
    structures = [_crystal(2), _crystal(2)]
    structures[1].rattle(0.05, seed=3)
    want = relax_batch(structures, model, fmax=0.01, max_steps=20, dtype="float64")
    memory = MemoryModel.measure(model, torch.device("cpu"), torch.float64)
    n_edges = collate([atoms_to_graph(a, model.r_max) for a in structures]).n_edges
    n_atoms = sum(len(a) for a in structures)
    fits_chunked = 0.5 * (memory.peak(n_atoms, n_edges) + memory.peak(n_atoms, n_edges, chunk=n_edges // 8))
    chunks = []
    real = type(model).set_edge_chunk_size
    monkeypatch.setattr(type(model), "set_edge_chunk_size", lambda self, k: (chunks.append(k), real(self, k))[1])
    got = relax_batch(structures, model, fmax=0.01, max_steps=20, dtype="float64", max_memory_gb=fits_chunked / 2**30)
    assert [k for k in chunks if k not in (None, 64)]  # the steps ran chunked (64: the probe chunk)
    for a, b in zip(want, got):
        assert a.steps == b.steps
        np.testing.assert_allclose(b.atoms.positions, a.atoms.positions, rtol=0, atol=1e-9)
        assert abs(a.energy - b.energy) < 1e-9
    with pytest.raises(MemoryBudgetError, match="raise max_memory_gb"):
        relax_batch(structures, model, fmax=0.01, max_steps=20, dtype="float64", max_memory_gb=1e-9)
    with pytest.raises(ValueError, match="max_memory_gb"):
        relax_batch(structures, model, max_memory_gb=-1.0)
