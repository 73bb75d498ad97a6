"""MLIPCalculator: forces and stress against finite differences, skin reuse against rebuilds,
resets on changed atoms/cell/pbc/charge, unknown elements, out-of-memory, TorchSim interface,
and the one inference-batch builder they share. The ``test-morse`` model lives in toy_models.py.

Tests that take the ``device`` fixture run on the CPU and on CUDA (skipped with the reason "no CUDA
device" where there is none; ``mlip.testing.DEVICES``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from toy_models import calc64, morse_model, rattled_cu

from mlip.calculator import MLIPCalculator, NeighborCache
from mlip.data.neighbors import neighbor_list
from mlip.models.base import save_model
from mlip.testing import DEVICES, require_device

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")  # tiny structures: speed only


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device of ``mlip.testing.DEVICES``; CUDA is skipped where absent."""
    return require_device(request.param)


def _calc(device: torch.device, model=None, **kw) -> MLIPCalculator:
    """``calc64`` on ``device``: a float64 calculator (default model: ``morse_model()``)."""
    return MLIPCalculator(model if model is not None else morse_model(), device=device, dtype="float64", **kw)


# --------------------------------------------------------------------------------------------
# forces, stress, energies
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("triclinic", [False, True])
def test_forces_equal_finite_differences_periodic(triclinic, device):
    atoms = rattled_cu(triclinic=triclinic, rattle=0.1)
    atoms.calc = _calc(device)
    f = atoms.get_forces()
    some = [0, 7, 13, 30]
    f_num = calculate_numerical_forces(atoms, eps=1e-4, iatoms=some)
    assert np.abs(f).max() > 0.05  # a rattled crystal feels real forces
    np.testing.assert_allclose(f[some], f_num, atol=2e-7)


def test_forces_equal_finite_differences_molecule(device):
    atoms = molecule("CH4")
    atoms.positions *= 1.5  # Morse-sized bonds
    atoms.rattle(0.05, seed=3)
    atoms.calc = _calc(device, morse_model(elements=[1, 6], r0=1.6))
    assert not atoms.pbc.any()
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-4), atol=2e-7)
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        atoms.get_stress()
    # molecule in a box far larger than r_max, non-periodic: same energy as without a cell
    boxed = atoms.copy()
    boxed.cell = [30.0, 30.0, 30.0]
    boxed.calc = _calc(device, morse_model(elements=[1, 6], r0=1.6))
    assert boxed.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-12)


@pytest.mark.parametrize("triclinic", [False, True])
def test_stress_equals_finite_difference_strain_derivative(triclinic, device):
    """stress_ij = (1/V) dE/dε_ij with positions and cell strained together (ASE sign)."""
    atoms = rattled_cu(triclinic=triclinic, rattle=0.1, a=3.5)
    atoms.calc = _calc(device)
    stress = atoms.get_stress(voigt=False)
    cell0, vol = np.asarray(atoms.cell).copy(), atoms.get_volume()
    h = 1e-5
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            e = np.zeros((3, 3))
            e[i, j] += 0.5 * h
            e[j, i] += 0.5 * h
            energies = []
            for sign in (1.0, -1.0):
                strained = atoms.copy()
                strained.calc = atoms.calc
                strained.set_cell(cell0 @ (np.eye(3) + sign * e), scale_atoms=True)
                energies.append(strained.get_potential_energy())
            fd[i, j] = (energies[0] - energies[1]) / (2 * h) / vol
    assert np.abs(stress).max() > 1e-3  # compressed: a clearly nonzero stress
    np.testing.assert_allclose(stress, fd, atol=1e-8)
    voigt = atoms.get_stress()  # xx yy zz yz xz xy
    np.testing.assert_allclose(voigt, [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])


