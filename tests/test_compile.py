"""torch.compile of the energy/forces/stress function (:mod:`mlip.models.compile`): compiled equals eager
for the calculator (energy, forces, stress) on a tiny equivariant model, a structure of another size
reuses the compiled function, a failing compilation warns and returns eager results (so does a forward
with data-dependent sizes, refused after tracing), training through
the compiled function (forces in the loss: a double backward) gives eager's gradients and trajectory,
and ``train.compile`` refuses what it cannot compile.

The equivariant model is as small as the family allows, so that Inductor compiles it once per module
(tens of seconds on an idle CPU, longer on a busy one); the training tests use the toy pair potential.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_models
from ase.build import bulk
from torch._dynamo.utils import counters

from mlip.calculator import MLIPCalculator
from mlip.data.graph import collate
from mlip.models.base import build_model
from mlip.models.compile import CompiledPotential, compile_problem
from mlip.models.outputs import predict
from mlip.train.config import ConfigError, config_from_mapping
from mlip.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the equivariant family at its smallest: one layer, l <= 1, 6 channels (no size equals a count of atoms)
TINY = {"elements": [14], "r_max": 4.0, "num_channels": 6, "lmax": 1, "hidden_lmax": 1, "num_layers": 1,
        "correlation": 2, "radial_mlp": [8], "readout_hidden": 4, "avg_num_neighbors": 12.0}


def silicon(repeat: tuple[int, int, int], seed: int):
    """A rattled diamond Si cell (8 atoms per cubic cell), 0.1 Å displacements."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.rattle(0.1, seed=seed)
    return atoms


def results(calc: MLIPCalculator, atoms) -> dict[str, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = calc
    return {"energy": np.array(atoms.get_potential_energy()), "forces": atoms.get_forces(),
            "stress": atoms.get_stress()}


def assert_close(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], rtol: float) -> None:
    """Equal to ``rtol`` relative to each quantity's largest magnitude (float32 round-off: ~1e-6)."""
    for key, r in ref.items():
        scale = float(np.abs(r).max()) + 1e-3
        np.testing.assert_allclose(got[key], r, rtol=0, atol=rtol * scale, err_msg=key)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("equivariant", TINY).float().eval()


@pytest.fixture(scope="module")
def compiled_calc(tiny_model):
    """A float32 calculator with ``compile=True`` that has compiled on a 32-atom cell.

    At least 29 atoms: Inductor writes a CPU matrix product of total size <= 32 as a pointwise product
    and guards on it (``n_atoms + readout_hidden <= 32`` for the readout's backward), so a first
    structure below that size would be compiled once more for the first one above it.
    """
    torch._dynamo.reset()
    calc = MLIPCalculator(tiny_model, device="cpu", dtype="float32", compile=True)
    results(calc, silicon((1, 2, 2), seed=0))
    return calc


def test_compiled_calculator_equals_eager(tiny_model, compiled_calc):
    eager = MLIPCalculator(tiny_model, device="cpu", dtype="float32")
    atoms = silicon((1, 2, 2), seed=1)
    got, ref = results(compiled_calc, atoms), results(eager, atoms)
    assert compiled_calc.model.failed is None and compiled_calc.model.n_compiled == 1
    assert np.abs(ref["forces"]).max() > 0.01 and np.abs(ref["stress"]).max() > 1e-4  # real forces and stress
    assert_close(got, ref, rtol=1e-5)
    # float64 reference: compiled float32 is as close to it as eager float32 is (round-off, not a bug)
    ref64 = results(MLIPCalculator(tiny_model, device="cpu", dtype="float64"), atoms)
    for key in ("forces", "stress"):
        assert np.abs(got[key] - ref64[key]).max() < 10 * np.abs(ref[key] - ref64[key]).max() + 1e-6


def test_other_sizes_reuse_the_compiled_function(tiny_model, compiled_calc):
    eager = MLIPCalculator(tiny_model, device="cpu", dtype="float32")
    graphs = counters["stats"]["unique_graphs"]
    for repeat in ((3, 2, 1), (2, 2, 2), (3, 2, 2)):  # 48, 64, 96 atoms: other atom and edge counts
        atoms = silicon(repeat, seed=sum(repeat))
        assert_close(results(compiled_calc, atoms), results(eager, atoms), rtol=1e-5)
    assert compiled_calc.model.n_compiled == 1  # no new trace
    assert counters["stats"]["unique_graphs"] == graphs  # and no recompilation by Dynamo
    assert compiled_calc.model.failed is None


def test_compiles_with_several_threads(tiny_model):
    """With more than one intra-op thread Inductor's CPU code sums a segment by a vectorised atomic add,
    which it cannot write into a one-element output (one structure's energy): the compiled function
    must still be used, not fall back to eager."""
    import warnings

    torch._dynamo.reset()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calc = MLIPCalculator(tiny_model, device="cpu", dtype="float32", compile=True)
        atoms = silicon((1, 2, 2), seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = results(calc, atoms)
    finally:
        torch.set_num_threads(before)
    assert calc.model.failed is None and calc.model.n_compiled == 1
    assert_close(got, results(MLIPCalculator(tiny_model, device="cpu", dtype="float32"), atoms), rtol=1e-5)


def test_failed_compilation_warns_once_and_runs_eager(tiny_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler in this test")

    monkeypatch.setattr(torch, "compile", broken)
    calc = MLIPCalculator(tiny_model, device="cpu", dtype="float32", compile=True)
    eager = MLIPCalculator(tiny_model, device="cpu", dtype="float32")
    atoms = silicon((1, 1, 1), seed=2)
    with pytest.warns(RuntimeWarning, match="runs eager: RuntimeError: no C\\+\\+ compiler in this test"):
        got = results(calc, atoms)
    ref = results(eager, atoms)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])  # the eager path itself
    assert "no C++ compiler" in calc.model.failed
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next structure runs eager silently
        results(calc, silicon((2, 1, 1), seed=3))


