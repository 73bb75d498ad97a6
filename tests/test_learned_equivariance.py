"""The ``learned-equivariance`` (TransIP-style) family: conformance where it applies (translation and
permutation exact, finite-difference forces and stress, smooth cutoff, batched == single, save/load,
isolated atoms), the augmentation mechanics, the fused-attention path, the direct force head, and a
short training run showing that the embedding-alignment loss really lowers the rotation error."""
from __future__ import annotations

import pathlib

import ase
import numpy as np
import pytest
import torch
import yaml

from mlip.data.graph import collate
from mlip.data.transforms import atoms_to_graph
from mlip.models.base import build_model
from mlip.models.learned_equivariance import random_rotations, rotate_rows
from mlip.models.outputs import predict
from mlip.testing import ModelConformance, crystal, molecule, random_rotation, rel_err, transform
from mlip.train.equivariance import equivariance_error

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(num_channels=16, num_heads=2, num_layers=2, num_radial=6, readout_hidden=8, transform_hidden=8)


class TestLearnedEquivariance(ModelConformance):
    """The mixin's checks; rotation/reflection are replaced: symmetry is learned, not built in."""

    exact = False

    def make_model(self, **overrides):
        return build_model("learned-equivariance", {**SMALL, **overrides})

    def test_rotation(self, dtype, device):
        """Untrained, the model is measurably *not* rotation-invariant (nothing is built in), and the
        shared metric of mlip.train.equivariance sees it; translation stays exact (test_translation)."""
        model = self.model(dtype, device)
        batch = self.batch([molecule(), crystal()], dtype, device)
        err = equivariance_error(model, batch, n_rotations=2, seed=0)
        assert err["forces_rel"] > 1e-3 and err["energy_max"] > 1e-6
        ref = self.run(model, batch)
        out = self.run(model, transform(batch, torch.eye(3, dtype=dtype)))
        assert rel_err(out["forces"], ref["forces"]) < self.same_tol[dtype]

    def test_reflection(self, dtype, device):
        """Inversion is a symmetry of the data, not of the network: the error is nonzero, finite."""
        model = self.model(dtype, device)
        batch = self.batch([molecule()], dtype, device)
        ref = self.run(model, batch)
        out = self.run(model, transform(batch, -torch.eye(3, dtype=dtype)))
        d = rel_err(out["energy"], ref["energy"])
        assert 0 < d < 1.0 and torch.isfinite(out["forces"]).all()


def _model(**kw) -> torch.nn.Module:
    return build_model("learned-equivariance", {**SMALL, "elements": [1, 6, 8], "r_max": 3.5, **kw}).double()


def _batch(atoms_list, r_max: float = 3.5, dtype=torch.float64):
    return collate([atoms_to_graph(a, r_max) for a in atoms_list]).to(dtype=dtype)


def test_augmentation_is_evaluation_on_the_rotated_structure():
    """In training mode ("augment"/"learned") the model sees each structure under a random rotation
    R1: energy = E_eval(R1 x), forces = R1^T F_eval(R1 x) (labels stay in the lab frame)."""
    batch = _batch([molecule(), crystal()])
    for mode in ("augment", "learned"):
        model = _model(symmetry_mode=mode)
        torch.manual_seed(5)
        R1 = random_rotations(batch.n_graphs, torch.float64, "cpu")
        model.train()
        torch.manual_seed(5)
        train = predict(model, batch, forces=True, stress=True)
        model.eval()
        parts = [predict(model, transform(_batch([a]), R1[g]), forces=True, stress=True)
                 for g, a in enumerate([molecule(), crystal()])]
        e_eval = torch.cat([p["energy"] for p in parts]).detach()
        f_eval = torch.cat([rotate_rows(p["forces"], R1[g].T.expand(p["forces"].shape[0], 3, 3))
                            for g, p in enumerate(parts)]).detach()
        assert rel_err(train["energy"].detach(), e_eval) < 1e-12
        assert rel_err(train["forces"].detach(), f_eval) < 1e-10
        s_eval = R1[1].T @ parts[1]["stress"][0].detach() @ R1[1]
        assert rel_err(train["stress"][1].detach(), s_eval) < 1e-10
        assert ("aux_loss" in train) == (mode == "learned")
    none = _model(symmetry_mode="none").train()
    e_train = predict(none, batch, forces=False)["energy"].detach()
    assert torch.equal(e_train, predict(none.eval(), batch, forces=False)["energy"].detach())


