"""The training loop behind ``mlip train``: four named steps, ``build_data``, ``build_model``,
``fit`` and ``export``, driven by :func:`train`.

Determinism: batches come from :class:`~mlip.data.graph.BoundedBatchSampler` seeded with
``seed + epoch``; a checkpoint records the position inside the epoch, so ``resume=True``
replays exactly the batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from mlip.atomic import atomic_path
from mlip.data.graph import BoundedBatchSampler, GraphBatch, collate
from mlip.dtypes import resolve_dtype
from mlip.models.base import (PotentialModel, config_fields, config_to_dict, load_model, load_torch_file, model_class,
                              save_model)
from mlip.models.base import build_model as _build
from mlip.models.outputs import predict
from mlip.nn.embedding import reads_charge_spin
from mlip.train import checkpoint as ckpt
from mlip.train import distributed as ddp
from mlip.train.config import ConfigError, TrainConfig, save_config
from mlip.train.data import Data, Split, build_data
from mlip.train.ema import EMA
from mlip.train.equivariance import equivariance_error, is_exact_by_construction
from mlip.train.evaluate import evaluate_batches
from mlip.train.loss import TERMS, LossWeights, combine, loss_sums, needs, weights_at_epoch
from mlip.train.metrics import format_summary

log = logging.getLogger("mlip.train")




class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# ----------------------------------------------------------------------------- schedule
class LRSchedule:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``, reduce-on-plateau, or constant.

    Stepped after every optimiser step (``step()``) and after every validation
    (``on_validation(loss)``, used by ``plateau``). ``set_override(lr)`` pins a constant rate
    (MACE-style second stage).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> None:  # noqa: ANN001
        self.opt, self.kind, self.base = optimizer, cfg.scheduler, cfg.lr
        self.warmup, self.total, self.min_ratio = cfg.warmup_steps, max(total_steps, 1), cfg.min_lr_ratio
        self.factor, self.patience = cfg.plateau_factor, cfg.plateau_patience
        self.t, self.plateau_scale, self.best, self.bad, self.override = 0, 1.0, math.inf, 0, None
        self.time_fraction: float | None = None  # set under a wall-clock budget: cosine follows the clock
        self._apply()

    def lr(self) -> float:
        if self.override is not None:
            return self.override
        warm = min(1.0, (self.t + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.kind == "cosine":
            if self.time_fraction is not None:
                frac = min(1.0, self.time_fraction)
            else:
                frac = min(1.0, max(0, self.t - self.warmup) / max(1, self.total - self.warmup))
            decay = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
            return self.base * warm * decay
        if self.kind == "plateau":
            return self.base * warm * self.plateau_scale
        return self.base * warm

    def _apply(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr()

    def step(self) -> None:
        self.t += 1
        self._apply()

    def on_validation(self, loss: float) -> None:
        if self.kind != "plateau" or not math.isfinite(loss):
            return
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.plateau_scale *= self.factor
                self.bad = 0
        self._apply()

    def set_override(self, lr: float | None) -> None:
        self.override = lr
        self._apply()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("t", "plateau_scale", "best", "bad", "override")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()


# ----------------------------------------------------------------------------- state
@dataclass
class RunState:
    """Everything :func:`fit` mutates; saved in checkpoints."""

    cfg: TrainConfig
    data: Data
    model: PotentialModel
    net: torch.nn.Module  # the model, DDP-wrapped on several processes
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    ema: EMA | None
    dist: ddp.DistInfo
    out: Path
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    best: float = math.inf
    nonfinite: int = 0
    history: list = field(default_factory=list)
    started: float = field(default_factory=time.time)
    hooks: dict = field(default_factory=dict)
    compiled: Any = None  # train.compile: the model's CompiledPotential (mlip.models.compile)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.dtype)

    def to_checkpoint(self) -> dict:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": ckpt.rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_steps": self.epoch_loss_steps,
            "best": self.best,
            "history": self.history,
            "elapsed_s": time.time() - self.started,
            "config": config_to_dict(self.cfg),
            "model_family": self.model.family,
            "model_config": config_to_dict(self.model.config),
        }

    def load_checkpoint(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as err:
            raise ConfigError(f"{self.out / ckpt.LAST} does not fit the model the config builds (was the "
                              f"model section changed since the run started?): {err}") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ConfigError(f"{self.out / ckpt.LAST} was written without EMA but the config sets "
                                  f"optim.ema_decay={self.cfg.optim.ema_decay}")
            self.ema.load_state_dict(state["ema"])
        for key in ("epoch", "step", "step_in_epoch", "epoch_loss_sum", "epoch_loss_steps", "best", "history"):
            setattr(self, key, state[key])
        # wall time continues across a resume (metrics' time_s, train.time_budget_s)
        self.started = time.time() - float(state.get("elapsed_s", 0.0))
        ckpt.set_rng_state(state["rng"])


# ----------------------------------------------------------------------------- build_model
def build_model(cfg: TrainConfig, data: Data, device: torch.device | str = "cpu") -> PotentialModel:
    """Build the configured family, filling ``elements``, ``heads``, ``e0s``,
    ``avg_num_neighbors``, ``shift``, ``scale``, ``use_charge_spin`` and ``charge_spin_heads`` (the
    heads whose every training structure has a total charge and spin, :func:`_charge_spin`) from the
    data where the family has such a field left unset; with ``train.init_from``, start from that
    model's config and weights (:func:`_fine_tune_heads`)."""
    section = dict(cfg.model)
    family = section.pop("family")
    base: dict = {}
    init = None
    if cfg.train.init_from:
        init = load_model(cfg.train.init_from, map_location=device)  # checked where it will train
        if init.family != family:
            raise ConfigError(f"--init-from {cfg.train.init_from} is a {init.family!r} model; the config asks for {family!r}")
        base = config_to_dict(init.config)
    base.update(section)
    names = set(config_fields(family))
    old_heads = list(base.get("heads") or ["default"])
    if init is not None:
        _fine_tune_heads(base, data, cfg, names)
    derived = {
        "elements": data.elements,
        "heads": data.heads,
        "e0s": data.e0s_for_model(),
        "avg_num_neighbors": data.avg_num_neighbors,
    }
    for key, value in (("shift", data.shift), ("scale", data.scale)):
        if key not in base:  # left to the data unless the user (or --init-from) set it
            derived[key] = value
    if "use_charge_spin" in names:
        _charge_spin(base, data, names, set(section), init)
    for key, value in derived.items():
        if key in names and value is not None and base.get(key) in (None, [], {}):
            if key == "e0s" and init is not None and cfg.data.e0s == "auto":
                continue  # fine-tuning keeps the pretrained reference energies unless asked otherwise
            base[key] = value
    model = _build(family, base).to(resolve_dtype(cfg.dtype))
    if init is not None:
        _load_pretrained(model, init, old_heads, list(base.get("heads") or old_heads), cfg.train.init_from)
    _freeze(model, cfg.train.freeze)
    return model


