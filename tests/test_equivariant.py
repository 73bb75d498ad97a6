"""The ``equivariant`` family: conformance (exact and grid-mixing configs) and family-specific checks."""
from __future__ import annotations

import ase
import pytest
import torch
from conformance import ModelConformance, crystal, molecule, random_rotation, rel_err, transform

from mlip.models.base import build_model

SMALL = dict(num_channels=8, lmax=2, num_layers=2, correlation=3, spline_knots=10, readout_hidden=8,
             avg_num_neighbors=8.0)


class TestExactNoMixing(ModelConformance):
    """Spline radials, correlation 3, no grid mixing: exactly O(3)-equivariant."""

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, "mixing": "none", **overrides})


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
    """Default grid mixing (SiLU MLP): exactly parity-equivariant, rotation error bounded (docs/equivariant.md)."""

    exact = False
    approx_equivariance_tol = {torch.float32: 1e-3, torch.float64: 1e-3}

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, **overrides})


def _model(**kw):
    return build_model("equivariant", {**SMALL, "elements": [1, 6, 8], "r_max": 3.5, **kw}).double().eval()


def _graphs(atoms_list, r_max=3.5):
    from conformance import atoms_to_graph

    from mlip.data.graph import collate

    return collate([atoms_to_graph(a, r_max) for a in atoms_list]).to(dtype=torch.float64)


def _charged(atoms, charge, spin):
    atoms = atoms.copy()
    atoms.info["charge"], atoms.info["spin"] = charge, spin
    return atoms


def test_silu_grid_is_exactly_parity_equivariant():
    from mlip.models.outputs import predict

    model = _model()
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
        assert model.backend(torch.device("cpu")) is reference
        out = predict(model, batch, stress=True)
        assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    assert _model(kernel="auto").backend(torch.device("cpu")) is reference


def test_model_routes_the_convolution_through_the_backend(monkeypatch):
    """A backend module with the reference's ``conv_tp`` signature is what the model calls."""
    import types

    from mlip.kernels import reference
    from mlip.models.outputs import predict

    calls = []

    def conv_tp(*args):
        calls.append(args[6:])
        return reference.conv_tp(*args)

    import mlip.models.equivariant as family

    model = _model()
    monkeypatch.setattr(family, "get_backend", lambda name, device: types.SimpleNamespace(conv_tp=conv_tp))
    predict(model, _graphs([molecule()]))
    assert calls == [(0, 2, 2), (2, 2, 2)]


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
