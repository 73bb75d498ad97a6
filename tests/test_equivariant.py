"""The ``equivariant`` family: conformance (the exact default, other exact configs, the optional SiLU
grid) and family-specific checks."""
from __future__ import annotations

import ase
import pytest
import torch

from mlip.models.base import build_model
from mlip.testing import ModelConformance, crystal, molecule, random_rotation, rel_err, transform

SMALL = {"num_channels": 8, "lmax": 2, "num_layers": 2, "correlation": 3, "spline_knots": 10, "readout_hidden": 8,
         "avg_num_neighbors": 8.0}


class TestDefault(ModelConformance):
    """The default config (spline radials, correlation 3, grid mixing with the quadratic MLP on the
    default grid): exactly O(3)-equivariant, 1e-10 relative in float64 (``exact_tol``)."""

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, **overrides})

    def test_default_config_is_the_exact_one(self):
        model = self.model()
        assert model.config.mixing == "grid" and model.config.grid_activation == "quadratic"
        assert model.layers[0].mixing is not None and model.layers[0].mixing.exact
        assert model.exactly_equivariant


class TestExactNoMixingSpeciesSkip(ModelConformance):
    """No grid mixing, three layers with the element-dependent skip (``skip_per_element``) on both
    residual layers: exactly O(3)-equivariant; isolated atoms still give exactly E0."""

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, "mixing": "none", "num_layers": 3,
                                           "skip_per_element": True, **overrides})


class TestExactQuadraticGrid(ModelConformance):
    """Grid mixing with a quadratic pointwise MLP on a grid exact to degree 3*lmax: exact.
    MLP radials, correlation 2; float64 only (float32 is covered by the other two classes)."""

    @pytest.fixture(params=["float64"])
    def dtype(self, request):
        return torch.float64

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, "mixing": "grid", "grid_activation": "quadratic",
                                           "radial": "mlp", "correlation": 2, **overrides})


class TestSiluGrid(ModelConformance):
    """The optional SiLU grid MLP (``grid_activation: silu``): exactly parity-equivariant, rotation
    error bounded (docs/equivariant.md)."""

    exact = False
    approx_equivariance_tol = {torch.float32: 1e-3, torch.float64: 1e-3}

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, "grid_activation": "silu", **overrides})


def _model(**kw):
    return build_model("equivariant", {**SMALL, "elements": [1, 6, 8], "r_max": 3.5, **kw}).double().eval()


def _graphs(atoms_list, r_max=3.5):
    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph

    return collate([atoms_to_graph(a, r_max) for a in atoms_list]).to(dtype=torch.float64)


def _charged(atoms, charge, spin):
    atoms = atoms.copy()
    atoms.info["charge"], atoms.info["spin"] = charge, spin
    return atoms


def test_silu_grid_is_exactly_parity_equivariant():
    from mlip.models.outputs import predict

    model = _model(grid_activation="silu")
    batch = _graphs([molecule(), crystal()])
    ref = predict(model, batch)
    P = -torch.eye(3, dtype=torch.float64)
    out = predict(model, transform(batch, P))
    assert rel_err(out["energy"].detach(), ref["energy"].detach()) < 1e-12
    assert rel_err(out["forces"], -ref["forces"]) < 1e-12


