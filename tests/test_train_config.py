"""Training config: defaults, YAML + --set overrides, unknown keys with suggestions, docs coverage."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import toy_models  # noqa: F401 - registers the test-only families
from mlip.train.config import ConfigError, all_keys, apply_override, config_from_mapping, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"family": "toy-pair"}, "data": {"train": "x.xyz"}}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_fill_every_unset_key(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.optim.optimizer == "adamw" and cfg.optim.lr == 0.005
    assert cfg.loss.stage_two.start_epoch is None
    assert cfg.batch.max_atoms == 256 and cfg.train.epochs == 100
    assert cfg.data.train == "x.xyz" and cfg.model == {"family": "toy-pair"}


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), [
        "optim.lr=1e-3", "train.epochs=7", "data.train=[a.xyz, b.h5]", "batch.max_edges=5000",
        "batch.max_atoms=null", "loss.stage_two.start_epoch=3", "output_dir=runs/x", "model.r_max=4.5",
        "train.freeze=['coeff']",
    ])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 7 and cfg.data.train == ["a.xyz", "b.h5"]
    assert cfg.batch.max_edges == 5000 and cfg.batch.max_atoms is None
    assert cfg.loss.stage_two.start_epoch == 3 and cfg.output_dir == "runs/x"
    assert cfg.model["r_max"] == 4.5 and cfg.train.freeze == ["coeff"]


def test_yaml_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {family: toy-pair}\ndata: {train: x.xyz}\noptim:\n  lr: 1e-3\n")
    assert load_config(path).optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "data, overrides, fragment",
    [
        ({**MINIMAL, "optim": {"lrr": 0.1}}, [], "did you mean 'optim.lr'"),
        (MINIMAL, ["trian.epochs=3"], "did you mean 'train'"),
        (MINIMAL, ["loss.stage_two.energy_wieght=5"], "did you mean 'loss.stage_two.energy_weight'"),
        ({**MINIMAL, "outptu_dir": "x"}, [], "did you mean 'output_dir'"),
        (MINIMAL, ["model.r_mx=3.0"], "did you mean 'model.r_max'"),
        (MINIMAL, ["data.keys.froces=REF_forces"], "did you mean 'data.keys.forces'"),
        (MINIMAL, ["data.train=[{pth: a.xyz, head: omol}]"], "did you mean 'data.train[].path'"),
        (MINIMAL, ["data.valid=[{path: a.xyz, wieght: 2}]"], "did you mean 'data.valid[].weight'"),
        ({"model": {"family": "toy-pai"}, "data": {"train": "x"}}, [], "did you mean 'toy-pair'"),
    ],
)
def test_unknown_keys_name_the_nearest_valid_key(tmp_path, data, overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(_write(tmp_path, data), overrides)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochs=ten", "expects an integer"),
        ("loss.kind=l1", "must be one of"),
        ("optim.scheduler=linear", "must be one of"),
        ("optim.ema_decay=1.5", "ema_decay"),
        ("data.valid_fraction=0.7", None),
        ("batch.max_atoms=null", "at least one of"),
        ("dtype=float16", "must be one of"),
        ("train.amp=maybe", "true/false"),
        ("optim", "key=value"),
        ("data.train=[{head: omol}]", "has no 'path'"),
        ("data.train=[{path: a.xyz, weight: -1}]", "weight must be a number >= 0"),
        ("data.train=[3]", "expected a path"),
        ("data.keys={energy: 5}", "names a key in the data files"),
        ("data.e0s=isolate", "data.e0s must be"),
        ("train.equivariance_check=sometimes", "equivariance_check"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("optim.betas=[0.9]", "two numbers"),
    ],
)
def test_bad_values_are_rejected_with_the_key(tmp_path, override, fragment):
    extra = ["data.test_fraction=0.5"] if override.startswith("data.valid_fraction") else []
    with pytest.raises(ConfigError, match=re.escape(fragment) if fragment else "valid_fraction"):
        load_config(_write(tmp_path, MINIMAL), [override, *extra])


def test_missing_train_data_and_family_are_errors():
    with pytest.raises(ConfigError, match="data.train is required"):
        config_from_mapping({"model": {"family": "toy-pair"}})
    with pytest.raises(ConfigError, match="needs a 'family'"):
        config_from_mapping({"model": {"r_max": 3.0}, "data": {"train": "x"}})


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["optim.lr=0.002", "loss.kind=huber"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg


def test_apply_override_creates_nested_sections():
    data: dict = {}
    apply_override(data, "loss.stage_two.start_epoch=4")
    assert data == {"loss": {"stage_two": {"start_epoch": 4}}}


def test_readme_documents_every_key_with_its_default():
    text = (ROOT / "configs" / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`([a-z_.0-9]+)`\s*\|\s*`([^`]*)`", line)
        if m:
            rows[m.group(1)] = m.group(2)
    for key, default in all_keys().items():
        assert key in rows, f"configs/README.md does not document {key}"
        shown = rows[key]
        expected = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        assert yaml.safe_load(shown) == yaml.safe_load(expected) or (default is None and shown == "null"), (
            key, shown, default)


def test_quickstart_config_is_valid():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.data.train and cfg.train.epochs >= 1