def test_alignment_loss_vanishes_for_the_identity_rotation_and_has_gradients():
    model = _model(symmetry_mode="learned", alignment_stop_grad=False)
    batch = _batch([molecule(), crystal()])
    vec = batch.edge_vectors()
    element = model.embedding.index(batch.numbers)
    h0 = model.initial_features(batch, element, torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    # T(h, I) = h + mask * W2[(W1 h) * g(I)] with freshly initialised weights: not zero; zero W2 makes it exact
    for T in model.transforms:
        torch.nn.init.zeros_(T.w_out.weight)
    assert float(model.alignment_loss(batch, vec, h0, rotation=eye).detach()) < 1e-24
    rot = torch.stack([random_rotation(1), random_rotation(2)])
    loss = model.alignment_loss(batch, vec, h0, rotation=rot)
    assert float(loss.detach()) > 1e-6
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(T.w_out.weight.grad.abs().sum() > 0 for T in model.transforms)
    # the first invariant_channels channels are passed through unchanged by T
    T = model.transforms[0]
    torch.nn.init.normal_(T.w_out.weight)
    h = torch.randn(5, 16, dtype=torch.float64)
    out = T(h, rot[:1].expand(5, 3, 3))
    assert torch.equal(out[:, : model.n_inv], h[:, : model.n_inv]) and not torch.allclose(out, h)


def test_dense_sdpa_attention_equals_edge_attention(monkeypatch):
    """attention='dense' runs one fused scaled_dot_product_attention call per block over the whole
    padded batch (counted), and gives the edge-wise result, including the small periodic cell whose
    repeated (sender, receiver) pairs are combined in the mask; training gradients agree too."""
    big = ase.Atoms("CCOHHH", positions=np.random.default_rng(4).uniform(0, 2.5, size=(6, 3)))
    structures = [molecule(), big, crystal()]
    batch = _batch(structures)
    pairs = batch.edge_index[0] * batch.n_atoms + batch.edge_index[1]
    assert torch.unique(pairs).numel() < pairs.numel()  # the crystal has periodic images of one pair
    edge = _model(edge_values=False, edge_gates=False).eval()
    dense = _model(edge_values=False, edge_gates=False, attention="dense").eval()
    dense.load_state_dict(edge.state_dict())
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        calls.append(q.shape)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    a = predict(edge, batch, stress=True)
    assert not calls  # the edge path does not use SDPA
    b = predict(dense, batch, stress=True)
    assert len(calls) == len(dense.blocks) and calls[0] == (3, 2, 6, 8)  # [n_graphs, heads, n_max, head dim]
    assert rel_err(b["energy"].detach(), a["energy"].detach()) < 1e-12
    assert rel_err(b["forces"].detach(), a["forces"].detach()) < 1e-10
    assert rel_err(b["stress"][2].detach(), a["stress"][2].detach()) < 1e-10  # the periodic cell
    # training on forces differentiates twice through the fused attention: same weight gradients
    grads = []
    for model in (edge, dense):
        model.zero_grad()
        out = predict(model, batch, forces=True, create_graph=True)
        out["forces"].square().sum().backward()
        grads.append(torch.cat([model.blocks[0].attn.qkv.weight.grad.flatten(),
                                model.blocks[0].attn.edge_bias.weight.grad.flatten(), model.blocks[0].attn.sink.grad]))
    assert rel_err(grads[1], grads[0]) < 1e-10
    with pytest.raises(ValueError, match="edge_values"):
        _model(attention="dense")


def test_direct_force_head_rotates_back_in_training_mode():
    model = _model(direct_forces=True, symmetry_mode="augment")
    assert model.direct_forces
    batch = _batch([molecule()])
    model.eval()
    f_eval = model(batch, batch.edge_vectors())["forces"].detach()
    assert f_eval.shape == (batch.n_atoms, 3)
    torch.manual_seed(3)
    R1 = random_rotations(1, torch.float64, "cpu")[0]
    model.train()
    torch.manual_seed(3)
    f_train = model(batch, batch.edge_vectors())["forces"].detach()
    model.eval()
    rb = transform(batch, R1)
    f_rot = model(rb, rb.edge_vectors())["forces"].detach()
    assert rel_err(f_train, f_rot @ R1) < 1e-10
    # isolated atom: no force from the head (its features equal the isolated-atom reference to rounding)
    iso = _batch([ase.Atoms("C", positions=[[0.0, 0.0, 0.0]])])
    assert model(iso, iso.edge_vectors())["forces"].abs().max() < 1e-14


def test_charge_and_spin_are_used_and_required():
    model = _model(use_charge_spin=True).eval()
    neutral = molecule()
    neutral.info.update(charge=0, spin=1)
    cation = molecule()
    cation.info.update(charge=1, spin=2)
    e = predict(model, _batch([neutral, cation]), forces=False)["energy"].detach()
    assert abs(float(e[0] - e[1])) > 1e-6
    with pytest.raises(ValueError, match="charge"):
        predict(model, _batch([molecule()]), forces=False)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="symmetry_mode"):
        _model(symmetry_mode="frames")
    with pytest.raises(ValueError, match="divisible"):
        _model(num_heads=3)
    with pytest.raises(KeyError, match="equivariance_loss_weight"):
        _model(equivariance_loss_weigth=1.0)