def test_charge_spin_model_uses_and_validates_charge_and_spin():
    from mlip.models.outputs import predict

    model = _model(use_charge_spin=True, mixing="none")
    mol = molecule()  # CH3OH: 18 electrons
    neutral = {k: v.detach() for k, v in predict(model, _graphs([_charged(mol, 0, 1)])).items()}
    cation = {k: v.detach() for k, v in predict(model, _graphs([_charged(mol, 1, 2)])).items()}
    triplet = {k: v.detach() for k, v in predict(model, _graphs([_charged(mol, 0, 3)])).items()}
    assert abs(float(neutral["energy"] - cation["energy"])) > 1e-6
    assert abs(float(neutral["energy"] - triplet["energy"])) > 1e-6
    # still exactly invariant with charge and spin
    R = random_rotation(3)
    b = _graphs([_charged(mol, 1, 2)])
    rot = predict(model, transform(b, R))
    assert rel_err(rot["energy"].detach(), cation["energy"].detach()) < 1e-10
    assert rel_err(rot["forces"], cation["forces"] @ R.T) < 1e-10
    # refuses missing or impossible values instead of assuming a neutral singlet
    with pytest.raises(ValueError, match=r"structure 1 in the batch \(charge=nan"):
        predict(model, _graphs([_charged(mol, 0, 1), mol]))
    with pytest.raises(ValueError, match=r"structure 0 .*impossible pair, 18 electrons cannot have multiplicity 2"):
        predict(model, _graphs([_charged(mol, 0, 2)]))
    with pytest.raises(ValueError, match=r"multiplicity 2S\+1 must be an integer >= 1"):
        predict(model, _graphs([_charged(mol, 0, 0)]))


def test_multi_head_readout_and_e0s():
    from mlip.models.outputs import predict

    e0s = {"dft_a": {1: -1.0, 6: -2.0, 8: -3.0}, "dft_b": {1: -10.0, 6: -20.0, 8: -30.0}}
    model = _model(heads=["dft_a", "dft_b"], e0s=e0s)
    single = ase.Atoms("C", positions=[[0.0, 0.0, 0.0]])
    a, b = single.copy(), single.copy()
    a.info["head"], b.info["head"] = "dft_a", "dft_b"
    out = predict(model, _graphs([a, b]))["energy"]
    assert out.tolist() == [-2.0, -20.0]
    m1, m2 = molecule(), molecule()
    m1.info["head"], m2.info["head"] = "dft_a", "dft_b"
    e = predict(model, _graphs([m1, m2]))["energy"].detach()
    e0_diff = sum(-9.0 * {1: 1, 6: 2, 8: 3}[int(z)] for z in m1.numbers)
    assert abs(float(e[1] - e[0]) - e0_diff) > 1e-6  # the heads' readouts differ beyond their E0s
    bad = molecule()
    bad.info["head"] = "other"
    with pytest.raises(ValueError, match="head 'other'"):
        predict(model, _graphs([bad]))


def test_unknown_element_and_bad_config_are_clear_errors():
    from mlip.models.outputs import predict

    model = _model()
    with pytest.raises(ValueError, match=r"not trained on element\(s\) \['N'\]"):
        predict(model, _graphs([ase.Atoms("NO", positions=[[0, 0, 0], [1.2, 0, 0]])]))
    with pytest.raises(ValueError, match="lmax must be 1..3"):
        _model(lmax=4)
    with pytest.raises(ValueError, match="radial must be"):
        _model(radial="gaussian")
    with pytest.raises(KeyError, match="did you mean 'num_channels'"):
        build_model("equivariant", {"elements": [1], "num_chanels": 8})


def test_spline_and_mlp_radials_and_kernel_backend():
    from mlip.kernels import reference
    from mlip.models.outputs import predict

    batch = _graphs([molecule(), crystal()])
    for radial in ("spline", "mlp"):
        model = _model(radial=radial, kernel="torch")
        assert model.kernel_backend.ops is reference
        out = predict(model, batch, stress=True)
        assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    assert _model(kernel="auto").kernel_backend.ops is reference