def test_energies_free_energy_and_dtype(device):
    atoms = rattled_cu()
    model = morse_model()
    atoms.calc = _calc(device, model)
    e = atoms.get_potential_energy()
    assert atoms.get_potential_energies().sum() == pytest.approx(e, abs=1e-10)
    perfect = rattled_cu(rattle=0.0)  # every atom equivalent: equal per-atom energies
    perfect.calc = _calc(device, model)
    e_perfect = perfect.get_potential_energy()
    np.testing.assert_allclose(perfect.get_potential_energies(), e_perfect / 32, atol=1e-12)
    assert atoms.calc.get_property("free_energy", atoms) == e
    assert atoms.get_potential_energy(force_consistent=True) == e
    # float32 agrees with float64 to float32 precision; the caller's model is not converted
    a32 = atoms.copy()
    a32.calc = MLIPCalculator(model, device=device, dtype="float32")
    assert a32.calc.model.log_depth.dtype == torch.float32
    assert model.log_depth.dtype == torch.float64
    assert a32.get_potential_energy() == pytest.approx(e, rel=1e-5)
    np.testing.assert_allclose(a32.get_forces(), atoms.get_forces(), atol=1e-4)


def test_loads_model_from_path(tmp_path, device):
    model = morse_model(depth=0.4)
    path = tmp_path / "morse.pt"
    save_model(model, path)
    atoms = rattled_cu()
    atoms.calc = MLIPCalculator(str(path), device=device, dtype="float64")
    assert next(atoms.calc.model.parameters()).device.type == device.type
    ref = rattled_cu()
    ref.calc = calc64(model)
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-12)


def test_defaults_device_auto_float32_and_auto_neighbor_backend(tmp_path):
    """``MLIPCalculator(path)``: device "auto" (CUDA if present, else CPU), float32, the data pipeline's
    "auto" neighbour backend; a loaded model works the same, and a torch dtype is accepted."""
    path = tmp_path / "morse.pt"
    save_model(morse_model(), path)
    calc = MLIPCalculator(str(path))
    want = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert calc.device.type == want.type and calc.dtype == torch.float32
    assert calc.neighbors.backend == "auto"
    assert next(calc.model.parameters()).device.type == want.type
    atoms = rattled_cu()
    atoms.calc = calc
    ref = rattled_cu()
    ref.calc = MLIPCalculator(morse_model(), device="auto", dtype=torch.float64)
    assert ref.calc.dtype == torch.float64
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-5)
    with pytest.raises(ValueError, match="dtype"):
        MLIPCalculator(morse_model(), dtype="float16")


# --------------------------------------------------------------------------------------------
# neighbour list reuse
# --------------------------------------------------------------------------------------------
def test_skin_reuse_equals_full_rebuild_during_md(device):
    atoms = rattled_cu(repeat=(2, 2, 2))
    thermalize_momenta(atoms, 2000, rng=np.random.default_rng(1))
    skin_calc = _calc(device, skin=0.6)
    fresh_calc = _calc(device, skin=0.0)
    atoms.calc = skin_calc
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    max_diff = 0.0
    for _ in range(40):
        dyn.run(1)
        probe = atoms.copy()
        probe.calc = fresh_calc
        max_diff = max(max_diff, np.abs(atoms.get_forces() - probe.get_forces()).max())
        assert atoms.get_potential_energy() == pytest.approx(probe.get_potential_energy(), abs=1e-10)
    assert max_diff < 1e-12
    nb = skin_calc.neighbors
    assert 1 < nb.n_builds < nb.n_calls  # the list was reused and also rebuilt when needed
    assert fresh_calc.neighbors.n_builds == fresh_calc.neighbors.n_calls


def test_neighbor_cache_edges_equal_rebuild_under_cell_change():
    """Same edges, same order as neighbor_list(), also while the cell deforms (NPT, cell relaxation)."""
    atoms = rattled_cu(triclinic=True)
    cache = NeighborCache(r_max=4.0, skin=1.0)
    rng = np.random.default_rng(0)
    pos0 = torch.tensor(atoms.positions)
    cell0 = torch.tensor(np.asarray(atoms.cell))
    pbc = torch.tensor([True, True, True])
    numbers = torch.tensor(atoms.numbers)
    for k in range(30):
        strain = torch.tensor(np.eye(3) + 0.004 * k * rng.normal(size=(3, 3)))
        pos = pos0 @ strain + 0.02 * k * torch.tensor(rng.normal(size=pos0.shape))
        cell = cell0 @ strain
        ei, sh = cache(pos, cell, pbc, numbers)
        ei_ref, sh_ref = neighbor_list(pos, cell, pbc, 4.0)
        assert torch.equal(ei, ei_ref) and torch.equal(sh, sh_ref)
    assert 1 < cache.n_builds < cache.n_calls