def _fine_tune_heads(base: dict, data: Data, cfg: TrainConfig, names: set[str]) -> None:
    """Heads and E0s when fine-tuning (``--init-from``), as MACE's multi-head fine-tuning does.

    The model keeps the pretrained heads, in their order, and gains the data's new ones; replayed
    pretraining data (a ``data.train`` entry tagged with the pretrained head) keeps the pretrained
    head trained while the new head learns. E0s: the pretrained ones with ``data.e0s: auto``
    (the data's for new heads), else the data's for every head the data carry.

    Raises:
        ConfigError: the data hold elements the pretrained model has no embedding for.
    """
    pretrained_elements = set(base.get("elements") or [])
    missing = sorted(set(data.elements) - pretrained_elements) if pretrained_elements else []
    if missing:
        from ase.data import chemical_symbols

        raise ConfigError(f"--init-from {cfg.train.init_from} knows elements {sorted(pretrained_elements)}; the data "
                          f"also hold {[chemical_symbols[z] for z in missing]}, which it has no embedding for")
    if "heads" not in names:
        return
    old = list(base.get("heads") or ["default"])
    heads = old + [h for h in data.heads if h not in old]
    e0s = _per_head(base.get("e0s"), old) or {}
    for head, table in (data.e0s or {}).items():
        if head not in old or cfg.data.e0s != "auto":
            e0s[head] = table
    if len(heads) > len(old):
        log.info("fine-tuning: heads %s from %s, new heads %s", old, cfg.train.init_from, heads[len(old):])
    base["heads"] = heads
    if set(e0s) >= set(heads):
        base["e0s"] = e0s if len(heads) > 1 else e0s[heads[0]]


