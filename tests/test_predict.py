"""``mlip predict``: every input frame written back in order, labels kept, predictions added under the
prefix, in several batches, equal to the calculator's values (float64 exactly, float32 to round-off)."""
from __future__ import annotations

import numpy as np
import pytest
from ase.io import read
from click.testing import CliRunner
from toy_models import ToyPair, ToyPairConfig, write_emt_data

from mlip.calculator import MLIPCalculator
from mlip.models.base import save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")


@pytest.fixture()
def setup(tmp_path):
    """A toy Cu/Ag pair model and 10 labelled EMT frames (crystals of 4 and 8 atoms, two isolated atoms)."""
    model = ToyPair(ToyPairConfig(elements=[29, 47], r_max=4.0, seed=3)).double()
    model_path = tmp_path / "toy.pt"
    save_model(model, model_path)
    data = tmp_path / "data.extxyz"
    frames = write_emt_data(data, n=8)
    # a key the reader does not know about must survive too
    written = read(data, index=":")
    for k, a in enumerate(written):
        a.info["tag"] = f"frame-{k}"
    from ase.io import write

    write(data, written)
    return model_path, data, frames


def _calculator_results(model_path, atoms, dtype):
    a = atoms.copy()
    a.calc = MLIPCalculator(str(model_path), device="cpu", dtype=dtype)
    return a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False) if a.pbc.all() else None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_predict_writes_every_frame_with_labels_and_calculator_values(setup, tmp_path, dtype):
    from mlip.cli.main import main

    model_path, data, frames = setup
    out = tmp_path / "pred.extxyz"
    # 20 atoms per call: the 10 frames go in several batches of different sizes
    result = CliRunner().invoke(main, ["predict", str(model_path), str(data), str(data), "--out", str(out),
                                       "--batch-atoms", "20", "--device", "cpu", "--dtype", dtype])
    assert result.exit_code == 0, result.output
    pred = read(out, index=":")
    inputs = read(data, index=":") * 2
    assert len(pred) == len(inputs) == 2 * len(frames)
    tol = {"float64": 1e-8, "float32": 2e-5}[dtype]  # float64: the 8 decimals extxyz writes per-atom arrays with
    for a, b in zip(pred, inputs):
        # the frame itself and its labels, unchanged and in order
        assert a.info["tag"] == b.info["tag"]
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-12)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-7)  # extxyz digits
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-7)
        # the predictions: the calculator's values
        energy, forces, stress = _calculator_results(model_path, b, dtype)
        assert a.info["mlip_energy"] == pytest.approx(energy, abs=tol * max(1.0, abs(energy)))
        np.testing.assert_allclose(a.arrays["mlip_forces"], forces, atol=tol * max(1.0, np.abs(forces).max()))
        if stress is None:
            assert "mlip_stress" not in a.info  # isolated atoms: no stress
        else:
            np.testing.assert_allclose(np.reshape(a.info["mlip_stress"], (3, 3)), stress, atol=tol)
    assert sum("mlip_stress" in a.info for a in pred) == 2 * 8


def test_predict_prefix_head_and_errors(setup, tmp_path):
    from mlip.cli.main import main

    model_path, data, _ = setup
    out = tmp_path / "pred.extxyz"
    result = CliRunner().invoke(main, ["predict", str(model_path), str(data), "--out", str(out), "--prefix", "toy_",
                                       "--head", "default", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    first = read(out, index=0)
    assert "toy_energy" in first.info and "toy_forces" in first.arrays and "mlip_energy" not in first.info
    result = CliRunner().invoke(main, ["predict", str(model_path), str(data), "--out", str(out), "--prefix", ""])
    assert result.exit_code != 0 and "--prefix must not be empty" in result.output
    unknown = tmp_path / "h2o.extxyz"
    from ase.build import molecule
    from ase.io import write

    write(unknown, molecule("H2O"))
    result = CliRunner().invoke(main, ["predict", str(model_path), str(unknown), "--out", str(out), "--device", "cpu"])
    assert result.exit_code != 0 and "not trained on element(s) ['H', 'O']" in result.output


def test_batched_predictions_equal_the_calculator_exactly(setup):
    """Before the file's 8 decimals: one batch of all frames against the calculator, float64."""
    import torch
    from mlip.cli.predict import predict_frames

    from mlip.calculator.ase import prepare_model

    model_path, data, _ = setup
    frames = read(data, index=":")
    net = prepare_model(str(model_path), "cpu", "float64")
    results = predict_frames(net, frames, torch.float64, torch.device("cpu"))
    for atoms, r in zip(frames, results):
        energy, forces, stress = _calculator_results(model_path, atoms, "float64")
        assert r["energy"] == pytest.approx(energy, abs=1e-10)
        np.testing.assert_allclose(r["forces"], forces, atol=1e-12)
        if stress is not None:
            np.testing.assert_allclose(r["stress"], stress, atol=1e-12)