def test_model_routes_the_convolution_and_grid_mixing_through_the_backend(monkeypatch):
    """A backend module with the reference's ``conv_tp`` and ``grid_product`` signatures is what the
    model calls (the convolution and the body-order contraction of every layer; the quadratic grid
    mixing's Gaunt product of every layer with l > 0 output, on the hidden channels), results equal
    to the torch backend's; a
    backend other than the reference is first compared with it (``ensure_checked``). The SiLU grid
    has no product and never calls ``grid_product``."""
    import sys
    import types

    from mlip.kernels import KernelBackend, reference
    from mlip.models import backend_check
    from mlip.models.outputs import predict

    calls, grid_calls, sc_calls, checks = [], [], [], []

    def conv_tp(*args):
        calls.append(args[6:])
        return reference.conv_tp(*args)

    def symmetric_contraction(*args):
        sc_calls.append((args[1], args[5:]))
        return reference.symmetric_contraction(*args)

    def grid_product(a, b, to_grid, from_grid):
        grid_calls.append((tuple(a.shape), tuple(from_grid.shape)))
        return reference.grid_product(a, b, to_grid, from_grid)

    fake = types.ModuleType("fake_backend")
    fake.conv_tp, fake.grid_product, fake.symmetric_contraction = conv_tp, grid_product, symmetric_contraction
    batch = _graphs([molecule()])
    n_atoms = batch.n_atoms
    want = predict(_model(kernel="torch"), batch)
    model = _model()
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    monkeypatch.setattr(model, "kernel_backend", KernelBackend(name="fake", module="fake_backend"))
    monkeypatch.setattr(backend_check, "ensure_checked", lambda m, device, dtype: checks.append((m, dtype)))
    got = predict(model, batch)
    assert calls == [(0, 2, 2), (2, 2, 2)]
    k = model.layers[0].mixing.num_points  # the last layer outputs scalars only: no mixing there
    assert grid_calls == [((n_atoms, SMALL["num_channels"], 9), (9, k))]
    element = model.embedding.index(batch.numbers)  # per-element contraction weights: each atom's row
    assert [args for _, args in sc_calls] == [(2, 2, 3), (2, 0, 3)]
    assert all(torch.equal(rows, element) for rows, _ in sc_calls)
    assert checks == [(model, torch.float64)]
    for key in ("energy", "forces"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)

    grid_calls.clear()
    silu = _model(grid_activation="silu")
    monkeypatch.setattr(silu, "kernel_backend", model.kernel_backend)
    predict(silu, batch)
    assert grid_calls == [] and len(calls) == 4 and len(sc_calls) == 4


@pytest.mark.parametrize("name", ["equivariant-small", "equivariant-medium"])
def test_config_presets_build_and_run(name):
    import pathlib

    import yaml

    from mlip.models.outputs import predict

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    section = dict(yaml.safe_load(path.read_text())["model"])
    assert section.pop("family") == "equivariant"
    model = build_model("equivariant", {**section, "elements": [1, 6, 8]}).double().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 1e4
    out = predict(model, _graphs([ase.Atoms("CO", positions=[[0, 0, 0], [1.2, 0, 0]])], r_max=section["r_max"]))
    assert torch.isfinite(out["forces"]).all()
    if name == "equivariant-medium":
        assert (section["num_channels"], section["lmax"], section["num_layers"], section["correlation"], section["r_max"]) == (128, 3, 2, 3, 6.0)


def test_registered_family_and_radial_options():
    """``equivariant`` is in the registry; splines are the default radial, an MLP of a Bessel basis
    the option, and the two give different (but each r-dependent) radial weights."""
    from mlip.models.base import MODELS
    from mlip.models.equivariant import EquivariantConfig, EquivariantModel
    from mlip.nn.radial import BesselBasis, MLPRadial, SplineBasis, SplineRadial

    assert MODELS["equivariant"] is EquivariantModel and EquivariantModel.family == "equivariant"
    assert EquivariantConfig().radial == "spline"
    spline, mlp = _model(), _model(radial="mlp")
    assert isinstance(spline.radial_basis, SplineBasis)
    assert all(isinstance(layer.radial, SplineRadial) for layer in spline.layers)
    assert isinstance(mlp.radial_basis, BesselBasis)
    assert all(isinstance(layer.radial, MLPRadial) for layer in mlp.layers)
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for model in (spline, mlp):
        w = model.layers[0].radial(model.radial_basis(r), model.envelope(r)).detach()
        assert float((w[0] - w[1]).abs().max()) > 1e-3  # depends on r
    batch = _graphs([molecule()])
    from mlip.models.outputs import predict

    assert abs(float(predict(spline, batch)["energy"].detach() - predict(mlp, batch)["energy"].detach())) > 1e-6