def _charge_spin(base: dict, data: Data, names: set[str], user: set[str],
                 init: PotentialModel | None) -> None:
    """``use_charge_spin`` and ``charge_spin_heads`` (the heads that read total charge and spin) in ``base``.

    Left unset in the config (``user``), they follow the data: the heads whose every training
    structure carries a charge and spin read them, never a silent neutral-singlet default; with
    ``--init-from``, the pretrained heads keep the pretrained model's choice (their weights were
    trained with it) and only new heads follow the data. ``charge_spin_heads`` stays unset when
    every head reads them, as in models saved before the field existed. Logged either way.

    Raises:
        ConfigError: the config (or the ``--init-from`` model) makes a head read charge and spin
            that some of its training structures lack (they would be refused at the first batch).
    """
    heads = list(base.get("heads") or data.heads)
    if user & {"use_charge_spin", "charge_spin_heads"}:
        if "use_charge_spin" not in user:  # only the list given: it switches the embedding on
            base["use_charge_spin"] = bool(base.get("charge_spin_heads"))
        elif not base["use_charge_spin"] and "charge_spin_heads" not in user:
            base["charge_spin_heads"] = None  # off: an --init-from model's list goes with it
        _check_charge_spin_setting(base, data, heads)
        return
    if init is not None:
        old = list(getattr(init.config, "heads", None) or heads)
        kept = dict(zip(old, reads_charge_spin(init.config, old)))
        chosen = [h for h in heads if kept.get(h, h in data.charge_spin_heads)]
    else:
        chosen = [h for h in heads if h in data.charge_spin_heads]
    every = chosen == heads
    if "charge_spin_heads" not in names and not every:
        chosen = []  # this family reads charge and spin on every structure or on none
    base["use_charge_spin"] = bool(chosen)
    if "charge_spin_heads" in names:
        base["charge_spin_heads"] = None if every or not chosen else chosen
    why = "pretrained heads as pretrained, new heads from their data" if init is not None else "from the data"
    if every:
        log.info("every head reads the total charge and spin (%s): model.use_charge_spin = true", why)
    elif chosen:
        log.info("heads %s read the total charge and spin, heads %s do not (%s): "
                 "model.use_charge_spin = true, model.charge_spin_heads = %s",
                 chosen, [h for h in heads if h not in chosen], why, chosen)
    _check_charge_spin_setting(base, data, heads)


def _check_charge_spin_setting(base: dict, data: Data, heads: list[str]) -> None:
    """Warn where the data's charge and spin go unread; refuse a head that reads them without them."""
    config = SimpleNamespace(heads=heads, use_charge_spin=base.get("use_charge_spin"),
                             charge_spin_heads=base.get("charge_spin_heads"))
    reads = dict(zip(heads, reads_charge_spin(config, heads)))
    lacking = [h for h in data.heads if reads.get(h) and h not in data.charge_spin_heads]
    if lacking:
        raise ConfigError(f"model.use_charge_spin / model.charge_spin_heads (set, or from --init-from) make "
                          f"heads {lacking} read the total charge and spin, but some of their training "
                          f"structures have none; the heads whose structures all have them: "
                          f"{data.charge_spin_heads}")
    ignored = [h for h in data.charge_spin_heads if not reads.get(h)]
    if ignored:
        log.warning("the training data of heads %s carry total charge and spin, but model.use_charge_spin / "
                    "model.charge_spin_heads leave them unread there: the model will ignore them", ignored)


def _per_head(e0s: dict | None, heads: list[str]) -> dict[str, dict] | None:
    """A model config's E0s as ``{head: {Z: eV}}``, from either of its forms."""
    if not e0s:
        return None
    if all(isinstance(k, str) and k in heads for k in e0s):
        return {h: dict(t) for h, t in e0s.items()}
    return {h: dict(e0s) for h in heads}