@pytest.mark.parametrize("name", ["learned-equivariance-small", "learned-equivariance-medium"])
def test_config_presets_build_and_run(name):
    section = dict(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"])
    assert section.pop("family") == "learned-equivariance"
    model = build_model("learned-equivariance", {**section, "elements": [1, 6, 8]}).double().eval()
    assert sum(p.numel() for p in model.parameters()) > 5e4
    out = predict(model, _batch([ase.Atoms("CO", positions=[[0, 0, 0], [1.2, 0, 0]])], r_max=section["r_max"]))
    assert torch.isfinite(out["forces"]).all()


def test_evaluate_command_reports_the_measured_equivariance_error(tmp_path):
    """``mlip evaluate`` on a saved learned-equivariance model prints and writes the rotation error,
    and the number is the one mlip.train.equivariance measures on the same structures."""
    import json

    import ase.io
    from click.testing import CliRunner
    from mlip.cli.main import main

    from mlip.models.base import save_model

    frames = []
    for seed, atoms in enumerate([molecule(), molecule(), crystal()]):
        atoms = atoms.copy()
        atoms.positions += np.random.default_rng(seed).normal(scale=0.02, size=atoms.positions.shape)
        atoms.info["energy"] = -1.0
        atoms.arrays["forces"] = np.zeros((len(atoms), 3))
        frames.append(atoms)
    path = tmp_path / "data.xyz"
    ase.io.write(path, frames, format="extxyz")
    model = _model().eval()
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "model.pt"), str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert "rotation equivariance" in result.output
    assert got["equivariance_forces_max"] > 1e-4 and got["equivariance_energy_max"] > 0


