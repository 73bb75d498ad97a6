"""Isolated-atom reference frames versus one-atom periodic cells, through the whole data path.

An isolated atom (flagged by the readers: one atom without pbc, or ``config_type`` IsolatedAtom)
sets its element's E0 and is kept out of the loss, validation and test data. A one-atom *periodic*
cell (an elemental crystal in its primitive cell) is a structure like any other. One split serves
``mlip data split`` and training, one E0 table ``mlip data inspect`` and training, one evaluation
loop validation and ``mlip evaluate``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from click.testing import CliRunner

import toy_models
from mlip.cli.main import main
from mlip.data.datasets import open_dataset
from mlip.data.formats import read
from mlip.data.graph import collate
from mlip.data.split import isolated_indices, split_indices
from mlip.data.stats import e0s_from_isolated_atoms, fit_e0s
from mlip.data.transforms import atoms_to_graph
from mlip.train.config import ConfigError, config_from_mapping
from mlip.train.data import build_data


def _label(atoms: Atoms) -> Atoms:
    atoms.calc = EMT()
    atoms.info["energy"] = atoms.get_potential_energy()
    atoms.arrays["forces"] = atoms.get_forces()
    if atoms.pbc.all():
        atoms.info["stress"] = atoms.get_stress(voigt=False)
    atoms.calc = None
    return atoms


def one_atom_cells(n: int, seed: int = 0) -> list[Atoms]:
    """Primitive fcc Cu/Ag cells (one atom, periodic) under random strains, EMT-labelled."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu" if k % 2 else "Ag", "fcc", a=3.7 + 0.2 * rng.random())
        a.set_cell(a.cell.array @ (np.eye(3) + rng.normal(scale=0.02, size=(3, 3))), scale_atoms=True)
        out.append(_label(a))
    return out


@pytest.fixture
def mixed_file(tmp_path):
    """16 multi-atom crystals, 2 isolated atoms (last of the EMT data) and 12 one-atom periodic cells."""
    frames = toy_models.write_emt_data(tmp_path / "emt.xyz", n=16, seed=1) + one_atom_cells(12)
    path = tmp_path / "mixed.xyz"
    write(path, frames, format="extxyz")
    return path, frames


def _cfg(tmp_path, path, **data):
    return config_from_mapping({
        "output_dir": str(tmp_path / "run"), "dtype": "float64", "device": "cpu", "num_threads": 1,
        "model": {"family": "toy-pair", "r_max": 3.0},
        "data": {"train": str(path), "valid_fraction": 0.25, "test_fraction": 0.25, **data},
        "batch": {"max_atoms": 16}, "optim": {"lr": 0.05}, "train": {"epochs": 1, "progress": False},
    })


def test_flag_travels_from_atoms_to_graph_and_batch():
    iso = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    tagged = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=[8, 8, 8], pbc=True, info={"config_type": "IsolatedAtom"})
    crystal = bulk("Cu", "fcc", a=3.6)
    graphs = [atoms_to_graph(a, 3.0) for a in (iso, crystal, tagged)]
    assert [bool(g.isolated) for g in graphs] == [True, False, True]
    batch = collate(graphs)
    assert batch.isolated.tolist() == [True, False, True]
    assert [bool(g.isolated) for g in batch.split()] == [True, False, True]
    assert batch.to("cpu", torch.float32).isolated.dtype == torch.bool


def test_one_atom_periodic_cells_train_validate_and_test(tmp_path, mixed_file):
    path, frames = mixed_file
    ds = open_dataset(path, r_max=3.0)
    single_periodic = {i for i, a in enumerate(frames) if len(a) == 1 and a.pbc.all()}
    isolated = set(isolated_indices(ds, ds.n_atoms).tolist())
    assert isolated == {16, 17} and not isolated & single_periodic
    data = build_data(_cfg(tmp_path, path), r_max=3.0)
    parts = {name: set(getattr(data, name).indices.tolist()) for name in ("train", "valid", "test")}
    # isolated atoms set the E0s and leave the loss; one-atom crystals are in every part
    assert data.e0s["default"] == {29: frames[16].info["energy"], 47: frames[17].info["energy"]}
    assert not isolated & (parts["train"] | parts["valid"] | parts["test"])
    for name in ("train", "valid", "test"):
        assert parts[name] & single_periodic, name
    assert parts["train"] | parts["valid"] | parts["test"] == set(range(len(frames))) - isolated


def test_one_atom_crystals_never_become_e0s(tmp_path):
    """Without isolated atoms, E0s come from the fit, not from a one-atom cell's energy."""
    frames = toy_models.write_emt_data(tmp_path / "emt.xyz", n=16, seed=2, isolated=False) + one_atom_cells(6)
    path = tmp_path / "noiso.xyz"
    write(path, frames, format="extxyz")
    data = build_data(_cfg(tmp_path, path, e0s="auto"), r_max=3.0)
    expected = fit_e0s([a for k, a in enumerate(frames) if k in set(data.train.indices.tolist())])
    assert data.e0s["default"] == pytest.approx(expected, rel=1e-12)
    crystal_energies = {float(a.info["energy"]) for a in frames if len(a) == 1}
    assert not set(data.e0s["default"].values()) & crystal_energies
    with pytest.raises(ConfigError, match=r"no isolated-atom structure.*\['Cu', 'Ag'\]"):
        build_data(_cfg(tmp_path, path, e0s="isolated"), r_max=3.0)