def _load_pretrained(model: PotentialModel, init: PotentialModel, old_heads: list[str], heads: list[str],
                     source: str) -> None:
    """Copy the pretrained weights; a tensor with one entry per head (a readout) is widened to the
    new heads, each new head starting from the first pretrained head (MACE initialises a
    fine-tuning head from the pretrained one). Other reshaped tensors start fresh (logged)."""
    own = model.state_dict()
    rows = torch.tensor([old_heads.index(h) if h in old_heads else 0 for h in heads])
    loadable, widened = {}, []
    for key, value in init.state_dict().items():
        if key not in own:
            continue
        if own[key].shape == value.shape:
            loadable[key] = value
            continue
        axes = [d for d, (a, b) in enumerate(zip(value.shape, own[key].shape)) if a != b]
        if value.dim() == own[key].dim() and len(axes) == 1 and (value.shape[axes[0]], own[key].shape[axes[0]]) == (
                len(old_heads), len(heads)):
            loadable[key] = value.index_select(axes[0], rows)
            widened.append(key)
    model.load_state_dict(loadable, strict=False)
    if widened:
        log.info("init-from: %d per-head tensors widened to heads %s: %s", len(widened), heads, ", ".join(widened))
    skipped = sorted(set(own) - set(loadable))
    if skipped:
        log.info("init-from: %d tensors not taken from %s (new or reshaped): %s", len(skipped),
                 source, ", ".join(skipped[:8]))


def _freeze(model: torch.nn.Module, patterns: list[str]) -> None:
    """Stop training parameters whose name matches any glob pattern (``interactions.0.*``)."""
    for pattern in patterns:
        hits = [n for n, p in model.named_parameters() if fnmatch(n, pattern) or n.startswith(pattern + ".")]
        if not hits:
            names = [n for n, _ in model.named_parameters()]
            raise ConfigError(f"train.freeze pattern {pattern!r} matches no parameter; names look like {names[:6]}")
        for n, p in model.named_parameters():
            if n in hits:
                p.requires_grad_(False)


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters (is everything frozen?)")
    o = cfg.optim
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, amsgrad=o.amsgrad)


# ----------------------------------------------------------------------------- fit
def _batches(split: Split, cfg: TrainConfig, epoch: int, shuffle: bool, max_atoms: int | None = None) -> list[list[int]]:
    sampler = BoundedBatchSampler(
        split.n_atoms, split.n_edges, max_atoms=max_atoms or cfg.batch.max_atoms,
        max_edges=cfg.batch.max_edges, max_graphs=cfg.batch.max_graphs, shuffle=shuffle, seed=cfg.seed,
    )
    sampler.set_epoch(epoch)
    return sampler.batches()


def _load(split: Split, parts: list[list[int]], num_workers: int):
    """Iterate collated batches of ``parts`` (lists of positions in ``split``)."""
    if num_workers <= 0:
        return (collate([split[i] for i in part]) for part in parts)
    return iter(torch.utils.data.DataLoader(split, batch_sampler=parts, collate_fn=collate, num_workers=num_workers))