def test_data_dependent_forward_is_refused_after_tracing():
    """``skip_per_element`` loops over the elements present (``unique().tolist()``, ``nonzero``): a trace
    would fix the first structure's element set, so the wrapper refuses it before compiling."""
    model = build_model("equivariant", {**TINY, "num_layers": 2, "skip_per_element": True}).float().eval()
    calc = MLIPCalculator(model, device="cpu", dtype="float32", compile=True)
    atoms = silicon((1, 2, 2), seed=5)
    with pytest.warns(RuntimeWarning, match="data-dependent sizes or values .*aten.nonzero"):
        got = results(calc, atoms)
    ref = results(MLIPCalculator(model, device="cpu", dtype="float32"), atoms)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])


def test_models_that_cannot_be_compiled_warn_and_run_as_they_are():
    fa = build_model("frame-averaged", {"elements": [14], "r_max": 4.0, "num_channels": 8, "num_layers": 1})
    with pytest.warns(RuntimeWarning, match="'frame-averaged' family cannot be compiled"):
        calc = MLIPCalculator(fa, device="cpu", dtype="float64", compile=True)
    assert not isinstance(calc.model, CompiledPotential)
    results(calc, silicon((1, 1, 1), seed=4))
    multi = toy_models.ToyPair(toy_models.ToyPairConfig(elements=[29], heads=["a", "b"]))
    assert compile_problem(multi) is None  # one structure per call: its head is part of the compiled kind
    assert "several heads" in compile_problem(multi, training=True)


# --------------------------------------------------------------------------------------------- training
def _batches():
    model_r = 3.0
    graphs = [toy_models.graph_from_atoms(toy_models.rattled_cu((1, 1, 1 + i % 2), rattle=0.1, seed=i), model_r)
              for i in range(5)]
    return [collate(graphs[:2]), collate(graphs[2:5])]  # 2 and 3 structures: padded to 4


def _loss_grads(fn, model, batch):
    model.zero_grad()
    out = fn(batch)
    loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum() + 1e3 * (out["stress"] ** 2).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_through_the_compiled_function_gives_eager_gradients():
    model = toy_models.ToyPair(toy_models.ToyPairConfig(elements=[29], r_max=3.0)).train()
    compiled = CompiledPotential(model, training=True, min_graphs=4)
    for batch in _batches():
        got = _loss_grads(lambda b: compiled.predict(b, forces=True, stress=True, create_graph=True), model, batch)
        ref = _loss_grads(lambda b: predict(model, b, forces=True, stress=True, create_graph=True), model, batch)
        assert set(got) == set(ref) and ref
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12)
    assert compiled.failed is None and compiled.n_compiled == 1  # both batches padded to 4 structures


def _train_cfg(tmp_path: Path, data: Path, name: str, **train: object):
    return config_from_mapping({
        "output_dir": str(tmp_path / name), "dtype": "float64", "device": "cpu", "num_threads": 1,
        "model": {"family": "toy-pair", "r_max": 3.0},
        "data": {"train": str(data), "valid_fraction": 0.25},
        "batch": {"max_atoms": 16}, "optim": {"lr": 0.05, "warmup_steps": 2},
        "train": {"epochs": 2, "progress": False, **train},
    })


def test_train_compile_follows_the_eager_trajectory(tmp_path):
    data = tmp_path / "emt.xyz"
    toy_models.write_emt_data(data, n=12, seed=0)
    seen = []
    train(_train_cfg(tmp_path, data, "eager"))
    train(_train_cfg(tmp_path, data, "compiled", compile=True),
          hooks={"step": lambda state: seen.append((state.compiled.failed, state.compiled.n_compiled))})
    assert seen and all(failed is None for failed, _ in seen)
    assert seen[-1][1] <= 2  # one kind of call (two if some batch has no force labels)
    steps = [[json.loads(line)["loss"] for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
             for run in ("eager", "compiled")]
    assert len(steps[0]) == len(steps[1]) > 2
    np.testing.assert_allclose(steps[1], steps[0], rtol=1e-9)


def test_train_compile_refuses_a_multi_head_model(tmp_path):
    a, b = tmp_path / "a.xyz", tmp_path / "b.xyz"
    toy_models.write_emt_data(a, n=6, seed=0)
    toy_models.write_emt_data(b, n=6, seed=1)
    cfg = _train_cfg(tmp_path, a, "heads", compile=True)
    cfg.data.train = [{"path": str(a), "head": "a"}, {"path": str(b), "head": "b"}]
    with pytest.raises(ConfigError, match="train.compile: the model has several heads"):
        train(cfg)