# ----------------------------------------------------------------------------- training loop, calculator
def _train_run(tmp_path, name: str, data, **model):
    """One epoch of mlip.train on ``data`` (also the validation set), float64, no EMA."""
    import json

    from mlip.train.config import config_from_mapping
    from mlip.train.loop import train

    cfg = config_from_mapping({
        "output_dir": str(tmp_path / name), "dtype": "float64", "device": "cpu", "num_threads": 1, "seed": 0,
        "model": {"family": "learned-equivariance", **SMALL, "r_max": 3.5, **model},
        "data": {"train": str(data), "valid": str(data)}, "batch": {"max_atoms": 24},
        "optim": {"lr": 1e-3, "ema_decay": None}, "train": {"epochs": 1, "progress": False},
    })
    path = train(cfg)
    steps = [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return path, steps, rows[-1]


def test_training_loop_adds_the_alignment_loss_and_validates_in_eval_mode(tmp_path, one_torch_thread):
    """mlip.train adds the model's weighted alignment loss to the energy/force loss (same first
    batch, same rotation R1: the logged loss grows with the weight), and validation runs the model
    in eval mode (no random rotation): the logged validation loss is that of the exported model.
    (``num_threads: 1`` sets torch's thread count for the process; ``one_torch_thread`` restores it.)"""
    import ase.io

    from mlip.models.base import load_model
    from mlip.train.loss import LossWeights, combine, loss_sums

    _, mols = _xtb_molecules()
    data = tmp_path / "mols.xyz"
    ase.io.write(data, mols[:6], format="extxyz")
    _, steps_0, _ = _train_run(tmp_path, "w0", data, symmetry_mode="learned", equivariance_loss_weight=0.0)
    path, steps_w, row = _train_run(tmp_path, "w1000", data, symmetry_mode="learned", equivariance_loss_weight=1000.0)
    aux = steps_w[0]["loss"] - steps_0[0]["loss"]
    assert 1e-3 < aux / 1000.0 < 10.0  # the unweighted, normalised alignment loss of an untrained model
    model = load_model(path).double()
    assert not model.training
    graphs = [atoms_to_graph(a, 3.5) for a in mols[:6]]
    batch = collate(graphs).to(dtype=torch.float64)
    pred = {k: v.detach() for k, v in predict(model, batch, forces=True).items()}
    loss, _ = combine(*loss_sums(pred, batch), LossWeights(1.0, 10.0, 100.0))
    assert abs(float(loss) - row["valid_loss"]) < 1e-9 * abs(row["valid_loss"])
    assert "valid_equivariance_forces_rel" in row and row["valid_equivariance_forces_rel"] > 0


def test_runs_in_the_calculator_with_finite_difference_forces():
    from ase.calculators.fd import calculate_numerical_forces

    from mlip.calculator import MLIPCalculator

    atoms = crystal()
    atoms.calc = MLIPCalculator(_model().eval(), device="cpu", dtype="float64", skin=0.0)
    f = atoms.get_forces()
    assert np.isfinite(atoms.get_stress()).all()
    np.testing.assert_allclose(calculate_numerical_forces(atoms, eps=1e-4), f, atol=1e-7)


# ----------------------------------------------------------------------------- the learned effect
def _xtb_molecules():
    from mlip.data.formats.extxyz import iter_extxyz
    from mlip.data.formats.labels import is_isolated_atom
    from mlip.data.stats import e0s_from_isolated_atoms

    frames = list(iter_extxyz(ROOT / "data" / "xtb_molecules.xyz"))
    return e0s_from_isolated_atoms(frames), [a for a in frames if not is_isolated_atom(a)]


def relative_rotation_error(model, batch, n_rotations: int = 8, seed: int = 1) -> tuple[float, float]:
    """(energy, forces) rotation error, each relative to the size of what the model predicts, so
    an untrained model (whose interaction energies and forces are tiny) and a trained one compare
    fairly: RMS over structures and rotations of ``(E(Rx) - E(x)) / n_atoms`` over the RMS
    interaction energy per atom (``E - Σ E0``), and RMS of ``F(Rx) - R F(x)`` over the RMS force.
    RMS rather than max: one molecule and one rotation do not decide."""
    from mlip.nn.readout import bond_count
    from mlip.train.equivariance import random_rotation as uniform_rotation
    from mlip.train.equivariance import rotate_batch

    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ref = predict(model, batch, forces=True)
    e0, f0 = ref["energy"].detach(), ref["forces"].detach()
    n = (batch.ptr[1:] - batch.ptr[:-1]).to(e0.dtype)
    element = model.embedding.index(batch.numbers)
    zero = torch.zeros(batch.n_atoms, dtype=e0.dtype)
    # E0s plus the coordination-weighted shift: what the model predicts with a zero interaction energy
    r = batch.edge_vectors().norm(dim=-1)
    coordination = bond_count(r, model.envelope(r), batch.numbers[batch.edge_index[0]], batch.numbers[batch.edge_index[1]],
                              batch.edge_index[1], batch.n_atoms)
    e_ref = zero.new_zeros(batch.n_graphs).index_add_(
        0, batch.batch, model.atomic_energies(zero, element, torch.zeros_like(element), coordination.detach()))
    de, df = [], []
    for _ in range(n_rotations):
        R = uniform_rotation(gen).to(e0.dtype)
        out = predict(model, rotate_batch(batch, R), forces=True)
        de.append(((out["energy"].detach() - e0) / n).square().mean())
        df.append((out["forces"].detach() - f0 @ R.T).square().mean())
    e_rel = torch.stack(de).mean().sqrt() / ((e0 - e_ref) / n).square().mean().sqrt()
    f_rel = torch.stack(df).mean().sqrt() / f0.square().mean().sqrt()
    return float(e_rel), float(f_rel)


def _effect_config(mode: str, weight: float, e0s, seed: int, num_radial: int, edge_gates: bool = False) -> dict:
    # the architecture of the measurements in EFFECT_MEASURED: without the (later) edge gates
    return dict(SMALL, elements=sorted(e0s), e0s=e0s, r_max=4.0, num_radial=num_radial, transform_hidden=16,
                readout_hidden=16, use_charge_spin=True, symmetry_mode=mode, equivariance_loss_weight=weight, seed=seed,
                edge_gates=edge_gates)


def train_briefly(mode: str, weight: float, e0s, train, seed: int = 0, num_radial: int = 8, steps: int = 60,
                  lr: float = 1e-2):
    """Adam on energy-per-atom + force MSE (+ the model's ``aux_loss``) over random batches of 4 molecules."""
    torch.manual_seed(seed)
    model = build_model("learned-equivariance", _effect_config(mode, weight, e0s, seed, num_radial)).float()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(train), generator=order)[:4].tolist()
        b = collate([train[i] for i in idx]).to(dtype=torch.float32)
        out = predict(model, b, forces=True, create_graph=True)
        n = (b.ptr[1:] - b.ptr[:-1]).to(torch.float32)
        loss = ((out["energy"] - b.energy) / n).square().mean() + (out["forces"] - b.forces).square().mean()
        if "aux_loss" in out:
            loss = loss + out["aux_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


#: relative rotation errors (energy, forces) measured with the protocol of the test below
#: (CPU, float32, OMP_NUM_THREADS=1), which the test reproduces to EFFECT_RTOL, and
#: whose ratios learned/untrained and learned/augment it asserts to be < 0.7 (and at most 0.51)
EFFECT_MEASURED = {
    (0, 8): {"untrained": (0.0063, 0.0271), "augment": (0.0135, 0.0448), "learned": (0.0013, 0.0031)},
    (1, 6): {"untrained": (0.0030, 0.0603), "augment": (0.0273, 0.2573), "learned": (0.0012, 0.0306)},
}
#: the numbers above carry two or three significant digits (0.0012 stands for 0.00117: 3% off);
#: one and two torch threads reproduce them to 1e-5 relative
EFFECT_RTOL = 0.05


@pytest.mark.parametrize("seed,num_radial", sorted(EFFECT_MEASURED))
def test_alignment_loss_lowers_rotation_error_vs_untrained_and_augmentation(seed, num_radial, one_torch_thread):
    """Same data, seed, steps and optimiser: the learned-equivariance model ends with a lower relative
    rotation error of energy and forces than the untrained model and than the augmentation baseline
    (all four comparisons by a factor 0.7 or better).

    Two variants: the family defaults' ``num_radial: 8`` with seed 0, and ``num_radial: 6`` with
    seed 1, which failed the energy comparison with the untrained model under the previous protocol
    (max-error metric, alignment normalised by ``|h|^2``, weight 1e3, lr 3e-3). Measured ratios of
    learned / untrained and learned / augment over 8 (seed, num_radial) variants with this protocol:
    at most 0.51 (docs/learned_equivariance.md). The six errors are the ones stated in
    ``EFFECT_MEASURED`` (to ``EFFECT_RTOL``); one torch thread as measured (``one_torch_thread``
    restores the count after the module)."""
    e0s, mols = _xtb_molecules()
    train = [atoms_to_graph(a, 4.0) for a in mols[:32]]
    test = collate([atoms_to_graph(a, 4.0) for a in mols[100:124]]).to(dtype=torch.float32)
    untrained = build_model("learned-equivariance", _effect_config("learned", 1e4, e0s, seed, num_radial)).float()
    e_u, f_u = relative_rotation_error(untrained, test)
    e_a, f_a = relative_rotation_error(train_briefly("augment", 0.0, e0s, train, seed, num_radial), test)
    e_l, f_l = relative_rotation_error(train_briefly("learned", 1e4, e0s, train, seed, num_radial), test)
    print(f"relative rotation error (energy, forces): untrained {e_u:.4f} {f_u:.4f}; "
          f"augment {e_a:.4f} {f_a:.4f}; learned {e_l:.4f} {f_l:.4f}")
    measured = {"untrained": (e_u, f_u), "augment": (e_a, f_a), "learned": (e_l, f_l)}
    for name, stated in EFFECT_MEASURED[(seed, num_radial)].items():
        assert measured[name] == pytest.approx(stated, rel=EFFECT_RTOL), name
    assert e_l < 0.7 * e_u and f_l < 0.7 * f_u
    assert e_l < 0.7 * e_a and f_l < 0.7 * f_a
    ratios = [e_l / e_u, f_l / f_u, e_l / e_a, f_l / f_a]
    assert round(max(ratios), 2) <= 0.51, ratios  # the largest ratio of docs/learned_equivariance.md


def test_edge_gates_modulate_keys_and_values_and_old_files_load_without_them(tmp_path):
    """``edge_gates`` adds the edge-conditioned gates g_k, g_v (their output changes the energy); a
    model file written before the option (no key, no gate weights) loads with the gates off and
    predicts exactly what it did."""
    from mlip.models.base import load_model, save_model

    batch = _batch([molecule(), crystal()])
    gated = _model().eval()
    assert gated.config.edge_gates and gated.blocks[0].attn.key_gate is not None
    e0 = predict(gated, batch)["energy"]
    for block in gated.blocks:  # a neighbour-independent gate of ones: the ungated attention
        for gate in (block.attn.key_gate, block.attn.value_gate):
            torch.nn.init.zeros_(gate.weight)
            torch.nn.init.ones_(gate.bias)
    plain = _model(edge_gates=False).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "_gate." not in k})
    torch.testing.assert_close(predict(gated, batch)["energy"], predict(plain, batch)["energy"], rtol=1e-12, atol=1e-12)
    assert rel_err(e0, predict(plain, batch)["energy"]) > 1e-6

    save_model(plain, tmp_path / "plain.pt")
    payload = torch.load(tmp_path / "plain.pt", weights_only=True)
    del payload["config"]["edge_gates"]  # as written before the option existed
    torch.save(payload, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt").to(torch.float64)
    assert not old.config.edge_gates
    torch.testing.assert_close(predict(old, batch)["energy"], predict(plain, batch)["energy"], rtol=0, atol=0)