def _local(state: RunState, parts: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
    """This rank's share of each global batch, so that a rank reads only its own structures.

    A share can be empty (a global batch smaller than the world); the rank then still runs the
    same collective operations on a stand-in batch with zero weight: a structure of its own
    shares (the latest one, or its first before that), so it reads nothing outside them.
    """
    shares = [ddp.local_part(part, state.dist) for part in parts]
    stand_in = next((share[0] for share in shares if share), None)
    out, real = [], []
    for part, mine in zip(parts, shares):
        if mine:
            stand_in = mine[0]
        out.append(mine if mine else [stand_in if stand_in is not None else part[0]])
        real.append(bool(mine))
    return out, real


def train_step(state: RunState, batch: GraphBatch, real: bool, weights: LossWeights) -> float | None:
    """One optimiser step on this rank's share of a global batch; returns the global loss,
    or ``None`` when the step was skipped because the loss or gradient was not finite."""
    cfg, info = state.cfg, state.dist
    batch = batch.to(info.device, state.dtype)
    if "batch" in state.hooks:
        batch = state.hooks["batch"](state, batch)
    want_f, want_s = needs(weights, batch)
    want_f, want_s = ddp.all_reduce_max_flag(want_f, info), ddp.all_reduce_max_flag(want_s, info)
    state.optimizer.zero_grad(set_to_none=True)
    if state.compiled is not None:
        pred = state.compiled.predict(batch, forces=want_f, stress=want_s, create_graph=True)
    else:
        pred = predict(state.net, batch, forces=want_f, stress=want_s, create_graph=True)
    sums, counts = loss_sums(pred, batch, cfg.loss.kind, cfg.loss.huber_delta)
    if not real:
        sums = {k: v * 0.0 for k, v in sums.items()}
        counts = {k: v * 0.0 for k, v in counts.items()}
    keys = list(counts)
    global_counts = ddp.all_reduce_sum(torch.stack([counts[k] for k in keys]), info)
    # each rank divides by the global counts; DDP averages gradients, so scale by world size
    local, _ = combine(sums, dict(zip(keys, global_counts)), weights)
    if "aux_loss" in pred:  # a model's own weighted term (learned-equivariance alignment loss), mean over ranks
        local = local + (pred["aux_loss"] if real else 0.0 * pred["aux_loss"]) / info.world_size
    loss_value = float(ddp.all_reduce_sum(local.detach().reshape(1), info))
    # backward even for a non-finite loss: every DDP rank then runs the same gradient all-reduce
    (local * info.world_size).backward()
    if not math.isfinite(loss_value):
        return _skip(state, f"non-finite loss ({loss_value})")
    params = [p for p in state.model.parameters() if p.requires_grad]
    if cfg.optim.clip_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    if not torch.isfinite(norm):
        return _skip(state, "non-finite gradient")
    state.optimizer.step()
    state.schedule.step()
    if state.ema is not None:
        state.ema.update()
    state.nonfinite = 0
    return loss_value


def _skip(state: RunState, why: str) -> None:
    state.optimizer.zero_grad(set_to_none=True)
    state.nonfinite += 1
    msg = f"epoch {state.epoch} step {state.step}: {why}; step skipped ({state.nonfinite} in a row)"
    log.warning(msg)
    if state.nonfinite >= state.cfg.train.max_consecutive_nonfinite:
        last = state.out / ckpt.LAST
        raise TrainingDiverged(
            f"training stopped: {state.nonfinite} consecutive steps had a {why.split(' (')[0]} "
            f"(epoch {state.epoch}, step {state.step}). The last good checkpoint is "
            f"{last if last.exists() else 'not written yet'}; lower optim.lr, check the data for "
            f"bad labels, or raise train.max_consecutive_nonfinite."
        )
    return None


def validate(state: RunState, split: Split, weights: LossWeights) -> dict:
    """Loss and metrics of the (EMA) model on ``split`` (:func:`~mlip.train.evaluate.evaluate_batches`),
    summed over ranks."""
    cfg, info = state.cfg, state.dist
    model = state.model
    was_training = model.training
    model.eval()  # deterministic: full frame averaging, no random rotations (restored below)
    parts = _batches(split, cfg, 0, shuffle=False, max_atoms=cfg.batch.valid_max_atoms)
    local, real = _local(state, parts)
    batches = (b for b, ok in zip(_load(split, local, 0), real) if ok)
    want_s = cfg.loss.stress_weight > 0 or cfg.loss.stage_two.stress_weight > 0
    result = evaluate_batches(model, batches, info.device, state.dtype, stress=want_s, loss_kind=cfg.loss.kind,
                              huber_delta=cfg.loss.huber_delta)
    result.metrics.all_reduce(info.device)
    sums_t, counts_t = ddp.all_reduce_sum(result.loss_sums, info), ddp.all_reduce_sum(result.loss_counts, info)
    loss, _ = combine(dict(zip(TERMS, sums_t)), dict(zip(TERMS, counts_t)), weights)
    out = {"loss": float(loss), **result.metrics.summary()}
    check = cfg.train.equivariance_check
    if check is True or (check == "auto" and not is_exact_by_construction(model)):
        n = min(cfg.train.equivariance_structures, len(split))
        if n > 0:
            batch = collate([split[i] for i in range(n)]).to(info.device, state.dtype)
            eq = equivariance_error(model, batch, n_rotations=2, seed=cfg.seed)
            out.update({f"equivariance_{k}": v for k, v in eq.items()})
    model.train(was_training)
    return out


def fit(state: RunState) -> None:
    """Train until ``train.epochs`` (or the time budget); validate, checkpoint and log each epoch."""
    cfg, info = state.cfg, state.dist
    logger = _MetricsLogger(state.out, enabled=info.is_main, log_steps=cfg.train.log_steps)
    stop = False
    while state.epoch < cfg.train.epochs and not stop:
        stop = _train_epoch(state, logger)
        _end_epoch(state, logger, last=stop or state.epoch + 1 >= cfg.train.epochs)
    logger.close()


def _train_epoch(state: RunState, logger: "_MetricsLogger") -> bool:
    """The remaining steps of epoch ``state.epoch``; True if the time budget ran out."""
    from tqdm.auto import tqdm

    cfg, info, epoch = state.cfg, state.dist, state.epoch
    weights = weights_at_epoch(cfg.loss, epoch)
    st = cfg.loss.stage_two
    if st.start_epoch is not None and epoch >= st.start_epoch and st.lr is not None:
        state.schedule.set_override(st.lr)
    parts = _batches(state.data.train, cfg, epoch, shuffle=True)
    local, real = _local(state, parts)
    start = state.step_in_epoch
    bar = tqdm(total=len(parts), initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
               disable=not (info.is_main and cfg.train.progress), leave=False, dynamic_ncols=True)
    state.model.train()
    try:
        for k, batch in enumerate(_load(state.data.train, local[start:], cfg.data.num_workers), start=start):
            loss = train_step(state, batch, real[k], weights)
            state.step += 1
            state.step_in_epoch = k + 1
            if loss is not None:
                state.epoch_loss_sum += loss
                state.epoch_loss_steps += 1
            logger.step({"epoch": epoch, "step": state.step, "loss": loss, "lr": state.schedule.lr()})
            bar.update(1)
            bar.set_postfix(_postfix(state, loss))
            every = cfg.train.checkpoint_every_steps
            if every and state.step % every == 0 and state.step_in_epoch < len(parts):
                _save(state, best=False)
            if "step" in state.hooks:
                state.hooks["step"](state)
            if cfg.train.time_budget_s is not None:
                # all ranks use the slowest clock, so their learning rates agree
                elapsed = float(ddp.all_reduce_max(torch.tensor([time.time() - state.started]), info))
                state.schedule.time_fraction = elapsed / cfg.train.time_budget_s
                if elapsed > cfg.train.time_budget_s:
                    return True
    finally:
        bar.close()
    return False


def _postfix(state: RunState, loss: float | None) -> dict:
    """Live progress-bar fields: step loss, learning rate, latest validation errors (meV)."""
    post = {"loss": f"{loss:.4g}" if loss is not None else "skipped", "lr": f"{state.schedule.lr():.2e}"}
    if state.history and "valid_forces_mae" in state.history[-1]:
        last = state.history[-1]
        post["val E/at"] = f"{1e3 * last['valid_energy_per_atom_mae']:.3g}"
        post["val F"] = f"{1e3 * last['valid_forces_mae']:.3g}"
    return post


def _end_epoch(state: RunState, logger: "_MetricsLogger", last: bool) -> None:
    """Validate (EMA weights), log the epoch's row, step a plateau schedule, write checkpoints."""
    from tqdm.auto import tqdm

    cfg, info, valid = state.cfg, state.dist, state.data.valid
    epoch = state.epoch
    row = {"epoch": epoch + 1, "step": state.step, "lr": state.schedule.lr(),
           # an epoch whose every step was skipped has no training loss (not 0, which would rank best)
           "train_loss": state.epoch_loss_sum / state.epoch_loss_steps if state.epoch_loss_steps else math.nan,
           "skipped_steps": state.step_in_epoch - state.epoch_loss_steps}
    line = f"epoch {epoch + 1}: train loss {row['train_loss']:.4g}"
    if valid is not None and len(valid) and ((epoch + 1) % cfg.train.eval_every_epochs == 0 or last):
        # the stage-one weights rank checkpoints, so "best" stays comparable across stages
        base = LossWeights(cfg.loss.energy_weight, cfg.loss.forces_weight, cfg.loss.stress_weight)
        with state.ema.swapped() if state.ema is not None else contextlib.nullcontext():
            metrics = validate(state, valid, base)
        row.update({f"valid_{k}": v for k, v in metrics.items() if k != "forces_per_element"})
        score = metrics["loss"]
        line += f", valid loss {score:.4g}, {format_summary(metrics)}"
        if "equivariance_forces_rel" in metrics:
            line += f", equivariance F rel {metrics['equivariance_forces_rel']:.2e}"
    else:
        # without a validation set the training loss ranks checkpoints; between validations, nothing does
        score = row["train_loss"] if valid is None or not len(valid) else math.nan
    if math.isfinite(score):
        state.schedule.on_validation(score)
    if info.is_main and (cfg.train.progress or "valid_loss" in row):
        tqdm.write(line)
    row["time_s"] = time.time() - state.started
    state.history.append(row)
    logger.epoch(row)
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
    improved = math.isfinite(score) and score < state.best
    if improved:
        state.best = score
    _save(state, best=improved)
    if "epoch" in state.hooks:
        state.hooks["epoch"](state)


def _save(state: RunState, best: bool) -> None:
    if not state.dist.is_main:
        return
    payload = state.to_checkpoint()
    ckpt.save_checkpoint(state.out / ckpt.LAST, payload)
    if best:
        ckpt.save_checkpoint(state.out / ckpt.BEST, payload)


class _MetricsLogger:
    """metrics.csv / metrics.jsonl per epoch, steps.jsonl per step, TensorBoard if installed."""

    def __init__(self, out: Path, enabled: bool, log_steps: bool = True) -> None:
        self.out, self.enabled, self.tb, self.log_steps = out, enabled, None, log_steps
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self.tb = None

    def step(self, row: dict) -> None:
        if not (self.enabled and self.log_steps):
            return
        with open(self.out / "steps.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None and row["loss"] is not None:
            self.tb.add_scalar("train/loss_step", row["loss"], row["step"])

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        _rewrite_csv(self.out / "metrics.jsonl", self.out / "metrics.csv")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch",):
                    self.tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _rewrite_csv(jsonl: Path, csv_path: Path) -> None:
    import csv

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _truncate_logs(out: Path, state: RunState) -> None:
    """On resume, drop log lines written after the checkpoint (they will be replayed)."""
    for name, key, limit in (("metrics.jsonl", "epoch", state.epoch), ("steps.jsonl", "step", state.step)):
        path = out / name
        if path.exists():
            keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)[key] <= limit]
            path.write_text("".join(l + "\n" for l in keep))
    if (out / "metrics.jsonl").exists():
        _rewrite_csv(out / "metrics.jsonl", out / "metrics.csv")


