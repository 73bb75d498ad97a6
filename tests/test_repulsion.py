"""ZBL pair repulsion (mlip.nn.repulsion, the models' ``pair_repulsion`` option): the Coulomb limit
of the screened repulsion, a smooth switch-off at the covalent radii sum, and in every family an
energy that differs from the same weights without it by exactly the pair energies, with forces and
stress that are its derivatives (float64 finite differences) on structures with compressed bonds."""
from __future__ import annotations

import ase
import numpy as np
import pytest
import torch
from ase.data import covalent_radii

from mlip.data.graph import collate
from mlip.data.transforms import atoms_to_graph
from mlip.models.base import build_model
from mlip.models.outputs import predict
from mlip.nn.repulsion import COULOMB_EV_A, SWITCH_RANGE, screening, zbl_pair_energy
from mlip.testing import crystal, finite_difference_forces, finite_difference_stress, molecule

R_MAX = 3.5
FAMILIES = {
    "equivariant": {"num_channels": 8, "lmax": 2, "num_layers": 2, "correlation": 3, "spline_knots": 10,
                    "readout_hidden": 8, "avg_num_neighbors": 6.0},
    "frame-averaged": {"num_channels": 16, "num_layers": 2, "num_radial": 6, "readout_hidden": 8,
                       "avg_num_neighbors": 6.0},
    "learned-equivariance": {"num_channels": 16, "num_heads": 2, "num_layers": 2, "num_radial": 6,
                             "readout_hidden": 8, "invariant_channels": 8, "transform_hidden": 8},
}


def _pair(z1: int, z2: int, r: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    n = len(r)
    return zbl_pair_energy(torch.as_tensor(r, dtype=dtype), torch.full((n,), z1), torch.full((n,), z2))


def test_screening_is_one_at_contact_so_short_range_is_the_bare_coulomb_repulsion():
    assert float(screening(torch.zeros(1, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)
    r = np.array([1e-6, 1e-5])
    e = _pair(1, 6, r).numpy()
    np.testing.assert_allclose(e * r / (COULOMB_EV_A * 6), 1.0, rtol=1e-4)


@pytest.mark.parametrize("z1,z2", [(1, 1), (1, 6), (6, 8), (29, 29)])
def test_repulsive_and_smooth_to_zero_inside_the_covalent_radii_sum(z1, z2):
    rc = SWITCH_RANGE * (covalent_radii[z1] + covalent_radii[z2])
    r = torch.linspace(0.2, rc - 1e-9, 400, dtype=torch.float64).requires_grad_()
    e = zbl_pair_energy(r, torch.full((400,), z1), torch.full((400,), z2))
    (de,) = torch.autograd.grad(e.sum(), r, create_graph=True)
    (d2e,) = torch.autograd.grad(de.sum(), r)
    e, de = e.detach(), de.detach()
    inside = r < rc - 1e-3  # (the last points are polynomial rounding around zero)
    assert bool((e[inside] > 0).all()) and bool((de[inside] < 0).all())  # repulsive inside the switch
    # energy, force and curvature all reach zero where the switch ends (C2)
    assert abs(float(e[-1])) < 1e-12 * float(e[0])
    assert abs(float(de[-1])) < 1e-9 * abs(float(de[0]))
    assert abs(float(d2e[-1])) < 1e-6 * abs(float(d2e[0]))
    beyond = _pair(z1, z2, np.array([rc, rc + 0.1, 10.0]))
    assert not beyond.any()


def _compressed_molecule() -> ase.Atoms:
    """Methanol with one H pushed to 0.70 Å of its carbon (0.65 of the C-H covalent radii sum)."""
    atoms = molecule()
    c = int(np.flatnonzero(atoms.numbers == 6)[0])
    h = int(np.argmin(np.where(atoms.numbers == 1, atoms.get_distances(c, range(len(atoms))), np.inf)))
    d = atoms.positions[h] - atoms.positions[c]
    atoms.positions[h] = atoms.positions[c] + 0.70 * d / np.linalg.norm(d)
    return atoms


def _compressed_crystal() -> ase.Atoms:
    atoms = crystal()
    atoms.set_cell(atoms.cell.array * 0.4, scale_atoms=True)  # pairs well below their covalent radii sums
    return atoms


def _pairs_energy(atoms: ase.Atoms) -> float:
    """Sum of ZBL pair energies over unique pairs (all periodic images within the switch), from ASE's
    neighbour list: independent of the model's edge bookkeeping."""
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, 2 * max(covalent_radii[atoms.numbers]))
    e = zbl_pair_energy(torch.as_tensor(d), torch.as_tensor(atoms.numbers[i]), torch.as_tensor(atoms.numbers[j]))
    return 0.5 * float(e.sum())  # the list holds each pair in both directions


def _model(family: str, **kw):
    return build_model(family, {**FAMILIES[family], "elements": [1, 6, 8], "r_max": R_MAX, **kw}).double().eval()


def _energy(model, atoms) -> float:
    batch = collate([atoms_to_graph(atoms, R_MAX)]).to(dtype=torch.float64)
    return float(predict(model, batch, forces=False)["energy"].detach().sum())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_energy_adds_exactly_the_pair_energies(family):
    on, off = _model(family, pair_repulsion=True), _model(family)
    for atoms in (_compressed_molecule(), _compressed_crystal()):
        extra = _pairs_energy(atoms)
        assert extra > 1.0  # the structure has compressed bonds: the check is not vacuous
        assert _energy(on, atoms) - _energy(off, atoms) == pytest.approx(extra, rel=1e-10)
    relaxed = molecule()  # every bond longer than SWITCH_RANGE times its covalent radii sum: nothing added
    assert _pairs_energy(relaxed) == 0.0
    assert _energy(on, relaxed) == _energy(off, relaxed)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forces_and_stress_are_derivatives_with_repulsion(family):
    model = _model(family, pair_repulsion=True)
    for atoms in (_compressed_molecule(), _compressed_crystal()):
        batch = collate([atoms_to_graph(atoms, R_MAX)]).to(dtype=torch.float64)
        periodic = bool(atoms.pbc.any())
        out = predict(model, batch, forces=True, stress=periodic)
        forces = out["forces"].detach()
        fd = finite_difference_forces(model, batch)
        assert float(forces.abs().max()) > 1.0
        assert float((fd - forces).abs().max()) < 1e-7 * float(forces.abs().max())
        if periodic:  # stress = (1/V) dE/dstrain (ASE sign)
            stress = out["stress"].detach().reshape(3, 3)
            fd_stress = finite_difference_stress(model, batch)
            for p, q in ((0, 0), (1, 1), (0, 2)):
                assert float(stress[p, q]) == pytest.approx(float(fd_stress[p, q]), rel=1e-6, abs=1e-9)
