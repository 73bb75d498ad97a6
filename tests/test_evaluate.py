"""Evaluation metrics against hand-computed values; measured rotation-equivariance error;
the ``mlip evaluate`` command end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import write
from click.testing import CliRunner

import toy_models
from mlip.data.graph import AtomGraph, collate
from mlip.models.base import build_model, save_model
from mlip.train.equivariance import equivariance_error, random_rotation, rotate_batch
from mlip.train.metrics import Metrics

NAN = float("nan")


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _hand_batch():
    """Two structures with known labels; predictions chosen so every error is easy to write down."""
    a = AtomGraph(
        positions=torch.zeros(2, 3, dtype=torch.float64), numbers=torch.tensor([1, 8]),
        cell=torch.zeros(3, 3, dtype=torch.float64), pbc=torch.tensor([False] * 3),
        edge_index=torch.zeros(2, 0, dtype=torch.long), unit_shifts=torch.zeros(0, 3, dtype=torch.long),
        energy=_t(1.0), forces=torch.zeros(2, 3, dtype=torch.float64),
    )
    b = AtomGraph(
        positions=torch.zeros(3, 3, dtype=torch.float64), numbers=torch.tensor([1, 1, 1]),
        cell=torch.eye(3, dtype=torch.float64) * 3, pbc=torch.tensor([True] * 3),
        edge_index=torch.zeros(2, 0, dtype=torch.long), unit_shifts=torch.zeros(0, 3, dtype=torch.long),
        energy=_t(2.0), forces=torch.zeros(3, 3, dtype=torch.float64), stress=torch.zeros(3, 3, dtype=torch.float64),
    )
    batch = collate([a, b])
    pred = {
        "energy": _t([1.5, 1.0]),
        "forces": _t([[0.1, 0, 0], [0, -0.2, 0], [0.3, 0, 0], [0, 0, 0], [0, 0, 0]]),
        "stress": torch.stack([torch.zeros(3, 3, dtype=torch.float64), torch.diag(_t([0.01, 0.02, 0.03]))]),
    }
    return batch, pred


def test_metrics_match_hand_computed_values():
    batch, pred = _hand_batch()
    m = Metrics()
    m.update(pred, batch)
    s = m.summary()
    # energy errors +0.5 (2 atoms) and -1.0 (3 atoms)
    assert s["energy_mae"] == pytest.approx(0.75)
    assert s["energy_rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 2))
    assert s["energy_per_atom_mae"] == pytest.approx((0.25 + 1 / 3) / 2)
    assert s["energy_per_atom_rmse"] == pytest.approx(math.sqrt((0.0625 + 1 / 9) / 2))
    # 15 force components, nonzero errors 0.1, -0.2, 0.3
    assert s["forces_mae"] == pytest.approx(0.6 / 15)
    assert s["forces_rmse"] == pytest.approx(math.sqrt(0.14 / 15))
    assert s["forces_per_element"]["H"] == pytest.approx({"mae": 0.4 / 12, "rmse": math.sqrt(0.1 / 12), "n_atoms": 4})
    assert s["forces_per_element"]["O"] == pytest.approx({"mae": 0.2 / 3, "rmse": math.sqrt(0.04 / 3), "n_atoms": 1})
    # only structure b has a stress label (a's is NaN): 9 components, errors 0.01, 0.02, 0.03
    assert s["stress_mae"] == pytest.approx(0.06 / 9)
    assert s["stress_rmse"] == pytest.approx(math.sqrt(0.0014 / 9))
    assert s["n_structures"] == 2 and s["n_atoms"] == 5


def test_metrics_accumulate_over_batches_like_one_batch():
    batch, pred = _hand_batch()
    whole = Metrics()
    whole.update(pred, batch)
    parts = Metrics()
    for g, sl_atoms, sl_graph in ((0, slice(0, 2), slice(0, 1)), (1, slice(2, 5), slice(1, 2))):
        sub = collate([batch.split()[g]])
        parts.update({"energy": pred["energy"][sl_graph], "forces": pred["forces"][sl_atoms],
                      "stress": pred["stress"][sl_graph]}, sub)
    a, b = whole.summary(), parts.summary()
    for key in ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "stress_mae"):
        assert a[key] == pytest.approx(b[key])


def _crystal(seed: int):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.numbers[::3] = 29
    atoms.numbers[1::3] = 47
    atoms.rattle(0.1, seed=seed)
    return atoms


def test_rotation_matrices_are_proper_and_rotate_labels_consistently():
    gen = torch.Generator().manual_seed(0)
    r = random_rotation(gen)
    assert torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.det(r) == pytest.approx(1.0)
    graph = toy_models.graph_from_atoms(_crystal(0), 3.0)
    batch = collate([graph])
    rb = rotate_batch(batch, r)
    # edge vectors rotate with the structure (unit shifts unchanged)
    assert torch.allclose(rb.edge_vectors(), batch.edge_vectors() @ r.T, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_equivariance_error_is_roundoff_for_an_invariant_model(dtype, tol):
    model = build_model("toy-pair", {"r_max": 3.0, "elements": [29, 47]}).to(dtype)
    batch = collate([toy_models.graph_from_atoms(_crystal(s), 3.0) for s in range(2)]).to(dtype=dtype)
    err = equivariance_error(model, batch, n_rotations=3)
    assert err["energy_max"] < tol and err["forces_max"] < tol * 10
    assert err["forces_rel"] < tol * 10


def test_equivariance_error_detects_a_direction_dependent_model():
    model = build_model("toy-anisotropic", {"r_max": 3.0, "elements": [29, 47], "anisotropy": 1.0}).double()
    batch = collate([toy_models.graph_from_atoms(_crystal(s), 3.0) for s in range(2)])
    err = equivariance_error(model, batch, n_rotations=3)
    assert err["forces_max"] > 1e-4 and err["forces_rel"] > 1e-3


def _labelled_file(tmp_path):
    """Two labelled structures (a crystal with stress, a molecule without)."""
    rng = np.random.default_rng(0)
    crystal = _crystal(1)
    crystal.info["energy"] = -3.0
    crystal.arrays["forces"] = rng.normal(size=(len(crystal), 3)) * 0.1
    crystal.info["stress"] = np.diag([0.01, -0.02, 0.005])
    mol = Atoms("CuAg", positions=[[0, 0, 0], [2.4, 0, 0]])
    mol.info["energy"] = -1.0
    mol.arrays["forces"] = np.array([[0.2, 0, 0], [-0.2, 0, 0]])
    atom = Atoms("Cu", positions=[[0, 0, 0]])
    atom.info["energy"] = -0.4
    path = tmp_path / "labelled.xyz"
    write(path, [crystal, atom, mol], format="extxyz")
    return path, [crystal, mol]  # the isolated atom is reported apart from the metrics


def test_evaluate_command_reports_hand_computed_metrics(tmp_path):
    from mlip.cli.main import main

    path, frames = _labelled_file(tmp_path)
    e0 = {29: -0.5, 47: -0.25}
    # zero pair coefficients: the model predicts E = sum of E0s, zero forces, zero stress
    model = build_model("toy-pair", {"r_max": 3.0, "elements": [29, 47], "e0s": e0}).double()
    with torch.no_grad():
        model.coeff.zero_()
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "model.pt"), str(path), "--out", str(out),
                                       "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())

    pred_e = np.array([sum(e0[z] for z in a.numbers) for a in frames])
    ref_e = np.array([a.info["energy"] for a in frames])
    n = np.array([len(a) for a in frames])
    forces = np.concatenate([a.arrays["forces"] for a in frames])
    assert got["energy_mae"] == pytest.approx(np.abs(pred_e - ref_e).mean())
    assert got["energy_rmse"] == pytest.approx(np.sqrt(((pred_e - ref_e) ** 2).mean()))
    assert got["energy_per_atom_mae"] == pytest.approx(np.abs((pred_e - ref_e) / n).mean())
    assert got["energy_per_atom_rmse"] == pytest.approx(np.sqrt((((pred_e - ref_e) / n) ** 2).mean()))
    assert got["forces_mae"] == pytest.approx(np.abs(forces).mean())
    assert got["forces_rmse"] == pytest.approx(np.sqrt((forces ** 2).mean()))
    zs = np.concatenate([a.numbers for a in frames])
    assert got["forces_per_element"]["Ag"]["mae"] == pytest.approx(np.abs(forces[zs == 47]).mean())
    assert got["forces_per_element"]["Cu"]["rmse"] == pytest.approx(np.sqrt((forces[zs == 29] ** 2).mean()))
    assert got["forces_per_element"]["Cu"]["n_atoms"] == int((zs == 29).sum())
    assert got["stress_mae"] == pytest.approx(np.abs(frames[0].info["stress"]).mean())
    assert got["equivariance_forces_max"] < 1e-10
    assert got["isolated_atoms"] == {"Cu": {"reference": -0.4, "predicted": pytest.approx(-0.5)}}
    assert got["n_structures"] == 2
    assert "force MAE" in result.output
    for name in ("energy_per_atom", "forces", "stress"):
        assert (tmp_path / "plots" / f"parity_{name}.png").stat().st_size > 1000


def test_evaluate_measures_the_equivariance_error_of_any_family(tmp_path):
    """The same report for a model that is not rotation-invariant: its error is measured, not assumed,
    and agrees with :func:`equivariance_error` on the same structures."""
    from mlip.train.evaluate import evaluate_paths

    path, frames = _labelled_file(tmp_path)
    model = build_model("toy-anisotropic", {"r_max": 3.0, "elements": [29, 47], "anisotropy": 1.0}).double()
    got = evaluate_paths(model, [path], equivariance_structures=2)
    assert got["equivariance_forces_max"] > 1e-4 and got["equivariance_energy_max"] > 1e-6
    batch = collate([toy_models.graph_from_atoms(a, 3.0) for a in frames])
    direct = equivariance_error(model, batch, n_rotations=3, seed=0)
    assert got["equivariance_forces_rms"] == pytest.approx(direct["forces_rms"], rel=1e-6)  # edge order differs


def test_evaluate_reads_labels_under_other_names(tmp_path):
    """``--key energy=REF_energy`` reads MACE-style files; an unknown label names the nearest one."""
    from mlip.cli.main import main

    _, frames = _labelled_file(tmp_path)
    renamed = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.info["REF_energy"] = atoms.info.pop("energy") + 1.0
        atoms.arrays["REF_forces"] = atoms.arrays.pop("forces")
        atoms.info.pop("stress", None)
        renamed.append(atoms)
    write(tmp_path / "ref.xyz", renamed, format="extxyz")
    model = build_model("toy-pair", {"r_max": 3.0, "elements": [29, 47]}).double()
    with torch.no_grad():
        model.coeff.zero_()  # predicts E = 0, F = 0
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "r.json"
    runner = CliRunner()
    ok = runner.invoke(main, ["evaluate", str(tmp_path / "model.pt"), str(tmp_path / "ref.xyz"), "--out", str(out),
                              "--key", "energy=REF_energy", "--key", "forces=REF_forces"])
    assert ok.exit_code == 0, ok.output
    got = json.loads(out.read_text())
    ref_e = np.array([a.info["REF_energy"] for a in renamed])
    assert got["energy_mae"] == pytest.approx(np.abs(ref_e).mean())
    assert got["forces_mae"] == pytest.approx(np.abs(np.concatenate([a.arrays["REF_forces"] for a in renamed])).mean())
    bad = runner.invoke(main, ["evaluate", str(tmp_path / "model.pt"), str(tmp_path / "ref.xyz"), "--out", str(out),
                               "--key", "enrgy=REF_energy"])
    assert bad.exit_code == 2 and "did you mean '--key energy'" in bad.output