def test_rebuild_only_when_an_atom_moved_more_than_half_the_skin():
    """Fixed cell: atoms moved by 0.49 skin (from the reference of the last build, not from the
    previous call) keep the list; 0.51 skin rebuilds. Displacements count relative to their mean
    (a rigid translation moves no pair): here two atoms move oppositely, so the mean is zero.
    Forces equal a fresh calculation every time."""
    skin = 1.0
    calc = calc64(skin=skin)
    atoms = rattled_cu()
    atoms.calc = calc
    atoms.get_forces()
    nb = calc.neighbors
    assert (nb.n_builds, nb.n_calls) == (1, 1)
    direction = np.array([0.6, -0.8, 0.0])
    start = atoms.positions.copy()
    for frac, builds in ((0.25, 1), (0.49, 1), (0.51, 2), (0.51 + 0.49, 2), (0.51 + 0.52, 3)):
        atoms.positions = start
        atoms.positions[5] += frac * skin * direction
        atoms.positions[6] -= frac * skin * direction
        f = atoms.get_forces()
        assert nb.n_builds == builds, frac
        np.testing.assert_allclose(f, _fresh_results(atoms, calc.model)[1], atol=1e-12)
    # the whole crystal drifting by 2 skins changes no pair vector: no rebuild, same forces
    atoms.positions = atoms.positions + 2.0 * skin * direction
    np.testing.assert_allclose(atoms.get_forces(), f, atol=1e-12)
    assert nb.n_builds == 3


def test_wrapped_atoms_keep_the_list_and_give_the_same_edges_as_a_rebuild():
    """Atoms wrapped back into the cell jumped by a lattice vector, not by a distance: the list is
    re-based (no rebuild) and still equals a full rebuild edge for edge, also in a deformed cell."""
    atoms = rattled_cu(triclinic=True)
    cache = NeighborCache(r_max=4.0, skin=1.0)
    pbc = torch.tensor([True, True, True])
    numbers = torch.tensor(atoms.numbers)
    cell0 = np.asarray(atoms.cell)
    rng = np.random.default_rng(2)
    wrapped_any = 0
    for k in range(12):
        strain = np.eye(3) + 0.002 * k * rng.normal(size=(3, 3))
        moved = atoms.copy()
        moved.set_cell(cell0 @ strain, scale_atoms=True)
        moved.positions += 0.4 * k * np.array([1.0, 0.7, -0.5]) / 12 + 0.01 * rng.normal(size=(len(atoms), 3))
        before = moved.positions.copy()
        moved.wrap()
        wrapped_any += int(np.abs(moved.positions - before).max() > 1.0)
        pos, cell = torch.tensor(moved.positions), torch.tensor(np.asarray(moved.cell))
        ei, sh = cache(pos, cell, pbc, numbers)
        ei_ref, sh_ref = neighbor_list(pos, cell, pbc, 4.0)
        assert torch.equal(ei, ei_ref) and torch.equal(sh, sh_ref), k
    assert wrapped_any >= 3 and cache.n_rebases >= 1
    assert cache.n_builds == 1  # every call reused (and re-based) the first list

    # through the calculator: wrapping changes nothing but the positions' labels
    calc = calc64(skin=1.0)
    a = rattled_cu()
    a.calc = calc
    a.positions[0] = [-0.01, -0.02, 0.05]  # just outside the cell
    f_out = a.get_forces()
    a.wrap()
    assert a.positions[0, 0] > 7.0  # it really jumped across the cell
    np.testing.assert_allclose(a.get_forces(), f_out, atol=1e-12)
    np.testing.assert_allclose(a.get_stress(), _stress_fresh(a, calc.model), atol=1e-12)
    assert (calc.neighbors.n_builds, calc.neighbors.n_rebases) == (1, 1)


def _stress_fresh(atoms: Atoms, model) -> np.ndarray:
    probe = atoms.copy()
    probe.calc = calc64(model, skin=0.0)
    return probe.get_stress()


