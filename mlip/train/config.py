"""Training configuration: nested dataclasses loaded from YAML, with ``a.b=c`` overrides.

Every key has a documented default (``configs/README.md``). An unknown key is an error that
names the nearest valid key, also inside the ``model`` section (checked against the family's
own ``Config`` dataclass when the model is built).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mlip.atomic import atomic_path
from mlip.models.base import config_to_dict


class ConfigError(ValueError):
    """A training config that cannot be used (unknown key, wrong type, bad value)."""


@dataclass
class DataConfig:
    """Where the structures come from and how they are split.

    ``train``/``valid``/``test`` are a path or a list of entries; an entry is a path or a
    mapping ``{path: ..., head: ..., weight: ...}`` (``head`` tags a dataset, e.g. ``omol`` or
    ``mptrj``, for per-dataset heads and E0s; ``weight`` multiplies that file's structure weights).
    """

    train: Any = None
    valid: Any = None
    test: Any = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    keys: dict = field(default_factory=dict)
    e0s: Any = "auto"
    head: str = "default"
    num_workers: int = 0
    cache_graphs: Any = "auto"


@dataclass
class BatchConfig:
    """Batches close before exceeding any bound (``null`` = unbounded)."""

    max_atoms: int | None = 256
    max_edges: int | None = None
    max_graphs: int | None = None
    valid_max_atoms: int | None = None


@dataclass
class StageTwoConfig:
    """Late-training loss weights (MACE's second stage); off while ``start_epoch`` is null."""

    start_epoch: int | None = None
    energy_weight: float = 1000.0
    forces_weight: float = 100.0
    stress_weight: float = 100.0
    lr: float | None = None


@dataclass
class LossConfig:
    """Weighted sum of per-atom energy, force and stress errors."""

    kind: str = "mse"
    huber_delta: float = 0.01
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 100.0
    stage_two: StageTwoConfig = field(default_factory=StageTwoConfig)


@dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule, gradient clipping and EMA."""

    optimizer: str = "adamw"
    lr: float = 0.005
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    amsgrad: bool = False
    scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    clip_grad_norm: float | None = 10.0
    ema_decay: float | None = 0.99


@dataclass
class TrainLoopConfig:
    """How long to train, what to check and what to keep."""

    epochs: int = 100
    time_budget_s: float | None = None
    eval_every_epochs: int = 1
    checkpoint_every_steps: int | None = None
    export_from: str = "best"
    max_consecutive_nonfinite: int = 5
    amp: bool = False
    equivariance_check: Any = "auto"
    equivariance_structures: int = 4
    progress: bool = True
    init_from: str | None = None
    freeze: list = field(default_factory=list)
    log_steps: bool = True
    compile: bool = False


@dataclass
class TrainConfig:
    """Top level of a training YAML file (see ``configs/README.md``)."""

    output_dir: str = "runs/run"
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    num_threads: int | None = None
    model: dict = field(default_factory=lambda: {"family": "equivariant"})
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


_CHOICES = {
    "dtype": ("float32", "float64"),
    "device": None,
    "loss.kind": ("mse", "huber"),
    "optim.optimizer": ("adamw", "adam"),
    "optim.scheduler": ("cosine", "plateau", "constant"),
    "train.export_from": ("best", "last"),
}


def _suggest(key: str, names: list[str], where: str) -> ConfigError:
    leaf = key.split(".")[-1]
    near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.5)
    if not near:  # an abbreviation spelled out: learning_rate -> lr
        initials = "".join(w[:1] for w in leaf.split("_"))
        near = [n for n in names if n == initials]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {prefix + near[0]!r}?" if near else f"; valid keys: {sorted(names)}"
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Coerce YAML scalars to the annotated type where unambiguous; reject the rest."""
    text = str(hint)
    if value is None:
        if "None" in text or text in ("Any", "typing.Any"):
            return None
        raise ConfigError(f"config key {key!r} may not be null")
    if text in ("Any", "typing.Any") or hint is dict and isinstance(value, dict):
        return value
    if hint is dict or hint is list:
        if hint is list and isinstance(value, (list, tuple)):
            return list(value)
        if not isinstance(value, hint):
            raise ConfigError(f"config key {key!r} expects a {hint.__name__}, got {value!r}")
        return value
    if "bool" in text:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if "int" in text and "float" not in text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
        return value
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        return float(value)
    if "str" in text:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'!r}{where} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _suggest(full, names, where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value if value is not None else {}, full + ".", where)
        else:
            kwargs[key] = _check_type(full, value, hint)
    return cls(**kwargs)


def config_from_mapping(data: dict | None, where: str = "") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested mapping."""
    cfg = _from_dict(TrainConfig, data or {}, "", where)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Check choices and ranges that a dataclass cannot express."""
    flat = flatten(config_to_dict(cfg))
    for key, choices in _CHOICES.items():
        if choices is not None and flat[key] not in choices:
            raise ConfigError(f"config key {key!r} must be one of {list(choices)}, got {flat[key]!r}")
    if not isinstance(cfg.model, dict) or "family" not in cfg.model:
        raise ConfigError("config section 'model' needs a 'family' (e.g. family: equivariant)")
    if not 0.0 <= cfg.data.valid_fraction < 1.0 or not 0.0 <= cfg.data.test_fraction < 1.0:
        raise ConfigError("data.valid_fraction and data.test_fraction must lie in [0, 1)")
    if cfg.data.valid_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError("data.valid_fraction + data.test_fraction must be < 1")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    if cfg.batch.max_atoms is None and cfg.batch.max_edges is None and cfg.batch.max_graphs is None:
        raise ConfigError("set at least one of batch.max_atoms, batch.max_edges, batch.max_graphs")
    if cfg.optim.ema_decay is not None and not 0.0 < cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must lie in (0, 1) or be null, got {cfg.optim.ema_decay}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas needs two numbers, got {cfg.optim.betas}")
    eq = cfg.train.equivariance_check
    if eq not in ("auto", True, False):
        raise ConfigError(f"train.equivariance_check must be auto, true or false, got {eq!r}")
    if isinstance(cfg.data.e0s, str) and cfg.data.e0s not in ("auto", "isolated", "fit", "none"):
        raise ConfigError(f"data.e0s must be auto, isolated, fit, none or a mapping, got {cfg.data.e0s!r}")
    if cfg.data.cache_graphs not in ("auto", True, False):
        raise ConfigError(f"data.cache_graphs must be auto, true or false, got {cfg.data.cache_graphs!r}")
    if cfg.data.train is None:
        raise ConfigError("data.train is required (a path, or a list of paths / {path, head, weight})")
    for name in ("train", "valid", "test"):
        _check_entries(getattr(cfg.data, name), f"data.{name}")
    check_label_keys(cfg.data.keys)
    check_model_section(cfg.model)


def _check_entries(value: Any, where: str) -> None:
    """A data entry is a path or ``{path, head, weight}``; a list holds such entries."""
    if value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            unknown = [k for k in item if k not in ("path", "head", "weight")]
            if unknown:
                raise _suggest(f"{where}[].{unknown[0]}", ["path", "head", "weight"], "")
            if "path" not in item:
                raise ConfigError(f"{where}: the entry {item!r} has no 'path'")
            weight = item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise ConfigError(f"{where}: weight must be a number >= 0, got {weight!r} in {item!r}")
        elif not isinstance(item, (str, os.PathLike)):
            raise ConfigError(f"{where}: expected a path or {{path, head, weight}}, got {item!r}")


def check_label_keys(keys: dict) -> None:
    """``data.keys`` maps canonical labels to the files' names (fields of ``LabelKeys``)."""
    from mlip.data.formats import LabelKeys

    names = [f.name for f in dataclasses.fields(LabelKeys)]
    for key, value in keys.items():
        if key not in names:
            raise _suggest(f"data.keys.{key}", names, "")
        if not isinstance(value, str):
            raise ConfigError(f"data.keys.{key} names a key in the data files (a string), got {value!r}")


def check_model_section(section: dict) -> None:
    """Reject an unknown family or an unknown key of the family's ``Config`` (nearest name suggested)."""
    from mlip.models.base import config_fields

    family = section["family"]
    try:
        names = config_fields(family)
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    for key in section:
        if key != "family" and key not in names:
            raise _suggest(f"model.{key}", names, f" (family {family!r})")


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (the model section's inner keys included)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "keys":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML.

    >>> d = {"optim": {"lr": 0.01}}
    >>> apply_override(d, "optim.lr=1e-3"); d["optim"]["lr"]
    0.001
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value (e.g. optim.lr=1e-3)")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _looks_numeric(text: str) -> bool:
    """YAML 1.1 reads ``1e-3`` as a string; users mean a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fix_numeric_strings(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _fix_numeric_strings(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_numeric_strings(v) for v in data]
    if isinstance(data, str) and _looks_numeric(data) and data.strip().lower() not in ("nan", "inf", "-inf"):
        return float(data)
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate.

    Relative data paths stay relative to the current directory (as a user types them).
    """
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file at {path}")
        where = f" in {path}"
        with open(path) as fh:
            loaded = yaml.safe_load(fh)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        data = _fix_numeric_strings(loaded or {})
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_mapping(data, where)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)


def all_keys() -> dict[str, Any]:
    """Every dotted key with its default (the model section excepted): used by the docs test."""
    return flatten({k: v for k, v in config_to_dict(TrainConfig()).items() if k != "model"})