# ----------------------------------------------------------------------------- export
def export(state: RunState) -> Path:
    """Write ``model.pt`` (EMA weights of ``best.pt`` or ``last.pt``) and the learning curve."""
    out = state.out
    source = out / (ckpt.BEST if state.cfg.train.export_from == "best" and (out / ckpt.BEST).exists() else ckpt.LAST)
    saved = ckpt.load_checkpoint(source)
    model = state.model
    model.load_state_dict(saved["model"], strict=True)
    if state.ema is not None and saved["ema"] is not None:
        state.ema.load_state_dict(saved["ema"])
        model.load_state_dict(state.ema.averaged_state_dict(), strict=True)
    for p in model.parameters():
        p.requires_grad_(True)
    save_model(model.eval(), out / "model.pt")
    if state.history:
        from mlip.train.plots import learning_curve

        learning_curve(state.history, out / "learning_curve.png")
    return out / "model.pt"


# ----------------------------------------------------------------------------- driver
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_logging(out: Path, is_main: bool) -> logging.Handler | None:
    log.setLevel(logging.INFO)
    if not is_main:
        return None
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def train(
    cfg: TrainConfig,
    resume: bool = False,
    hooks: dict[str, Callable] | None = None,
) -> Path:
    """Run :func:`build_data`, :func:`build_model`, :func:`fit` and :func:`export`.

    Args:
        cfg: validated config (:func:`mlip.train.config.load_config`).
        resume: continue from ``<output_dir>/last.pt`` (model, optimiser, schedule, EMA,
            RNG states, epoch and step) instead of starting fresh.
        hooks: test/extension callbacks: ``batch(state, batch) -> batch`` before each
            forward, ``step(state)`` after each step, ``epoch(state)`` after each epoch.

    Returns:
        Path of the exported ``<output_dir>/model.pt``.
    """
    info = ddp.setup(cfg.device)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / ckpt.LAST).exists():
            raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume to continue it "
                                  f"or choose another output_dir")
    ddp.barrier(info)
    handler = _setup_logging(out, info.is_main)
    try:
        if cfg.train.amp:
            _enable_tf32(info)
        _seed_everything(cfg.seed)
        r_max = _r_max(cfg)
        data = build_data(cfg, r_max, log=log if info.is_main else None, dist=info)
        model = build_model(cfg, data, info.device).to(info.device)
        if info.is_main:
            save_config(cfg, out / "config.yaml")
            log.info("model %s with %d parameters (%d trainable); %d train / %d valid structures",
                     model.family, sum(p.numel() for p in model.parameters()),
                     sum(p.numel() for p in model.parameters() if p.requires_grad), len(data.train),
                     len(data.valid) if data.valid is not None else 0)
        optimizer = _optimizer(cfg, model)
        steps_per_epoch = len(_batches(data.train, cfg, 0, shuffle=True))
        schedule = LRSchedule(optimizer, cfg.optim, steps_per_epoch * cfg.train.epochs)
        ema = EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay is not None else None
        multi_head = len(data.heads) > 1
        net = ddp.wrap(model, info, find_unused=multi_head)
        state = RunState(cfg, data, model, net, optimizer, schedule, ema, info, out, hooks=dict(hooks or {}))
        if cfg.train.compile:
            state.compiled = _compiled(cfg, data, model, info)
        if resume:
            state.load_checkpoint(ckpt.load_checkpoint(out / ckpt.LAST, map_location=info.device))
            if info.is_main:
                _truncate_logs(out, state)
                log.info("resumed from %s at epoch %d, step %d", out / ckpt.LAST, state.epoch, state.step)
        fit(state)
        ddp.barrier(info)
        path = out / "model.pt"
        if info.is_main:
            path = export(state)
            if data.test is not None and len(data.test):
                _test_metrics(state, path)
        ddp.barrier(info)
        return path
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        ddp.cleanup(info)