@pytest.mark.parametrize(
    "lmax,hidden_lmax,num_layers,num_channels,correlation",
    [(1, 1, 1, 4, 1), (1, 1, 3, 6, 2), (3, 3, 2, 4, 3), (3, 1, 2, 6, 3)],
)
def test_lmax_channels_layers_correlation_configurable_and_exact(lmax, hidden_lmax, num_layers, num_channels, correlation):
    """Every size knob is honoured, and each combination (with the exact quadratic grid) is
    O(3)-equivariant to float64 rounding, stress of the rotated cell included."""
    from mlip.kernels.reference import tp_paths
    from mlip.models.outputs import predict

    model = _model(lmax=lmax, hidden_lmax=hidden_lmax, num_layers=num_layers, num_channels=num_channels,
                   correlation=correlation, grid_activation="quadratic")
    assert len(model.layers) == num_layers and model.embedding.weight.shape[1] == num_channels
    for i, layer in enumerate(model.layers):
        assert layer.conv.lmax_sh == lmax  # edge harmonics to lmax
        assert layer.conv.lmax_in == (0 if i == 0 else hidden_lmax)
        assert layer.conv.n_paths == len(tp_paths(layer.conv.lmax_in, lmax, layer.conv.lmax_out))
        assert layer.contraction.correlation == correlation
        last = i == num_layers - 1
        assert (layer.mixing is None) == (last or hidden_lmax == 0)
        if layer.mixing is not None:
            assert layer.mixing.lmax == hidden_lmax and layer.mixing.degree == 3 * hidden_lmax
    batch = _graphs([molecule(), crystal()])
    ref = {k: v.detach() for k, v in predict(model, batch, stress=True).items()}
    assert float(ref["forces"].abs().max()) > 1e-3
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    for R in (random_rotation(11), mirror @ random_rotation(12)):
        out = predict(model, transform(batch, R), stress=True)
        assert rel_err(out["energy"].detach(), ref["energy"]) < 1e-10
        assert rel_err(out["forces"].detach(), ref["forces"] @ R.T) < 1e-10
        assert rel_err(out["stress"][1].detach(), R @ ref["stress"][1] @ R.T) < 1e-10


def test_body_order_contraction_is_used_and_bounded():
    from mlip.models.outputs import predict

    batch = _graphs([molecule()])
    energies = [float(predict(_model(correlation=c), batch)["energy"].detach()) for c in (1, 2, 3)]
    assert min(abs(energies[0] - energies[1]), abs(energies[1] - energies[2]), abs(energies[0] - energies[2])) > 1e-6
    with pytest.raises(ValueError, match="correlation must be 1, 2 or 3"):
        _model(correlation=4)


def test_grid_degree_follows_lmax_unless_set():
    model = _model(hidden_lmax=2, lmax=3)
    assert model.layers[0].mixing.degree == 6 and model.layers[0].mixing.num_points == 4 * 8
    model = _model(grid_degree=12)
    assert model.layers[0].mixing.degree == 12 and model.layers[0].mixing.num_points == 7 * 14


