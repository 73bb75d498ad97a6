"""Total charge and spin per head: a model with an OMol25-style head (molecules with charge and spin)
and an MPTrj-style head (crystals without) reads them on the first head only, in every family; the
old setting (``use_charge_spin: true``, every head) behaves as before; ``mlip train`` fills the
setting from the data (fine-tuning included); the calculator, batched relaxation, ``mlip predict``,
TorchSim, a compiled model's checks and committees follow the model. The trained mixed run is in
test_mixed_heads.py, the exported graph in test_export.py."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ase.build import molecule
from ase.io import write
from toy_models import calc64, rattled_cu

from mlip.data.formats import read
from mlip.data.graph import collate
from mlip.data.transforms import atoms_to_graph
from mlip.models.base import build_model, load_model, save_model
from mlip.models.outputs import predict
from mlip.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["equivariant", "frame-averaged", "learned-equivariance"]
HEADS = ["mptrj", "omol"]
SMALL = {"elements": [1, 8, 29], "r_max": 4.0, "num_channels": 8, "num_layers": 1, "heads": HEADS}


def _model(family: str, **kw: object):
    return build_model(family, {**SMALL, **kw}).to(torch.float64).eval()


def _water(charge: float | None = 0.0, spin: float | None = 1.0):
    """H2O on head ``omol``, with a total charge and multiplicity unless ``None``."""
    atoms = molecule("H2O")
    atoms.info["head"] = "omol"
    if charge is not None:
        atoms.info.update(charge=charge, spin=spin)
    return atoms


def _crystal(**info: object):
    """A rattled 4-atom Cu cell on head ``mptrj``, without charge and spin unless given."""
    atoms = rattled_cu(repeat=(1, 1, 1))
    atoms.info.update(head="mptrj", **info)
    return atoms


def _predict(model, *frames) -> dict[str, torch.Tensor]:
    graphs = [atoms_to_graph(a, r_max=model.r_max) for a in frames]
    out = predict(model, collate(graphs).to(dtype=torch.float64), forces=True)
    return {key: value.detach() for key, value in out.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_charge_spin_head_reads_charge_and_spin(family):
    model = _model(family, use_charge_spin=True, charge_spin_heads=["omol"])
    base = _predict(model, _water(), _crystal())  # the crystal's charge and spin are NaN
    # the molecule's energy depends on its charge and spin: the embedding is used
    cation = _predict(model, _water(1.0, 2.0), _crystal())
    assert abs(float(cation["energy"][0] - base["energy"][0])) > 1e-6
    # the crystal's head does not read them: any values (here an impossible pair) change nothing,
    # to the last bit, and the molecule beside it is unaffected too
    given = _predict(model, _water(), _crystal(charge=0.5, spin=7.0))
    for key in ("energy", "forces"):
        assert torch.equal(given[key], base[key])
    alone = _predict(model, _crystal())
    torch.testing.assert_close(alone["energy"], base["energy"][1:], rtol=0, atol=1e-10)
    torch.testing.assert_close(alone["forces"], base["forces"][3:], rtol=0, atol=1e-10)
    # a structure of the charge/spin head without them is refused, naming its head
    with pytest.raises(ValueError, match=r"structure 0 in the batch \(charge=nan.*head 'omol'"):
        _predict(model, _water(None), _crystal())
    # training on the mixed batch: the NaN of the crystal leaks into no gradient, the embedding learns
    model.train()
    graphs = [atoms_to_graph(a, r_max=model.r_max) for a in (_water(1.0, 2.0), _crystal())]
    out = predict(model, collate(graphs).to(dtype=torch.float64), forces=True, create_graph=True)
    (out["energy"].square().sum() + out["forces"].square().sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["charge_spin.w1"].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_use_charge_spin_true_alone_reads_every_head_as_before(family, tmp_path):
    """``use_charge_spin: true`` without ``charge_spin_heads`` (every model saved before the field
    existed): every head reads charge and spin and refuses structures without them; such a file
    loads and predicts exactly as saved."""
    model = _model(family, use_charge_spin=True)
    assert model.config.charge_spin_heads is None
    neutral = _predict(model, _water(), _crystal(charge=0, spin=1))
    charged = _predict(model, _water(), _crystal(charge=1, spin=2))
    assert abs(float(charged["energy"][1] - neutral["energy"][1])) > 1e-6
    with pytest.raises(ValueError, match=r"structure 1 in the batch \(charge=nan.*: this model was trained"):
        _predict(model, _water(), _crystal())
    save_model(model, tmp_path / "new.pt")
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    del payload["config"]["charge_spin_heads"]  # a file written before per-head charge and spin
    torch.save(payload, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt").to(torch.float64)
    assert old.config.use_charge_spin and old.config.charge_spin_heads is None
    assert torch.equal(_predict(old, _water(), _crystal(charge=1, spin=2))["energy"], charged["energy"])


def test_charge_spin_heads_must_fit_the_model():
    bad_settings = (({"use_charge_spin": True, "charge_spin_heads": ["pbe"]}, "must name some"),
                    ({"use_charge_spin": True, "charge_spin_heads": []}, "must name some"),
                    ({"use_charge_spin": False, "charge_spin_heads": ["omol"]}, "use_charge_spin is false"))
    for bad, match in bad_settings:
        for family in FAMILIES:
            with pytest.raises(ValueError, match=match):
                _model(family, **bad)
    # off with an empty list is simply off
    assert _model("equivariant", use_charge_spin=False, charge_spin_heads=[]).charge_spin is None


def test_every_inference_path_follows_the_heads():
    """The calculator, batched relaxation, `mlip predict`, TorchSim, a compiled model's eager checks
    and committees read charge and spin exactly for the structures whose head does."""
    from mlip.cli.predict import predict_frames

    from mlip.calculator import MLIPTorchSimModel
    from mlip.calculator.committee import Committee
    from mlip.calculator.inference import uses_charge_spin
    from mlip.md.relaxation import relax_batch

    model = _model("equivariant", use_charge_spin=True, charge_spin_heads=["omol"])
    energies = []
    for atoms in (_water(1.0, 2.0), _crystal()):
        atoms.calc = calc64(model)
        energies.append(atoms.get_potential_energy())
    crystal = _crystal(charge=1, spin=2)
    crystal.calc = calc64(model)
    assert crystal.get_potential_energy() == energies[1]
    missing = _water(None)
    missing.calc = calc64(model)
    with pytest.raises(ValueError, match=r"for head\(s\) \['omol'\]: set atoms.info\['charge'\]"):
        missing.get_potential_energy()
    # one batch of both heads, with and without charge and spin
    relaxed = relax_batch([_water(1.0, 2.0), _crystal()], model, device="cpu", dtype="float64", max_steps=0)
    assert [r.energy for r in relaxed] == pytest.approx(energies, abs=1e-10)
    with pytest.raises(ValueError, match=r"for head\(s\) \['omol'\].*missing for structure\(s\) \[0\]"):
        relax_batch([_water(None), _crystal()], model, device="cpu", dtype="float64", max_steps=0)
    predicted = predict_frames(model, [_water(1.0, 2.0), _crystal()], torch.float64, "cpu")
    assert [p["energy"] for p in predicted] == pytest.approx(energies, abs=1e-10)
    # TorchSim states carry no charge and spin: needed for the omol head only
    MLIPTorchSimModel(model, device="cpu", dtype=torch.float64, head="mptrj")
    with pytest.raises(ValueError, match="omol"):
        MLIPTorchSimModel(model, device="cpu", dtype=torch.float64, head="omol")
    # a compiled model runs the checks eagerly before each compiled call (the trace resolved them once)
    from mlip.models.compile import CompiledPotential

    check = CompiledPotential(model)._check_inputs
    batch = lambda *frames: collate([atoms_to_graph(a, r_max=model.r_max) for a in frames])
    check(batch(_water(), _crystal()))
    with pytest.raises(ValueError, match="head 'omol'"):
        check(batch(_water(None), _crystal()))
    # a committee asks for charge and spin where any member reads them
    plain = _model("equivariant")
    every = _model("equivariant", use_charge_spin=True)
    assert uses_charge_spin(Committee([model, plain]), HEADS) == [False, True]
    assert uses_charge_spin(Committee([every, plain]), HEADS) == [True, True]


# --------------------------------------------------------------------------------------------
# mlip train: the setting follows the data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> dict[str, Path]:
    """30 molecules with charge and spin (with the 4 isolated atoms), the same without charge and
    spin, and 20 crystals without (with the 7 isolated atoms) from the bundled data, as three files."""
    root = tmp_path_factory.mktemp("charge_spin")
    molecules, crystals = read(ROOT / "data/xtb_molecules.xyz"), read(ROOT / "data/emt_crystals.xyz")
    pick = lambda frames, n: [a for a in frames if a.info["isolated_atom"]] + \
        [a for a in frames if not a.info["isolated_atom"]][:n]
    write(root / "molecules.xyz", pick(molecules, 30), format="extxyz")
    write(root / "crystals.xyz", pick(crystals, 20), format="extxyz")
    neutral = pick(molecules, 30)
    for a in neutral:
        del a.info["charge"], a.info["spin"]
    write(root / "neutral.xyz", neutral, format="extxyz")
    return {key: root / f"{key}.xyz" for key in ("molecules", "crystals", "neutral")} | {"root": root}


def _built(files: dict[str, Path], entries: dict[str, str], model: dict | None = None,
           init_from: Path | None = None):
    """``build_model`` of a small equivariant model on ``{head: file key}``, without training."""
    from mlip.train.config import config_from_mapping
    from mlip.train.data import build_data
    from mlip.train.loop import build_model as build_trained

    cfg = config_from_mapping({
        "output_dir": str(files["root"] / "run"), "dtype": "float64", "device": "cpu", "num_threads": 1,
        "model": {"family": "equivariant", "r_max": 4.0, "num_channels": 4, "lmax": 1, "num_layers": 1,
                  **(model or {})},
        "data": {"train": [{"path": str(files[key]), "head": head} for head, key in entries.items()],
                 "valid_fraction": 0.0},
        "train": {"init_from": str(init_from) if init_from else None},
    })
    return build_trained(cfg, build_data(cfg, r_max=4.0, log=logging.getLogger("mlip.train")))


def test_mlip_train_fills_the_charge_spin_heads_from_the_data(mixed_data, caplog):
    mixed = {"omol": "molecules", "mptrj": "crystals"}
    with caplog.at_level(logging.INFO, logger="mlip.train"):
        model = _built(mixed_data, mixed)
    assert (model.config.use_charge_spin, model.config.charge_spin_heads) == (True, ["omol"])
    assert "model.charge_spin_heads = ['omol']" in caplog.text
    # every head carries them: the old setting, every head, no list
    single = _built(mixed_data, {"default": "molecules"})
    assert (single.config.use_charge_spin, single.config.charge_spin_heads) == (True, None)
    # set in the config: the list alone switches the embedding on; true for every head is refused
    # up front, since the crystals have none; false ignores them, with a warning
    listed = _built(mixed_data, mixed, {"charge_spin_heads": ["omol"]})
    assert (listed.config.use_charge_spin, listed.config.charge_spin_heads) == (True, ["omol"])
    with pytest.raises(ConfigError, match=r"heads \['mptrj'\] read the total charge and spin"):
        _built(mixed_data, mixed, {"use_charge_spin": True})
    caplog.clear()
    off = _built(mixed_data, mixed, {"use_charge_spin": False})
    assert off.charge_spin is None and "heads ['omol'] carry total charge and spin" in caplog.text



def test_fine_tuning_keeps_the_pretrained_heads_choice(mixed_data):
    """``--init-from``: the pretrained heads keep the pretrained model's choice, a new head follows
    its data; switching charge and spin on for a new head leaves the pretrained heads' predictions
    as they were."""
    root = mixed_data["root"]
    save_model(_built(mixed_data, {"omol": "molecules", "mptrj": "crystals"}), root / "mixed.pt")
    tuned = _built(mixed_data, {"new": "crystals", "omol": "molecules"}, init_from=root / "mixed.pt")
    assert tuned.config.heads == ["mptrj", "omol", "new"] and tuned.config.charge_spin_heads == ["omol"]
    single = _built(mixed_data, {"default": "molecules"})  # every head reads them
    save_model(single, root / "single.pt")
    tuned = _built(mixed_data, {"new": "neutral"}, init_from=root / "single.pt")
    assert tuned.config.heads == ["default", "new"] and tuned.config.charge_spin_heads == ["default"]
    assert torch.equal(tuned.charge_spin.w1, single.charge_spin.w1)
    # replay data of a pretrained head that reads charge and spin must carry them
    with pytest.raises(ConfigError, match=r"from --init-from\) make heads \['default'\] read"):
        _built(mixed_data, {"default": "neutral"}, init_from=root / "single.pt")
    plain = _built(mixed_data, {"mptrj": "crystals", "pbe": "neutral"}).eval()  # no head reads them
    assert plain.charge_spin is None
    save_model(plain, root / "plain.pt")
    tuned = _built(mixed_data, {"omol": "molecules"}, init_from=root / "plain.pt").eval()
    assert tuned.config.heads == ["mptrj", "pbe", "omol"] and tuned.config.charge_spin_heads == ["omol"]
    water = _water(None)
    water.info["head"] = "pbe"
    for frames in ((_crystal(),), (water,)):
        before, after = _predict(plain, *frames), _predict(tuned, *frames)
        for key in ("energy", "forces"):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-12)
