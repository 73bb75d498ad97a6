"""Physics conformance checks every potential family must pass: subclass :class:`ModelConformance`.

Shipped inside the package (as nequip ships its model tests) so that a new family, in this
repository or outside it, gets every check by subclassing the mixin in a pytest module::

    from mlip.testing import ModelConformance

    class TestMyFamily(ModelConformance):
        def make_model(self, **overrides):
            return build_model("my-family", {"num_channels": 8, **overrides})

This module needs ``pytest`` (the ``test`` extra), which is a test dependency only: ``import mlip``
never imports this module. Every check runs on each available device (``"cpu"`` and, when
``torch.cuda.is_available()``, ``"cuda"``; otherwise that case is skipped with the reason
"no CUDA device") and, unless it needs float64, in float32 and float64.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import pickle
from typing import ClassVar

import ase
import ase.build
import numpy as np
import pytest
import torch

from mlip.data.graph import GraphBatch, collate
from mlip.data.transforms import atoms_to_graph
from mlip.models.base import PotentialModel, save_model
from mlip.models.outputs import predict

__all__ = [
    "DEVICES", "DTYPES", "ModelConformance", "crystal", "molecule", "random_rotation", "rel_err",
    "require_device", "small_molecule", "transform",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: devices the checks run on; CUDA is skipped where absent
DEVICES = ("cpu", "cuda")


def require_device(name: str) -> torch.device:
    """``torch.device(name)``, or skip the calling test when it is CUDA and none is available."""
    if torch.device(name).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(name)


def molecule() -> ase.Atoms:
    """Methanol, slightly distorted (6 atoms, H C O)."""
    atoms = ase.build.molecule("CH3OH")
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def small_molecule() -> ase.Atoms:
    """Water, distorted (3 atoms)."""
    atoms = ase.build.molecule("H2O")
    atoms.positions += np.random.default_rng(2).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def crystal() -> ase.Atoms:
    """A rattled, sheared periodic C/O/H cell (4 atoms) with a non-orthogonal cell."""
    atoms = ase.Atoms(
        "COCH",
        scaled_positions=[[0.0, 0.0, 0.0], [0.25, 0.25, 0.25], [0.5, 0.5, 0.1], [0.7, 0.2, 0.6]],
        cell=[[3.6, 0.2, 0.0], [0.3, 3.4, 0.1], [0.0, 0.4, 3.8]],
        pbc=True,
    )
    atoms.positions += np.random.default_rng(3).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def random_rotation(seed: int) -> torch.Tensor:
    """Uniform random proper rotation (float64 on the CPU, ``det = +1``)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def transform(batch: GraphBatch, R: torch.Tensor, shift: torch.Tensor | None = None) -> GraphBatch:
    """Apply ``r -> R r + shift`` to positions and cell rows (graph and unit shifts unchanged).

    ``R`` and ``shift`` are moved to the batch's device and dtype.
    """
    out = copy.copy(batch)
    R = R.to(batch.positions)
    out.positions = batch.positions @ R.T + (0 if shift is None else shift.to(batch.positions))
    out.cell = batch.cell @ R.T
    return out


def _energy(model: PotentialModel, batch: GraphBatch) -> float:
    """The batch's total energy (eV), no graph recorded."""
    with torch.no_grad():
        return float(model(batch, batch.edge_vectors())["energy"].sum())


def finite_difference_forces(model: PotentialModel, batch: GraphBatch, h: float = 1e-5) -> torch.Tensor:
    """``-dE/dr`` of every atom and component by central differences of the model's energy.

    Shapes: batch with ``n`` atoms -> [n, 3] (eV/Å).
    """
    fd = torch.zeros_like(batch.positions)
    for i in range(batch.positions.shape[0]):
        for k in range(3):
            e = []
            for sign in (1, -1):
                b = copy.copy(batch)
                b.positions = batch.positions.clone()
                b.positions[i, k] += sign * h
                e.append(_energy(model, b))
            fd[i, k] = -(e[0] - e[1]) / (2 * h)
    return fd