def test_periodic_supercell_is_extensive():
    """A 2x1x1 supercell of a periodic cell: twice the energy, the same forces on each image and
    the same stress (periodic images and unit shifts handled consistently)."""
    from mlip.models.outputs import predict

    model = _model(grid_activation="silu")  # also exact for the SiLU grid: it acts per atom
    cell = crystal()
    sup = cell.repeat((2, 1, 1))
    one = predict(model, _graphs([cell]), stress=True)
    two = predict(model, _graphs([sup]), stress=True)
    assert float(one["forces"].abs().max()) > 1e-3 and float(one["stress"].abs().max()) > 1e-4
    assert rel_err(two["energy"].detach(), 2 * one["energy"].detach()) < 1e-12
    assert rel_err(two["forces"].detach(), torch.cat([one["forces"], one["forces"]]).detach()) < 1e-11
    assert rel_err(two["stress"].detach(), one["stress"].detach()) < 1e-11


def test_charge_spin_ignored_without_the_option_and_felt_by_isolated_ions():
    from mlip.models.outputs import predict

    plain = _model()
    mol = molecule()
    e_plain = predict(plain, _graphs([mol]))["energy"]
    assert torch.equal(predict(plain, _graphs([_charged(mol, 1, 2)]))["energy"], e_plain)
    model = _model(use_charge_spin=True, e0s={1: -13.6, 6: -1029.5, 8: -2041.3})
    ions = [_charged(ase.Atoms("O", positions=[[0.0, 0.0, 0.0]]), q, s) for q, s in ((0, 1), (0, 3), (-1, 2))]
    e = predict(model, _graphs(ions))["energy"].detach()
    # the embedding of (charge 0, multiplicity 1) vanishes: a neutral singlet atom is its E0;
    # the triplet and the anion differ from it and from each other
    assert float(e[0]) == -2041.3
    assert float((e[1:] - e[0]).abs().min()) > 1e-3 and abs(float(e[1] - e[2])) > 1e-3
    with pytest.raises(ValueError, match=r"structure 0 .*charge exceeds the total nuclear charge 8"):
        predict(model, _graphs([_charged(ase.Atoms("O", positions=[[0.0, 0.0, 0.0]]), 9, 1)]))
    spin_only = _charged(mol, 0, 1)
    spin_only.info["charge"] = float("nan")
    with pytest.raises(ValueError, match="give both"):
        predict(model, _graphs([spin_only]))


def test_medium_preset_matches_mace_mp_medium_architecture_and_documented_size():
    """MACE-MP medium: 128x0e+128x1o hidden irreps, spherical harmonics to l=3, 2 interactions,
    correlation 3, r_max 6 Å, 89 elements; 4,688,656 parameters counted with mace-torch 0.3.16
    (docs/equivariant.md), 2,916,352 of them in the element-dependent skips. Ours, built from the
    same YAML with 89 elements, has the element-dependent skip on its residual layer (89 x 128 x 128)
    and the count below; without it, 954,512."""
    import pathlib

    import yaml

    from mlip.models.equivariant import num_parameters
    from mlip.nn.irreps import irreps_string
    from mlip.nn.tensor_product import SpeciesLinear

    root = pathlib.Path(__file__).resolve().parents[1]
    section = dict(yaml.safe_load((root / "configs" / "equivariant-medium.yaml").read_text())["model"])
    section.pop("family")
    model = build_model("equivariant", {**section, "elements": list(range(1, 90))})
    cfg = model.config
    assert irreps_string(cfg.num_channels, cfg.hidden_lmax) == "128x0e+128x1o"
    assert (cfg.lmax, cfg.num_layers, cfg.correlation, cfg.r_max) == (3, 2, 3, 6.0)
    assert cfg.skip_per_element and model.layers[0].skip is None
    assert isinstance(model.layers[1].skip, SpeciesLinear)
    assert num_parameters(model.layers[1].skip) == 89 * 128 * 128
    docs = (root / "docs" / "equivariant.md").read_text()
    assert num_parameters(model) == 2_396_304 and "2,396,304" in docs  # stated in docs/equivariant.md
    plain = build_model("equivariant", {**section, "elements": list(range(1, 90)), "skip_per_element": False})
    assert num_parameters(plain) == 954_512 and "954,512" in docs