def _compiled(cfg: TrainConfig, data: Data, model: PotentialModel, info: ddp.DistInfo) -> Any:
    """``train.compile``: the model's compiled energy/forces/stress function (:mod:`mlip.models.compile`),
    or a :class:`ConfigError` where it cannot work. Batches are padded to the most structures in one
    batch, so that one compiled graph serves them all."""
    from mlip.models.compile import CompiledPotential, compile_problem

    why = compile_problem(model, training=True)
    if why is None and info.world_size > 1:
        why = ("several processes (DDP) synchronise gradients in their own forward, which the compiled "
               "function bypasses")
    if why is not None:
        raise ConfigError(f"train.compile: {why}; set train.compile: false")
    most = max((len(p) for p in _batches(data.train, cfg, 0, shuffle=True)), default=1)
    log.info("train.compile: the first step traces and compiles the energy/forces/stress function "
             "(minutes on a CPU)")
    return CompiledPotential(model, training=True, min_graphs=most)


def _test_metrics(state: RunState, model_path: Path) -> None:
    from mlip.train.evaluate import evaluate_split

    model = load_model(model_path, map_location=state.dist.device)
    b = state.cfg.batch  # the validation batches' bounds
    result = evaluate_split(model, state.data.test, b.valid_max_atoms or b.max_atoms, max_edges=b.max_edges,
                            max_graphs=b.max_graphs)
    (state.out / "test_metrics.json").write_text(json.dumps(result, indent=2))
    log.info("test: %s", format_summary(result))


def _r_max(cfg: TrainConfig) -> float:
    """The cutoff the data's neighbour lists need: the model section's, else the family default."""
    if "r_max" in cfg.model:
        return float(cfg.model["r_max"])
    if cfg.train.init_from:  # the file's config alone: no model is built (nor its kernel checked) here
        payload = load_torch_file(cfg.train.init_from, "model file", ("family", "config"))
        return float(payload["config"]["r_max"])
    return float(model_class(cfg.model["family"]).Config().r_max)


def _enable_tf32(info: ddp.DistInfo) -> None:
    """The only reduced precision used: TF32 matmuls on CUDA (float32 storage and sums).
    Energies summed over many atoms need float32 accumulation, so bf16/fp16 autocast is not offered."""
    if info.device.type != "cuda":
        log.warning("train.amp has no effect on %s (TF32 matmuls exist only on CUDA)", info.device)
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