# --------------------------------------------------------------------------------------------
# resets and errors
# --------------------------------------------------------------------------------------------
def _fresh_results(atoms: Atoms, model) -> tuple[float, np.ndarray]:
    probe = atoms.copy()
    probe.calc = calc64(model)
    return probe.get_potential_energy(), probe.get_forces()


def test_calculator_resets_when_atoms_cell_pbc_or_numbers_change():
    model = morse_model(elements=[28, 29])
    calc = calc64(model, skin=1.0)
    atoms = rattled_cu()
    atoms.calc = calc
    variants = []
    a = atoms.copy(); a.positions[0] += [0.05, 0.0, 0.0]; variants.append(("positions", a))
    a = atoms.copy(); a.set_cell(np.asarray(atoms.cell) * 1.01, scale_atoms=False); variants.append(("cell", a))
    a = atoms.copy(); a.pbc = [True, True, False]; variants.append(("pbc", a))
    a = atoms.copy(); a.numbers[3] = 28; variants.append(("numbers", a))
    a = rattled_cu(repeat=(3, 2, 2), seed=5); variants.append(("n_atoms", a))
    variants.append(("back to the start", atoms.copy()))
    e_prev = atoms.get_potential_energy()
    for what, new in variants:
        new.calc = calc  # one calculator, shared: it must notice every change
        e, f = new.get_potential_energy(), new.get_forces()
        e_ref, f_ref = _fresh_results(new, model)
        assert e == pytest.approx(e_ref, abs=1e-10), what
        np.testing.assert_allclose(f, f_ref, atol=1e-10, err_msg=what)
        assert e != pytest.approx(e_prev, abs=1e-9) or what == "back to the start", what
        e_prev = e


def test_charge_and_spin_from_atoms_info():
    model = morse_model(use_charge_spin=True)
    atoms = rattled_cu()
    atoms.calc = calc64(model)
    with pytest.raises(ValueError, match=r"atoms.info\['charge'\]"):
        atoms.get_potential_energy()
    atoms.info.update(charge=0, spin=1)
    e_neutral = atoms.get_potential_energy()
    atoms.info["charge"] = 1  # only info changes: the calculator must recompute
    assert atoms.get_potential_energy() == pytest.approx(e_neutral + 0.3, abs=1e-10)
    atoms.info["spin"] = 3
    assert atoms.get_potential_energy() == pytest.approx(e_neutral + 0.3 + 0.2, abs=1e-10)
    # defaults given to the calculator are used when info lacks them
    plain = rattled_cu()
    plain.calc = calc64(model, charge=0, spin=1)
    assert plain.get_potential_energy() == pytest.approx(e_neutral, abs=1e-10)