@pytest.mark.parametrize("name,bound", [("equivariant-small", 1e-3), ("equivariant-medium", 2e-3)])
def test_presets_exact_and_silu_option_within_documented_bound(name, bound):
    """The presets as shipped (quadratic grid) are exactly O(3)-equivariant in float64 (1e-10
    relative, rotations and a rotoreflection). With ``grid_activation: silu`` their l <= 1 node
    features mix on the coarse default 2 x 4 grid (degree 3 = 3 * hidden_lmax): the freshly
    initialised model's relative rotation error is below ``bound`` (docs/equivariant.md) but not at
    rounding level, inversion stays exact, and ``grid_degree: 12`` brings it below 1e-8."""
    import pathlib

    import yaml

    from mlip.models.outputs import predict

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    section = dict(yaml.safe_load(path.read_text())["model"])
    section.pop("family")
    assert section["grid_activation"] == "quadratic"
    batch = _graphs([molecule(), crystal()], r_max=section["r_max"])
    errors = {}
    for activation, degree in (("quadratic", None), ("silu", None), ("silu", 12)):
        cfg = {**section, "elements": [1, 6, 8], "avg_num_neighbors": 10.0, "grid_activation": activation,
               "grid_degree": degree}
        model = build_model("equivariant", cfg).double().eval()
        assert model.exactly_equivariant == (activation == "quadratic")
        ref = {k: v.detach() for k, v in predict(model, batch).items()}
        assert float(ref["forces"].abs().max()) > 1e-3
        err = 0.0
        for R in (random_rotation(0), -random_rotation(2)):
            out = predict(model, transform(batch, R))
            err = max(err, rel_err(out["energy"].detach(), ref["energy"]), rel_err(out["forces"].detach(), ref["forces"] @ R.T))
        inv = predict(model, transform(batch, -torch.eye(3, dtype=torch.float64)))
        assert rel_err(inv["forces"].detach(), -ref["forces"]) < 1e-12
        errors[(activation, degree)] = err
    assert errors[("quadratic", None)] < 1e-10
    assert 1e-8 < errors[("silu", None)] < bound
    assert errors[("silu", 12)] < 1e-8


def test_exactly_equivariant_follows_the_config():
    """``exactly_equivariant`` is true exactly when no layer mixes on a SiLU grid or on a grid too
    coarse for the quadratic MLP, and the training loop's check reads the instance, so a SiLU model
    gets its rotation error measured during validation and the default does not."""
    from mlip.models.equivariant import EquivariantConfig, EquivariantModel
    from mlip.train.equivariance import is_exact_by_construction

    assert EquivariantConfig().grid_activation == "quadratic" and EquivariantModel.exactly_equivariant
    cases = [({}, True), ({"grid_activation": "silu"}, False),
             ({"grid_activation": "silu", "mixing": "none"}, True),
             ({"grid_activation": "silu", "hidden_lmax": 0}, True),  # scalars only: no grid layer
             ({"grid_degree": 4}, False),  # lmax 2: quadratic needs degree >= 6
             ({"grid_degree": 12}, True), ({"skip_per_element": True}, True)]
    for overrides, exact in cases:
        model = _model(**overrides)
        assert model.exactly_equivariant is exact, overrides
        assert is_exact_by_construction(model) is exact, overrides
    with pytest.raises(ValueError, match="grid_activation must be one of"):
        _model(grid_activation="relu")


def test_quadratic_grid_below_its_exact_degree_is_measurably_not_exact():
    """The flag is not just bookkeeping: ``grid_degree: 4`` with ``lmax`` 2 aliases the quadratic MLP
    (rotation error well above rounding), the default degree 6 does not."""
    from mlip.models.outputs import predict

    batch = _graphs([molecule(), crystal()])
    for degree, exact in ((4, False), (None, True)):
        model = _model(grid_degree=degree)
        ref = predict(model, batch)["forces"].detach()
        R = random_rotation(5)
        err = rel_err(predict(model, transform(batch, R))["forces"].detach(), ref @ R.T)
        assert (err < 1e-10) is exact, (degree, err)


