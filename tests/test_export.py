"""``mlip export``: an AOTInductor package of a small equivariant model gives the eager model's energy,
forces and stress to float32 round-off for structures of different atom and edge counts (a crystal
of 16 and of 108 atoms, a molecule, an isolated atom), and loads in the calculator, ``mlip md`` and
``mlip relax`` like ``model.pt``. Compiling takes about a minute on 2 CPU cores: one package serves
the module. The traced graph of each head of a model with per-head charge and spin is checked
without compiling."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import read, write
from click.testing import CliRunner

from mlip.calculator import MLIPCalculator
from mlip.models.base import build_model, save_model

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """``(model.pt, model.pt2)``: a tiny random equivariant model for H, C, O, Cu and its float32 CPU export."""
    import torch
    from mlip.cli.main import main

    folder = tmp_path_factory.mktemp("export")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("equivariant", {"elements": [1, 6, 8, 29], "r_max": 4.0, "num_channels": 8, "lmax": 1,
                                            "num_layers": 1, "correlation": 2, "scale": 0.05,  # forces ~1 eV/Å
                                            "e0s": {1: -1.0, 6: -2.0, 8: -3.0, 29: -4.0}})
    save_model(model.eval(), folder / "model.pt")
    result = CliRunner().invoke(main, ["export", str(folder / "model.pt"), "--out", str(folder / "model.pt2")])
    assert result.exit_code == 0, result.output
    return folder / "model.pt", folder / "model.pt2"


def _structures() -> dict[str, Atoms]:
    cu16 = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1))
    cu108 = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(3)
    ethanol = molecule("CH3CH2OH")
    for k, a in enumerate((cu16, cu108, ethanol)):
        a.rattle(0.05, seed=k)
    return {"cu16": cu16, "cu108": cu108, "ethanol": ethanol}


def _evaluate(path, atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray | None, int]:
    a = atoms.copy()
    a.calc = MLIPCalculator(str(path), device="cpu")  # float32 for both
    e, f = a.get_potential_energy(), a.get_forces()
    s = a.get_stress() if a.pbc.all() else None
    return e, f, s, a.calc.batch_from_atoms(a).n_edges


def test_exported_equals_eager_for_different_sizes(package):
    eager_path, exported_path = package
    edges = {}
    for name, atoms in _structures().items():
        e0, f0, s0, n_edges = _evaluate(eager_path, atoms)
        e1, f1, s1, _ = _evaluate(exported_path, atoms)
        edges[name] = n_edges
        # float32 round-off: relative to the size of the quantities
        assert e1 == pytest.approx(e0, rel=2e-6, abs=1e-5), name
        np.testing.assert_allclose(f1, f0, atol=2e-5 * max(1.0, np.abs(f0).max()), err_msg=name)
        if s0 is not None:
            np.testing.assert_allclose(s1, s0, atol=2e-5 * max(1.0, np.abs(s0).max()), err_msg=name)
    # one package, several atom and edge counts, none of them the 4-atom example it was traced with
    assert len({edges["cu16"], edges["cu108"], edges["ethanol"]}) == 3


def test_exported_isolated_atom(package):
    """No edges at all: the package runs (its edge count may be 0) and agrees with the eager model."""
    eager_path, exported_path = package
    atom = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    e1, f1, _, n_edges = _evaluate(exported_path, atom)
    assert n_edges == 0 and np.all(f1 == 0.0)
    e0 = _evaluate(eager_path, atom)[0]
    assert e1 == pytest.approx(e0, abs=1e-5)


def test_exported_model_metadata_and_errors(package, tmp_path):
    from mlip.export import ExportedModel, export_model

    _, exported_path = package
    net = ExportedModel(exported_path)
    assert (net.family, net.r_max, net.elements, net.head, str(net.dtype)) == (
        "equivariant", 4.0, [1, 6, 8, 29], "default", "torch.float32")
    atoms = _structures()["cu16"]
    atoms.numbers[:2] = 47
    atoms.calc = MLIPCalculator(str(exported_path), device="cpu")
    with pytest.raises(ValueError, match=r"not trained on element\(s\) \['Ag'\]"):
        atoms.get_potential_energy()
    with pytest.raises(FileNotFoundError):
        ExportedModel(tmp_path / "missing.pt2")
    with pytest.raises(ValueError, match="must end in .pt2"):
        export_model(package[0], tmp_path / "model.pt")
    fa = build_model("frame-averaged", {"elements": [29], "r_max": 4.0, "num_channels": 8, "num_layers": 1})
    with pytest.raises(ValueError, match="'frame-averaged' family cannot be exported: its PCA frames"):
        export_model(fa, tmp_path / "fa.pt2")


def test_relax_and_md_load_the_package(package, tmp_path):
    from mlip.cli.main import main

    from mlip.md import relax_batch

    eager_path, exported_path = package
    start = [bulk("Cu", "fcc", a=3.7, cubic=True), bulk("Cu", "fcc", a=3.5).repeat((2, 1, 1))]
    for k, a in enumerate(start):
        a.rattle(0.03, seed=k)
    # batched relaxation evaluates a multi-structure batch through the package, one structure per call;
    # float32 round-off makes long relaxations drift apart, so each result is checked against the
    # eager model at the structure the exported run ended at
    exported = relax_batch(start, str(exported_path), fmax=0.05, relax_cell=True, device="cpu", max_steps=15)
    for r in exported:
        assert r.steps > 0
        assert r.energy == pytest.approx(_evaluate(eager_path, r.atoms)[0], rel=1e-5)
        f0 = _evaluate(eager_path, r.atoms)[1]
        np.testing.assert_allclose(r.atoms.get_forces(), f0, atol=2e-5 * max(1.0, np.abs(f0).max()))
    write(tmp_path / "cu.extxyz", start)
    result = CliRunner().invoke(main, ["relax", str(exported_path), str(tmp_path / "cu.extxyz"), "--out",
                                       str(tmp_path / "relaxed"), "--device", "cpu", "--sequential", "--max-steps", "15"])
    assert result.exit_code == 0, result.output
    for a in read(tmp_path / "relaxed" / "relaxed.extxyz", ":"):
        assert a.get_potential_energy() == pytest.approx(_evaluate(eager_path, a)[0], rel=1e-5)
    traj = tmp_path / "md.extxyz"
    result = CliRunner().invoke(main, ["md", str(exported_path), str(tmp_path / "cu.extxyz"), "--steps", "6",
                                       "--traj-every", "3", "--out", str(traj), "--device", "cpu", "--no-progress",
                                       "--index", "0"])
    assert result.exit_code == 0, result.output
    last = read(traj, index=-1)
    e0, *_ = _evaluate(eager_path, last)
    assert last.get_potential_energy() == pytest.approx(e0, rel=1e-5)


def test_traced_heads_read_charge_and_spin_as_the_model_does():
    """The graph ``mlip export`` compiles, for each head of a model whose ``omol`` head alone reads
    the total charge and spin: ``omol``'s depends on them, ``mptrj``'s takes NaN and gives the eager
    model's values (the trace only, without the minute of AOTInductor compiling)."""
    import torch

    from mlip.export import EnergyForcesStress, _trace, example_inputs
    from mlip.models.tracing import traceable_kernels

    model = build_model("equivariant", {"elements": [29], "r_max": 4.0, "num_channels": 8, "lmax": 1,
                                        "num_layers": 1, "correlation": 2, "heads": ["mptrj", "omol"],
                                        "use_charge_spin": True, "charge_spin_heads": ["omol"]}).eval()
    example = example_inputs(model, torch.float32, torch.device("cpu"))
    nan = float("nan")
    settings = {"neutral": (0.0, 1.0), "cation": (1.0, 2.0), "missing": (nan, nan)}
    energy = {}
    for head in ("mptrj", "omol"):
        fn = EnergyForcesStress(model, head)
        with traceable_kernels(model, "torch-export"):  # as export_model: a first call fills the caches, then the trace
            fn(*example)
            program = _trace(fn, example).module()
        # a missing pair never reaches the omol package: mlip.calculator.inference refuses it first
        cases = [name for name in settings if head == "mptrj" or name != "missing"]
        for name in cases:
            q, s = settings[name]
            inputs = (*example[:-2], torch.tensor([q]), torch.tensor([s]))
            traced, eager = program(*inputs), fn(*inputs)
            for a, b in zip(traced, eager):
                torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)
            energy[head, name] = float(traced[0].detach())
    assert energy["mptrj", "neutral"] == energy["mptrj", "cation"] == energy["mptrj", "missing"]
    assert abs(energy["omol", "cation"] - energy["omol", "neutral"]) > 1e-4