def test_one_charge_spin_head_policy_for_calculator_relaxation_and_torchsim():
    """The calculator, batched relaxation and TorchSim build their batches with one function and one
    policy: atoms.info, else the caller's default, else NaN, which a use_charge_spin model refuses
    with the same message everywhere."""
    from mlip.calculator.inference import inference_batch, structure_settings
    from mlip.md.relaxation import relax_batch

    model = morse_model(use_charge_spin=True)
    atoms = rattled_cu(repeat=(1, 1, 1))
    atoms.calc = calc64(model)
    message = r"set atoms.info\['charge'\] and atoms.info\['spin'\]"
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match=message):
        relax_batch([atoms], model, device="cpu", dtype="float64", max_steps=0)
    # the caller's defaults fill in what info lacks; info wins where it has a value
    with_info = atoms.copy()
    with_info.info.update(charge=1)
    energies = {}
    for name, a in (("defaults", atoms.copy()), ("info", with_info)):
        a.calc = calc64(model, charge=0, spin=3)
        energies[name] = a.get_potential_energy()
        relaxed = relax_batch([a], model, device="cpu", dtype="float64", max_steps=0, charge=0, spin=3)[0]
        assert relaxed.energy == pytest.approx(energies[name], abs=1e-12)
    assert energies["info"] == pytest.approx(energies["defaults"] + 0.3, abs=1e-10)
    # the builder itself: NaN where nothing is known, an unlabelled batch, the head from info
    charge, spin, head = structure_settings({"head": "pbe"}, spin=2)
    assert np.isnan(charge) and (spin, head) == (2.0, "pbe")
    nan = float("nan")
    no_edges = (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long))
    batch = inference_batch(
        torch.zeros(3, 3), torch.tensor([29, 29, 29]), torch.eye(3).repeat(2, 1, 1), torch.ones(2, 3, dtype=torch.bool),
        *no_edges, batch=torch.tensor([0, 0, 1]), charge=[0.0, nan], spin=[1.0, nan], head=["default", "pbe"],
        dtype=torch.float32,
    )
    assert batch.ptr.tolist() == [0, 2, 3] and batch.head == ["default", "pbe"]
    assert batch.positions.dtype == torch.float32 and not batch.isolated.any()
    assert torch.isnan(batch.energy).all() and torch.isnan(batch.forces).all() and torch.isnan(batch.stress).all()
    with pytest.raises(ValueError, match=r"missing for structure\(s\) \[1\]"):
        inference_batch(batch.positions, batch.numbers, batch.cell, batch.pbc, *no_edges, batch=batch.batch,
                        charge=[0.0, nan], spin=[1.0, 1.0], head=batch.head, dtype=torch.float32,
                        needs_charge_spin=True)
    # TorchSim states carry no info: the caller's values, else the same error
    ts = pytest.importorskip("torch_sim")
    from mlip.calculator import MLIPTorchSimModel

    with pytest.raises(ValueError, match=message):
        MLIPTorchSimModel(model, device="cpu", dtype=torch.float64)
    ts_model = MLIPTorchSimModel(model, device="cpu", dtype=torch.float64, charge=0, spin=3)
    state = ts.io.atoms_to_state([atoms], torch.device("cpu"), torch.float64)
    assert float(ts_model(state)["energy"][0]) == pytest.approx(energies["defaults"], abs=1e-12)


@pytest.mark.parametrize("family", ["equivariant", "frame-averaged", "learned-equivariance"])
def test_charge_and_spin_reach_every_model_family(family):
    """Each family built with ``use_charge_spin`` gets the total charge and multiplicity from
    ``atoms.info`` through the calculator (the energy depends on them, forces stay consistent);
    missing or impossible values are clear errors. Built without it, the info is ignored."""
    from mlip.models.base import build_model

    small = {"elements": [29], "r_max": 4.0, "num_channels": 8, "num_layers": 1}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(family, {**small, "use_charge_spin": True})
        plain = build_model(family, small)
    atoms = rattled_cu(repeat=(1, 1, 1))
    atoms.calc = calc64(model)
    with pytest.raises(ValueError, match="charge"):
        atoms.get_potential_energy()
    energies = []
    for charge, spin in ((0, 1), (1, 2), (0, 3)):
        atoms.info.update(charge=charge, spin=spin)
        energies.append(atoms.get_potential_energy())
        f = atoms.get_forces()
        f_num = calculate_numerical_forces(atoms, eps=1e-4, iatoms=[0, 1])
        np.testing.assert_allclose(f[:2], f_num, rtol=1e-5, atol=1e-6)
    assert min(abs(energies[0] - energies[1]), abs(energies[0] - energies[2])) > 1e-6
    atoms.info.update(charge=1, spin=1)  # 115 electrons cannot form a singlet
    with pytest.raises(ValueError, match="structure 0"):
        atoms.get_potential_energy()
    other = rattled_cu(repeat=(1, 1, 1))
    other.calc = calc64(plain)
    e_plain = other.get_potential_energy()
    other.info.update(charge=1, spin=2)
    assert other.get_potential_energy() == pytest.approx(e_plain, abs=1e-12)


def test_unknown_element_error_names_it():
    atoms = rattled_cu()
    atoms.numbers[0] = 79  # Au
    atoms.numbers[1] = 47  # Ag
    atoms.calc = calc64()
    with pytest.raises(ValueError, match=r"\['Ag', 'Au'\]"):
        atoms.get_forces()