def _conflicting(tmp_path, head_b: str | None = None):
    frames = toy_models.write_emt_data(tmp_path / "emt.xyz", n=8, seed=3)
    extra = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    extra.info["energy"] = frames[-2].info["energy"] + 0.25  # a second Cu reference, 0.25 eV off
    if head_b is not None:
        extra.info["head"] = head_b
    path = tmp_path / "conflict.xyz"
    write(path, frames + [extra], format="extxyz")
    return path


@pytest.mark.parametrize("spec", ["auto", "isolated", "fit"])
def test_conflicting_isolated_atoms_are_an_error_in_training(tmp_path, spec):
    path = _conflicting(tmp_path)
    with pytest.raises(ConfigError, match=r"two different isolated-atom energies for Cu.*frame 8.*frame 10"):
        build_data(_cfg(tmp_path, path, e0s=spec, valid_fraction=0.0, test_fraction=0.0), r_max=3.0)


def test_conflicting_isolated_atoms_are_an_error_in_inspect_and_stats(tmp_path):
    path = _conflicting(tmp_path)
    result = CliRunner().invoke(main, ["data", "inspect", str(path), "--e0s"])
    assert result.exit_code == 1 and "two different isolated-atom energies for Cu" in result.output
    frames = read(path)
    for take in (e0s_from_isolated_atoms, fit_e0s):
        with pytest.raises(ValueError, match="two different isolated-atom energies for Cu"):
            take(frames)


def test_isolated_atoms_of_different_heads_do_not_conflict(tmp_path):
    path = _conflicting(tmp_path, head_b="other")
    data = build_data(_cfg(tmp_path, path, valid_fraction=0.0, test_fraction=0.0), r_max=3.0)
    assert data.heads == ["default", "other"]
    assert data.e0s["other"][29] == pytest.approx(data.e0s["default"][29] + 0.25)


def test_data_split_and_training_split_the_same_way(tmp_path, mixed_file):
    path, frames = mixed_file
    result = CliRunner().invoke(main, ["data", "split", str(path), "--fractions", "0.5,0.25,0.25", "--seed", "0",
                                       "--out-dir", str(tmp_path / "parts")])
    assert result.exit_code == 0, result.output
    data = build_data(_cfg(tmp_path, path, split_seed=0), r_max=3.0)
    energies = [a.info["energy"] for a in frames]
    for name in ("valid", "test"):
        written = sorted(a.info["energy"] for a in read(tmp_path / "parts" / f"{name}.xyz"))
        assert written == sorted(energies[i] for i in getattr(data, name).indices)
    train = read(tmp_path / "parts" / "train.xyz")
    assert sum(bool(a.info["isolated_atom"]) for a in train) == 2  # isolated atoms stay in train


def test_split_indices_keeps_reference_frames_first():
    parts = split_indices(10, [0.6, 0.2, 0.2], seed=4, keep_in_first=[3, 7])
    assert {3, 7} <= set(parts[0].tolist())
    assert [len(p) for p in parts] == [6, 2, 2]  # the fractions apply to the 8 other structures
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_inspect_and_training_take_the_same_e0_fit(tmp_path):
    frames = toy_models.write_emt_data(tmp_path / "emt.xyz", n=12, seed=5, isolated=False)
    path = tmp_path / "emt.xyz"
    out = json.loads(CliRunner().invoke(main, ["data", "inspect", str(path), "--e0s", "--json"]).output)
    data = build_data(_cfg(tmp_path, path, e0s="fit", valid_fraction=0.0, test_fraction=0.0), r_max=3.0)
    assert {int(z): v for z, v in out["e0s_least_squares_fit"].items()} == pytest.approx(data.e0s["default"], rel=1e-12)
    assert len(frames) == 12


def test_evaluate_counts_one_atom_crystals_and_reports_isolated_atoms_apart(tmp_path):
    from mlip.models.base import build_model, save_model

    frames = one_atom_cells(3) + [_label(Atoms("Cu", positions=[[0.0, 0.0, 0.0]]))]
    path = tmp_path / "eval.xyz"
    write(path, frames, format="extxyz")
    model = build_model("toy-pair", {"r_max": 3.0, "elements": [29, 47], "e0s": {29: -0.5, 47: -0.25}}).double()
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "model.pt"), str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["n_structures"] == 3  # the three one-atom crystals
    assert list(got["isolated_atoms"]) == ["Cu"]
    assert got["isolated_atoms"]["Cu"]["reference"] == pytest.approx(frames[-1].info["energy"])
