"""Committees: MLIPCalculator([a, b, c]) returns the members' mean and their spread (energy_std,
per-atom forces_std), and ``mlip md --committee ... --max-force-std X`` logs the spread and stops
cleanly, keeping the trajectory, at the first step where the force spread exceeds X."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from ase.io import read, write
from click.testing import CliRunner
from toy_models import calc64, morse_model, rattled_cu

from mlip.calculator import MLIPCalculator
from mlip.calculator.committee import Committee
from mlip.models.base import save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")

MEMBERS = ({}, {"depth": 0.30}, {"alpha": 1.30, "r0": 2.90})


def members():
    """Three Morse copper models that differ a little, as members trained from different seeds do."""
    return [morse_model(**kw) for kw in MEMBERS]


def test_committee_returns_the_mean_and_the_spread():
    atoms = rattled_cu(rattle=0.1)
    single = []
    for m in members():
        a = atoms.copy()
        a.calc = calc64(m)
        single.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    energies = np.array([s[0] for s in single])
    forces = np.stack([s[1] for s in single])  # [3, n_atoms, 3]
    atoms.calc = MLIPCalculator(members(), device="cpu", dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(energies.mean(), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), forces.mean(0), atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(), np.mean([s[2] for s in single], axis=0), atol=1e-12)
    res = atoms.calc.results
    assert res["energy_std"] == pytest.approx(energies.std(), abs=1e-10)
    # per atom: the norm of the per-component population standard deviations, in eV/Å
    expected = np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0))
    assert res["forces_std"].shape == (len(atoms),)
    np.testing.assert_allclose(res["forces_std"], expected, atol=1e-12)
    assert expected.max() > 1e-3  # the members really differ
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)


def test_identical_members_have_no_spread_and_paths_load(tmp_path):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"m{k}.pt")
        save_model(morse_model(), paths[-1])
    atoms = rattled_cu()
    atoms.calc = MLIPCalculator([str(p) for p in paths], device="cpu", dtype="float64")
    ref = rattled_cu()
    ref.calc = calc64()
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    assert atoms.calc.results["energy_std"] == 0.0 and np.all(atoms.calc.results["forces_std"] == 0.0)


def test_bad_committees_are_refused():
    with pytest.raises(ValueError, match="at least two models"):
        Committee([morse_model()])
    with pytest.raises(ValueError, match="share r_max"):
        Committee([morse_model(), morse_model(r_max=4.5)])
    atoms = rattled_cu()
    atoms.numbers[0] = 47
    atoms.calc = MLIPCalculator(members(), device="cpu", dtype="float64")
    with pytest.raises(ValueError, match=r"not trained on element\(s\) \['Ag'\]"):
        atoms.get_potential_energy()


def _md_args(tmp_path, start, traj, *extra):
    return ["md", str(tmp_path / "m0.pt"), str(start), "--ensemble", "nvt", "--temperature", "600", "--steps", "200",
            "--timestep", "2", "--out", str(traj), "--log-every", "1", "--traj-every", "5", "--device", "cpu",
            "--dtype", "float64", "--no-progress", *extra]


@pytest.mark.parametrize("repeated_flag", [False, True])
def test_md_cli_stops_cleanly_when_the_force_spread_exceeds_the_bound(tmp_path, repeated_flag):
    from mlip.cli.main import main

    for k, m in enumerate(members()):
        save_model(m, tmp_path / f"m{k}.pt")
    start = tmp_path / "cu.extxyz"
    write(start, rattled_cu(rattle=0.0))  # perfect fcc: no force, no spread at step 0
    traj = tmp_path / "run" / "cu.extxyz"
    others = [str(tmp_path / "m1.pt"), str(tmp_path / "m2.pt")]
    flags = ["--committee", others[0], "--committee", others[1]] if repeated_flag else ["--committee", *others]
    result = CliRunner().invoke(main, _md_args(tmp_path, start, traj, *flags, "--max-force-std", "0.01"))
    assert result.exit_code == 0, result.output
    assert "committee's force spread" in result.output and "exceeds --max-force-std 0.01" in result.output
    assert "trajectory so far kept in" in result.output
    with open(traj.with_suffix("").as_posix() + ".log.csv") as fh:
        rows = list(csv.DictReader(fh))
    spread = [float(r["max_force_std_eV_A"]) for r in rows]
    stop = int(rows[-1]["step"])
    assert 0 < stop < 200  # it ran, then stopped early
    assert spread[-1] > 0.01 and all(s <= 0.01 for s in spread[:-1])  # at the first step above the bound
    assert all(float(r["energy_std_eV"]) >= 0 for r in rows)
    frames = read(traj, index=":")
    assert len(frames) == stop // 5 + 1 + (stop % 5 != 0)  # every 5th step, and the step it stopped at
    # the last frame is the uncertain structure: its spread, recomputed, is above the bound
    last = frames[-1].copy()
    last.calc = MLIPCalculator(members(), device="cpu", dtype="float64")
    last.get_forces()
    assert last.calc.results["forces_std"].max() == pytest.approx(spread[-1], rel=1e-6)  # extxyz precision


def test_md_cli_committee_errors(tmp_path):
    from mlip.cli.main import main

    save_model(morse_model(), tmp_path / "m0.pt")
    start = tmp_path / "cu.extxyz"
    write(start, rattled_cu())
    traj = tmp_path / "md.extxyz"
    result = CliRunner().invoke(main, _md_args(tmp_path, start, traj, "--max-force-std", "0.1"))
    assert result.exit_code != 0 and "--max-force-std needs --committee" in result.output