def test_out_of_memory_raises_clearly_and_never_returns_stale_forces(monkeypatch, device):
    from mlip.calculator.memory import BudgetedPredictor

    atoms = rattled_cu()
    calc = _calc(device)
    atoms.calc = calc
    f_old = atoms.get_forces().copy()
    real_call = BudgetedPredictor.__call__
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def failing_call(*args, **kwargs):
        raise oom("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(BudgetedPredictor, "__call__", failing_call)
    atoms.positions[0] += [0.1, 0.0, 0.0]
    with pytest.raises(RuntimeError, match=f"out of memory on {device.type}.* evaluating 32 atoms"):
        atoms.get_forces()
    with pytest.raises(RuntimeError, match="out of memory"):  # asked again: still no stale result
        atoms.get_forces()
    monkeypatch.setattr(BudgetedPredictor, "__call__", real_call)
    f_new = atoms.get_forces()
    _, f_ref = _fresh_results(atoms, calc.model)
    np.testing.assert_allclose(f_new, f_ref, atol=1e-12)
    assert np.abs(f_new - f_old).max() > 1e-3


def test_frechet_cell_filter_relaxation_reaches_zero_stress(device):
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    atoms = rattled_cu(repeat=(1, 1, 1), a=3.5, rattle=0.02)
    atoms.calc = _calc(device)
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    assert opt.run(fmax=1e-3, steps=500)
    assert np.abs(atoms.get_forces()).max() < 1e-3
    assert np.abs(atoms.get_stress()).max() * atoms.get_volume() < 1e-3 * len(atoms)


# --------------------------------------------------------------------------------------------
# TorchSim (optional package)
# --------------------------------------------------------------------------------------------
def test_torchsim_model_interface(device):
    ts = pytest.importorskip("torch_sim")
    from torch_sim.models.interface import validate_model_outputs

    from mlip.calculator import MLIPTorchSimModel

    model = morse_model(elements=[14, 26], r0=2.4)
    ts_model = MLIPTorchSimModel(model, device=device, dtype=torch.float64)
    validate_model_outputs(ts_model, device, torch.float64)
    # same numbers as the ASE calculator, for a batch of two different structures
    structures = [rattled_cu(repeat=(1, 1, 2)), bulk("Si", "diamond", a=5.43, cubic=True)]
    structures[0].numbers[:] = 26
    state = ts.io.atoms_to_state(structures, device, torch.float64)
    out = {k: v.cpu() for k, v in ts_model(state).items()}
    start = 0
    for k, at in enumerate(structures):
        at.calc = calc64(model)
        assert float(out["energy"][k]) == pytest.approx(at.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(out["forces"][start:start + len(at)].numpy(), at.get_forces(), atol=1e-10)
        np.testing.assert_allclose(out["stress"][k].numpy(), at.get_stress(voigt=False), atol=1e-10)
        start += len(at)
    # and it runs in TorchSim's batched integrators: two systems, one model call per step
    start = [rattled_cu(repeat=(1, 1, 2)), rattled_cu(repeat=(2, 1, 1), seed=4)]
    cu_model = morse_model()
    final = ts.integrate(system=start, model=MLIPTorchSimModel(cu_model, device=device, dtype=torch.float64),
                         integrator=ts.nve, n_steps=20, temperature=300.0, timestep=0.002)
    for k, at in enumerate(ts.io.state_to_atoms(final)):
        assert np.abs(at.positions - start[k].positions).max() > 1e-3  # the atoms moved
        at.calc = calc64(cu_model)
        assert float(final.energy[k].cpu()) == pytest.approx(at.get_potential_energy(), abs=1e-10)


def test_torchsim_import_error_says_what_to_install(monkeypatch):
    """Without torch-sim-atomistic (simulated here, so this runs whether or not it is installed)
    the TorchSim model raises an ImportError naming the package; the ASE calculator is unaffected."""
    import importlib
    import sys

    import mlip.calculator

    monkeypatch.setitem(sys.modules, "torch_sim", None)  # `import torch_sim` now raises ImportError
    monkeypatch.delitem(sys.modules, "mlip.calculator.torchsim", raising=False)
    with pytest.raises(ImportError, match="pip install torch-sim-atomistic"):
        importlib.import_module("mlip.calculator.torchsim")
    with pytest.raises(ImportError, match="torch-sim-atomistic"):
        mlip.calculator.MLIPTorchSimModel  # noqa: B018 - the lazy attribute imports the module
    assert mlip.calculator.MLIPCalculator is MLIPCalculator
    monkeypatch.delitem(sys.modules, "mlip.calculator.torchsim", raising=False)