def finite_difference_stress(model: PotentialModel, batch: GraphBatch, h: float = 1e-5) -> torch.Tensor:
    """``(1/V) dE/dε`` of a one-structure periodic batch by central differences of a symmetric strain
    applied to positions and cell (unit shifts fixed): the stress in ASE's sign convention.

    Shapes: -> [3, 3] (eV/Å³).
    """
    volume = float(torch.det(batch.cell[0]).abs())
    out = torch.zeros(3, 3, dtype=torch.float64)
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        e = []
        for sign in (1, -1):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[i, j] += sign * h
            eps[j, i] += sign * h if i != j else 0.0
            e.append(_energy(model, transform(batch, torch.eye(3, dtype=torch.float64) + eps)))  # symmetric strain
        out[i, j] = out[j, i] = (e[0] - e[1]) / (2 * h) / volume / (1.0 if i == j else 2.0)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the largest ``|b|``.

    >>> rel_err(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]))
    0.25
    """
    scale = max(float(b.detach().abs().max()), 1e-30)
    return float((a - b).detach().abs().max()) / scale


class ModelConformance:
    """Mixin: physics and bookkeeping every potential family must satisfy.

    A family's test module subclasses the mixin, names it ``Test...`` and implements
    ``make_model(**overrides)`` (a fresh model in torch's default dtype; the mixin moves it to
    each device and to float32 or float64). Exactly equivariant configurations assert
    rotation/reflection errors at float64 rounding (``~1e-10`` relative); approximately
    equivariant ones set ``exact = False`` and state their measured bound in
    ``approx_equivariance_tol``. Checks that need float64 (finite differences, smooth cutoff)
    always run in float64; everything else runs in both dtypes.
    """

    #: elements the test structures use (H, C, O)
    elements: ClassVar[list[int]] = [1, 6, 8]
    #: cutoff of the test models (Å); structures are built with it
    r_max = 3.5
    #: exact O(3) equivariance by construction: assert the float64 error at rounding level
    exact = True
    #: relative equivariance bound per dtype when exact; ``approx_equivariance_tol`` otherwise
    exact_tol: ClassVar[dict] = {torch.float32: 1e-4, torch.float64: 1e-10}
    approx_equivariance_tol: ClassVar[dict] = {torch.float32: 1e-2, torch.float64: 1e-2}
    #: relative agreement of batched and single evaluations, extensivity and similar identities
    same_tol: ClassVar[dict] = {torch.float32: 1e-5, torch.float64: 1e-11}
    #: central differences (float64, step 1e-5 Å or 1e-5 strain) agree to this fraction of the
    #: largest force / stress component (measured errors of the shipped families: ~1e-9)
    fd_rtol = 1e-7
    #: the test structures must give at least this largest force (eV/Å) and stress (eV/Å³), so
    #: that symmetry and derivative checks cannot pass on (near) zero outputs
    min_force = 1e-4
    min_stress = 1e-6

    def make_model(self, **overrides) -> PotentialModel:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
    def dtype(self, request) -> torch.dtype:
        return DTYPES[request.param]

    @pytest.fixture(params=list(DEVICES), ids=list(DEVICES))
    def device(self, request) -> torch.device:
        return require_device(request.param)

    def model(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
              **overrides) -> PotentialModel:
        model = self.make_model(elements=list(self.elements), r_max=self.r_max, **overrides)
        return model.to(device=device, dtype=dtype).eval()

    def batch(self, atoms_list: list[ase.Atoms], dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> GraphBatch:
        return collate([atoms_to_graph(a, self.r_max) for a in atoms_list]).to(device=device, dtype=dtype)

    def equivariance_tol(self, dtype: torch.dtype) -> float:
        return self.exact_tol[dtype] if self.exact else self.approx_equivariance_tol[dtype]

    def run(self, model: PotentialModel, batch: GraphBatch, stress: bool = False) -> dict[str, torch.Tensor]:
        out = predict(model, batch, forces=True, stress=stress)
        return {k: v.detach() for k, v in out.items()}

    def assert_nontrivial(self, batch: GraphBatch, out: dict[str, torch.Tensor]) -> None:
        """Guard against vacuous checks: every atom has a neighbour and forces are not ~0."""
        assert torch.unique(batch.edge_index[1]).numel() == batch.n_atoms, "an atom without neighbours"
        assert float(out["forces"].abs().max()) > self.min_force, "forces ~0: the check would be vacuous"

    @staticmethod
    def assert_same_model_output(out: torch.Tensor, ref: torch.Tensor, device: torch.device,
                                 tol: float) -> None:
        """Two evaluations of the same weights on the same inputs: bit for bit on the CPU (NaN
        included); within ``tol`` on CUDA, whose scatter-adds (``index_add_``) use atomics that
        sum in a varying order."""
        if device.type == "cpu":
            torch.testing.assert_close(out, ref, rtol=0.0, atol=0.0, equal_nan=True)
        else:
            finite = torch.isfinite(ref)
            assert torch.equal(finite, torch.isfinite(out))
            assert rel_err(out[finite], ref[finite]) < tol

    # ------------------------------------------------------------------ symmetry
    def test_rotation(self, dtype, device):
        model = self.model(dtype, device)
        batch = self.batch([molecule(), crystal()], dtype, device)
        ref = self.run(model, batch, stress=True)
        self.assert_nontrivial(batch, ref)
        assert float(ref["stress"][1].abs().max()) > self.min_stress
        tol = self.equivariance_tol(dtype)
        for seed in range(2):
            R = random_rotation(seed).to(device=device, dtype=dtype)
            out = self.run(model, transform(batch, R), stress=True)
            assert rel_err(out["energy"], ref["energy"]) < tol
            assert rel_err(out["forces"], ref["forces"] @ R.T) < tol
            s_rot = R @ ref["stress"][1] @ R.T  # the crystal's stress rotates with its cell
            assert rel_err(out["stress"][1], s_rot) < tol

    def test_reflection(self, dtype, device):
        model = self.model(dtype, device)
        batch = self.batch([molecule(), crystal()], dtype, device)
        ref = self.run(model, batch, stress=True)
        self.assert_nontrivial(batch, ref)
        tol = self.equivariance_tol(dtype)
        mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
        for R in (-torch.eye(3, dtype=torch.float64), mirror @ random_rotation(7)):
            R = R.to(device=device, dtype=dtype)
            out = self.run(model, transform(batch, R), stress=True)
            assert rel_err(out["energy"], ref["energy"]) < tol
            assert rel_err(out["forces"], ref["forces"] @ R.T) < tol
            assert rel_err(out["stress"][1], R @ ref["stress"][1] @ R.T) < tol

    def test_translation(self, dtype, device):
        model = self.model(dtype, device)
        batch = self.batch([molecule(), crystal()], dtype, device)
        ref = self.run(model, batch)
        self.assert_nontrivial(batch, ref)
        out = self.run(model, transform(batch, torch.eye(3), torch.tensor([1.3, -2.1, 0.7])))
        assert rel_err(out["energy"], ref["energy"]) < self.same_tol[dtype] * 10
        assert rel_err(out["forces"], ref["forces"]) < self.same_tol[dtype] * 100

    def test_permutation(self, dtype, device):
        model = self.model(dtype, device)
        for atoms in (molecule(), crystal()):
            perm = np.random.default_rng(0).permutation(len(atoms))
            assert not np.array_equal(perm, np.arange(len(atoms)))
            batch = self.batch([atoms], dtype, device)
            ref = self.run(model, batch)
            self.assert_nontrivial(batch, ref)
            out = self.run(model, self.batch([atoms[perm]], dtype, device))
            assert rel_err(out["energy"], ref["energy"]) < self.same_tol[dtype]
            permuted = ref["forces"][torch.as_tensor(perm, device=device)]
            assert rel_err(out["forces"], permuted) < self.same_tol[dtype] * 10

    # ------------------------------------------------------------------ periodicity
    def test_supercell_extensivity(self, dtype, device):
        """An ``n1 x n2 x n3`` supercell of the periodic crystal (2x1x1 and 1x2x3): ``n1 n2 n3`` times
        the cell's energy, the cell's forces on every image of an atom and the cell's stress, to
        rounding (periodic images, unit shifts and any per-structure quantity handled per cell)."""
        model = self.model(dtype, device)
        cell = crystal()
        batch = self.batch([cell], dtype, device)
        one = self.run(model, batch, stress=True)
        self.assert_nontrivial(batch, one)
        assert float(one["stress"].abs().max()) > self.min_stress
        tol = self.same_tol[dtype] * 10
        for reps in ((2, 1, 1), (1, 2, 3)):
            n = math.prod(reps)
            out = self.run(model, self.batch([cell.repeat(reps)], dtype, device), stress=True)
            # ase's repeat() stacks whole copies of the cell: atom i of image k is atom k * len(cell) + i
            assert rel_err(out["energy"], n * one["energy"]) < tol, reps
            assert rel_err(out["forces"], one["forces"].repeat(n, 1)) < tol, reps
            assert rel_err(out["stress"], one["stress"]) < tol, reps

    def test_wrapping_invariance(self, dtype, device):
        """Moving atoms of the crystal by whole lattice vectors (up to two along each, an unwrapped
        structure as MD writes it), and ``atoms.wrap()`` of that structure, leave energy, forces and
        stress unchanged to rounding of the larger coordinates."""
        model = self.model(dtype, device)
        atoms = crystal()
        batch = self.batch([atoms], dtype, device)
        ref = self.run(model, batch, stress=True)
        self.assert_nontrivial(batch, ref)
        assert float(ref["stress"].abs().max()) > self.min_stress
        unwrapped = atoms.copy()
        images = np.random.default_rng(4).integers(-2, 3, size=(len(atoms), 3))
        assert len({tuple(n) for n in images}) > 1  # atoms move to different images
        unwrapped.positions += images @ atoms.cell.array
        wrapped = unwrapped.copy()
        wrapped.wrap()
        frac = wrapped.get_scaled_positions(wrap=False)
        assert np.all((frac >= 0) & (frac < 1))
        assert np.abs(wrapped.positions - unwrapped.positions).max() > 3.0  # wrap() moved atoms back
        for other in (unwrapped, wrapped):
            out = self.run(model, self.batch([other], dtype, device), stress=True)
            assert rel_err(out["energy"], ref["energy"]) < self.same_tol[dtype] * 10
            assert rel_err(out["forces"], ref["forces"]) < self.same_tol[dtype] * 100
            assert rel_err(out["stress"], ref["stress"]) < self.same_tol[dtype] * 100

    # ------------------------------------------------------------------ derivatives (float64)
    def test_forces_finite_difference(self, device):
        """Every force component of a molecule and a crystal vs a central difference of the energy."""
        model = self.model(torch.float64, device)
        h = 1e-5
        for atoms in (molecule(), crystal()):
            batch = self.batch([atoms], torch.float64, device)
            forces = self.run(model, batch)["forces"]
            self.assert_nontrivial(batch, {"forces": forces})
            fd = finite_difference_forces(model, batch, h)
            assert float((fd - forces).abs().max()) < self.fd_rtol * float(forces.abs().max())

    def test_stress_finite_difference(self, device):
        """Every stress component vs ``(1/V) dE/dε`` by central differences of a symmetric strain
        applied to positions and cell (unit shifts fixed)."""
        model = self.model(torch.float64, device)
        batch = self.batch([crystal()], torch.float64, device)
        stress = self.run(model, batch, stress=True)["stress"][0]
        scale = float(stress.abs().max())
        assert scale > self.min_stress, "stress ~0: the check would be vacuous"
        volume = float(torch.det(batch.cell[0]).abs())
        fd = finite_difference_stress(model, batch)
        for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
            assert abs(float(fd[i, j]) - float(stress[i, j])) < self.fd_rtol * scale, (i, j)
        assert rel_err(stress, stress.T) < 1e-12
        virial = self.run(model, batch, stress=True)["virial"][0]
        assert rel_err(virial, -stress * volume) < 1e-12  # virial = -dE/dε = -V σ

    # ------------------------------------------------------------------ locality
    def test_extensivity(self, dtype, device):
        model = self.model(dtype, device)
        one = molecule()
        two = one.copy()
        far = one.copy()
        far.positions += [20.0, 0.0, 0.0]
        two += far
        e1 = self.run(model, self.batch([one], dtype, device))
        self.assert_nontrivial(self.batch([one], dtype, device), e1)
        e2 = self.run(model, self.batch([two], dtype, device))
        assert rel_err(e2["energy"], 2 * e1["energy"]) < self.same_tol[dtype] * 10
        assert rel_err(e2["forces"], torch.cat([e1["forces"], e1["forces"]])) < self.same_tol[dtype] * 10

    def test_smooth_cutoff(self, device):
        """An H atom crosses ``r_max`` of the C in an O-C...H chain (H-O stays beyond ``r_max``):
        energy and the force on H are continuous, and the H still matters just inside."""
        model = self.model(torch.float64, device)
        energies, forces = {}, {}
        for delta in (-1e-1, -1e-2, -1e-3, 1e-3):
            d = self.r_max + delta
            atoms = ase.Atoms("OCH", positions=[[-1.2, 0.0, 0.0], [0.0, 0.0, 0.0], [d * 0.6, d * 0.8, 0.0]])
            out = self.run(model, self.batch([atoms], torch.float64, device))
            energies[delta], forces[delta] = float(out["energy"][0]), float(out["forces"][2].norm())
        beyond = energies[1e-3]
        assert forces[1e-3] < 1e-12  # H has no neighbour: no force
        jump = {delta: abs(energies[delta] - beyond) for delta in (-1e-1, -1e-2, -1e-3)}
        # the neighbour changes the energy inside the cutoff (otherwise the test is vacuous) ...
        assert jump[-1e-1] > 1e-9 and forces[-1e-1] > 1e-7
        # ... and the change vanishes smoothly as it approaches r_max (u(r) ~ (r_max - r)^3)
        assert jump[-1e-3] < 1e-6 and jump[-1e-3] < jump[-1e-2] / 10 < jump[-1e-1] / 100
        assert forces[-1e-3] < 1e-5 and forces[-1e-3] < forces[-1e-2] / 10 < forces[-1e-1] / 100

    def test_batch_equals_single(self, dtype, device):
        model = self.model(dtype, device)
        structures = [molecule(), crystal(), small_molecule()]
        together = self.run(model, self.batch(structures, dtype, device), stress=True)
        self.assert_nontrivial(self.batch(structures, dtype, device), together)
        for g, atoms in enumerate(structures):
            alone = self.run(model, self.batch([atoms], dtype, device), stress=True)
            a, b = int(sum(len(s) for s in structures[:g])), int(sum(len(s) for s in structures[: g + 1]))
            assert rel_err(together["energy"][g : g + 1], alone["energy"]) < self.same_tol[dtype]
            assert rel_err(together["forces"][a:b], alone["forces"]) < self.same_tol[dtype] * 10
            if atoms.pbc.any():
                assert rel_err(together["stress"][g], alone["stress"][0]) < self.same_tol[dtype] * 10

    # ------------------------------------------------------------------ bookkeeping
    def test_save_load_roundtrip(self, dtype, device, tmp_path):
        import mlip

        model = self.model(dtype, device, e0s={1: -13.6, 6: -1029.5, 8: -2041.3})
        batch = self.batch([molecule(), crystal()], dtype, device)
        ref = self.run(model, batch, stress=True)
        path = tmp_path / "model.pt"
        save_model(model, path)
        # one file: family, config (E0s included), weights, cutoff, element list, mlip version
        payload = torch.load(path, weights_only=True, map_location="cpu")
        assert payload["family"] == model.family and payload["mlip_version"] == mlip.__version__
        assert payload["r_max"] == self.r_max and payload["elements"] == list(self.elements)
        e0s = {int(z): float(v) for z, v in payload["config"]["e0s"].items()}
        assert e0s == {1: -13.6, 6: -1029.5, 8: -2041.3}
        assert payload["state_dict"].keys() == model.state_dict().keys()
        loaded = mlip.load(path).to(device)
        assert loaded.family == model.family
        assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
        assert next(loaded.parameters()).dtype == dtype
        out = self.run(loaded, batch, stress=True)
        for key in ("energy", "forces", "stress"):  # bit for bit on the CPU (the molecule's NaN stress too)
            self.assert_same_model_output(out[key], ref[key], device, self.same_tol[dtype])

    def test_isolated_atom_is_e0(self, dtype, device):
        """An isolated atom's energy is its E0, whatever the scale and the (binding-energy) shift;
        a dimer pulled apart tends smoothly to the sum of its atoms' E0s."""
        e0s = {1: -13.6, 6: -1029.5, 8: -2041.3}
        model = self.model(dtype, device, e0s=e0s, scale=1.3, shift=-4.0)
        atoms = [ase.Atoms(sym, positions=[[0.0, 0.0, 0.0]]) for sym in ("H", "C", "O")]
        out = self.run(model, self.batch(atoms, dtype, device))
        want = torch.tensor([e0s[1], e0s[6], e0s[8]], dtype=dtype, device=device)
        assert rel_err(out["energy"], want) < self.same_tol[dtype]
        assert torch.all(out["forces"] == 0)
        gaps = {}
        for d in (1.0, self.r_max - 1e-1, self.r_max - 1e-2):
            dimer = ase.Atoms("OH", positions=[[0.0, 0.0, 0.0], [d, 0.0, 0.0]])
            gaps[d] = abs(float(self.run(model, self.batch([dimer], dtype, device))["energy"][0]) - e0s[1] - e0s[8])
        bonded, near, nearer = gaps.values()
        assert bonded > 1.0  # at 1 Å the pair is bonded: the shift is there (the check has teeth) ...
        floor = 1e-3 if dtype == torch.float32 else 1e-12  # float32 resolution of a 2055 eV energy
        assert nearer < 1e-4 * bonded + floor  # ... and gone near the cutoff
        if dtype == torch.float64:
            assert nearer < near / 10  # smoothly: the learned part vanishes like (r_max - r)^3

    def test_inputs_not_modified(self, dtype, device):
        model = self.model(dtype, device)
        batch = self.batch([molecule(), crystal()], dtype, device)
        before = {f.name: copy.deepcopy(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
        self.run(model, batch, stress=True)
        for name, value in before.items():
            now = getattr(batch, name)
            if isinstance(value, torch.Tensor):
                assert torch.equal(now, value) or (torch.isnan(now).all() and torch.isnan(value).all()), name
                assert not now.requires_grad, name
            else:
                assert now == value, name

    def test_deepcopy_and_pickle(self, dtype, device):
        """EMA keeps a deep copy and DataParallel/multiprocessing pickle the model."""
        model = self.model(dtype, device)
        batch = self.batch([molecule()], dtype, device)
        ref = self.run(model, batch)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            out = self.run(other, batch)
            self.assert_same_model_output(out["energy"], ref["energy"], device, self.same_tol[dtype])
            self.assert_same_model_output(out["forces"], ref["forces"], device, self.same_tol[dtype])

    def test_output_dtype_and_shapes(self, dtype, device):
        model = self.model(dtype, device)
        batch = self.batch([molecule(), crystal()], dtype, device)
        out = self.run(model, batch, stress=True)
        assert out["energy"].shape == (2,) and out["energy"].dtype == dtype
        assert out["node_energy"].shape == (batch.n_atoms,)
        assert out["forces"].shape == (batch.n_atoms, 3) and out["forces"].dtype == dtype
        assert out["stress"].shape == (2, 3, 3) and out["stress"].dtype == dtype
        assert out["virial"].shape == (2, 3, 3) and out["virial"].dtype == dtype
        assert all(v.device.type == torch.device(device).type for v in out.values())
        # the molecule has no volume: NaN stress rather than a number; the crystal's is finite
        assert torch.isnan(out["stress"][0]).all() and torch.isfinite(out["stress"][1]).all()
        assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
        rtol = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(out["node_energy"].sum(), out["energy"].sum(), rtol=rtol)