def test_species_skip_is_element_dependent_and_reduces_to_the_plain_skip():
    """With every element's skip matrix equal to the plain skip's, ``skip_per_element`` gives the same
    energies and forces as the plain skip; changing only O's matrix changes methanol (which has O)
    and leaves H2 + CH4 (which have none) unchanged."""
    from mlip.models.outputs import predict

    plain = _model(num_layers=3)
    species = _model(num_layers=3, skip_per_element=True)
    state = {k: v for k, v in plain.state_dict().items() if ".skip." not in k}
    species.load_state_dict({**species.state_dict(), **state})
    with torch.no_grad():
        for lp, ls in zip(plain.layers[1:], species.layers[1:]):
            assert ls.skip.weight.shape == (3, *lp.skip.weight.shape)
            ls.skip.weight.copy_(lp.skip.weight.expand_as(ls.skip.weight))
    no_oxygen = ase.Atoms("H2", positions=[[0, 0, 0], [0.75, 0, 0]]) + ase.Atoms("CH4", positions=[
        [2.0, 0, 0], [2.6, 0.6, 0.6], [1.4, -0.6, 0.6], [2.6, -0.6, -0.6], [1.4, 0.6, -0.6]])
    batch = _graphs([molecule(), crystal(), no_oxygen])
    ref = predict(plain, batch)
    out = predict(species, batch)
    assert rel_err(out["energy"].detach(), ref["energy"].detach()) < 1e-13
    assert rel_err(out["forces"].detach(), ref["forces"].detach()) < 1e-12
    with torch.no_grad():
        species.layers[1].skip.weight[2].mul_(1.5)  # element row 2 = O
    changed = predict(species, batch)["energy"].detach()
    assert float((changed[:2] - ref["energy"][:2].detach()).abs().min()) > 1e-6
    assert float(changed[2]) == float(out["energy"][2].detach())


# --------------------------------------------------------------------------------------------
# edge chunking (``edge_chunk_size``): bounded memory on the torch backend, same numbers
# --------------------------------------------------------------------------------------------
def _chunk_pair(chunk, **kw):
    """An unchunked model and a chunked one with the same weights."""
    ref = _model(kernel="torch", **kw)
    chunked = _model(kernel="torch", edge_chunk_size=chunk, **kw)
    chunked.load_state_dict(ref.state_dict())
    return ref, chunked


def _chunk_batch():
    return _graphs([crystal().repeat((2, 2, 1)), molecule()])


@pytest.mark.parametrize("radial", ["spline", "mlp"])
def test_edge_chunking_gives_the_unchunked_energy_forces_and_stress(radial):
    """Chunks of 1 edge, of sizes that split a receiver's edges across chunks, and one chunk larger
    than the whole edge list: energy, forces and stress equal the unchunked model's to 1e-12."""
    from mlip.models.outputs import predict

    batch = _chunk_batch()
    n_edges = batch.edge_index.shape[1]
    assert n_edges > 40
    for chunk in (1, 7, 16, n_edges - 1, 10 * n_edges):
        ref, chunked = _chunk_pair(chunk, radial=radial)
        want = predict(ref, batch, stress=True)
        got = predict(chunked, batch, stress=True)
        assert float(want["forces"].abs().max()) > 1e-3 and float(want["stress"][0].abs().max()) > 1e-5
        assert torch.isnan(got["stress"][1]).all()  # the molecule has no volume: NaN stress, as unchunked
        for key in ("energy", "forces", "stress"):
            w, g = want[key].detach(), got[key].detach()
            if key == "stress":
                w, g = w[0], g[0]
            assert rel_err(g, w) < 1e-12, (chunk, key)


def test_edge_chunking_force_loss_parameter_gradient_equals_unchunked():
    """Training on forces and stress differentiates through the forces (double backward): the
    parameter gradient of an energy + force + stress loss is the unchunked one, to 1e-11."""
    from mlip.models.outputs import predict

    batch = _graphs([crystal().repeat((2, 2, 1)), crystal()])  # periodic only: finite stress everywhere

    def grads(model):
        out = predict(model, batch, stress=True, create_graph=True)
        loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum() + 10.0 * (out["stress"] ** 2).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, params, allow_unused=True)

    for chunk in (1, 13):
        ref, chunked = _chunk_pair(chunk)
        want, got = grads(ref), grads(chunked)
        radial = [g for g in want if g is not None]
        assert len(radial) == len([g for g in got if g is not None]) and radial
        flat_w = torch.cat([g.flatten() for g in want if g is not None])
        flat_g = torch.cat([g.flatten() for g in got if g is not None])
        assert float(flat_w.abs().max()) > 1e-6
        assert rel_err(flat_g, flat_w) < 1e-11, chunk
        # the radial spline table of every layer gets a gradient only through the convolution
        for layer_ref, layer_ch in zip(ref.layers, chunked.layers):
            assert layer_ref.radial.weight.shape == layer_ch.radial.weight.shape


def test_edge_chunking_keeps_per_edge_tensors_out_of_the_autograd_graph():
    """What autograd saves for the backward of energy -> forces (the bytes of the distinct storages of
    the saved tensors): without chunking it holds per-edge tensors that grow with edges x channels
    (the radial weights of every layer; the convolution itself keeps no per-edge messages, see
    mlip.kernels.edge_conv); with chunks of 32 edges no per-edge tensor is saved at all and the total
    is smaller. The chunked forces are still the unchunked ones."""
    from mlip.models.outputs import predict

    batch = _graphs([crystal().repeat((3, 3, 2))])
    n_edges = batch.edge_index.shape[1]

    def saved_bytes(model):
        storages = {}  # saved tensors that share memory (views, the same node features) count once
        per_edge = [0]  # saved [n_edges, a, b] tensors: per-edge features, couplings, messages

        def pack(t):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            per_edge[0] += t.dim() == 3 and t.shape[0] == n_edges
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = predict(model, batch)
        return sum(storages.values()), per_edge[0], out["forces"].detach()

    ref, chunked = _chunk_pair(32, num_channels=16)
    full, full_edge, f_ref = saved_bytes(ref)
    small, small_edge, f_ch = saved_bytes(chunked)
    assert full_edge > 0 and small_edge == 0
    # unchunked: at least per-edge radial weights [E, P, C] of the layers (C=16, float64)
    assert full > n_edges * 16 * 9 * 8
    assert small < full, (small, full)
    assert rel_err(f_ch, f_ref) < 1e-12


def test_edge_chunk_size_is_validated_off_by_default_and_settable_on_a_built_model():
    from mlip.models.outputs import predict

    model = _model()
    assert model.config.edge_chunk_size is None and all(layer.edge_chunk_size is None for layer in model.layers)
    for bad in (0, -5, True):
        with pytest.raises(ValueError, match="edge_chunk_size"):
            _model(edge_chunk_size=bad)
        with pytest.raises(ValueError, match="edge_chunk_size"):
            model.set_edge_chunk_size(bad)
    assert model.config.edge_chunk_size is None
    batch = _chunk_batch()
    want = predict(model, batch)["forces"].detach()
    model.set_edge_chunk_size(9)  # e.g. a loaded model about to run a large cell
    assert model.config.edge_chunk_size == 9 and all(layer.edge_chunk_size == 9 for layer in model.layers)
    assert rel_err(predict(model, batch)["forces"].detach(), want) < 1e-12
    model.set_edge_chunk_size(None)
    assert all(layer.edge_chunk_size is None for layer in model.layers)
