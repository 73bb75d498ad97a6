"""Training loop: loss masking, schedules, outputs, exact resume, NaN handling, fine-tuning, CLI."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import toy_models
from mlip.data.graph import collate
from mlip.models.base import load_model
from mlip.train.checkpoint import load_checkpoint
from mlip.train.config import config_from_mapping
from mlip.train.loop import LRSchedule, TrainingDiverged, train
from mlip.train.loss import LossWeights, combine, loss_sums, weights_at_epoch

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def emt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "emt.xyz"
    toy_models.write_emt_data(path, n=12, seed=0)
    return path


def _cfg(tmp_path, data, **over):
    base = {
        "output_dir": str(tmp_path / "run"),
        "dtype": "float64",
        "device": "cpu",
        "num_threads": 1,
        "model": {"family": "toy-pair", "r_max": 3.0},
        "data": {"train": str(data), "valid_fraction": 0.25},
        "batch": {"max_atoms": 16},
        "optim": {"lr": 0.05, "warmup_steps": 2},
        "train": {"epochs": 4, "progress": False},
    }
    for key, value in over.items():
        node = base
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_mapping(base)


def _params(path):
    return load_checkpoint(path)["model"]


def _steps(run):
    return [json.loads(l) for l in (Path(run) / "steps.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- units
def test_loss_masks_missing_labels_and_applies_weights():
    fa, fb = _two_frames()
    g1, g2 = toy_models.graph_from_atoms(fa, 3.0), toy_models.graph_from_atoms(fb, 3.0)
    g2.energy = torch.tensor(float("nan"), dtype=torch.float64)  # unlabelled energy
    g1.weight = torch.tensor(2.0, dtype=torch.float64)
    batch = collate([g1, g2])
    pred = {"energy": batch.energy.nan_to_num(0.0) + torch.tensor([0.4, 5.0], dtype=torch.float64),
            "forces": batch.forces + 0.1, "stress": batch.stress.nan_to_num(0.0)}
    sums, counts = loss_sums(pred, batch)
    n1 = g1.n_atoms
    assert counts["energy"] == 1 and counts["forces"] == 3 * batch.n_atoms and counts["stress"] == 9
    assert sums["energy"].item() == pytest.approx(2.0 * (0.4 / n1) ** 2)
    assert sums["forces"].item() == pytest.approx(0.01 * 3 * (2.0 * n1 + g2.n_atoms))
    assert sums["stress"].item() == pytest.approx(0.0)
    total, terms = combine(sums, counts, LossWeights(1.0, 10.0, 100.0))
    assert total.item() == pytest.approx(terms["energy"].item() + 10 * terms["forces"].item())
    hsums, _ = loss_sums(pred, batch, kind="huber", delta=0.05)
    # forces errors 0.1 > delta: Huber is linear there, delta * (|d| - delta / 2)
    assert hsums["forces"].item() == pytest.approx(0.05 * 0.075 * 3 * (2.0 * n1 + g2.n_atoms))


def _two_frames():
    from ase.build import bulk

    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.05, seed=1)
    a.info.update(energy=-1.0, stress=[[0.01, 0, 0], [0, 0.01, 0], [0, 0, 0.01]])
    a.arrays["forces"] = a.positions * 0.0
    b = a.copy()
    b.pbc = False
    b.info.pop("stress")
    b.arrays["forces"] = a.positions * 0.0
    return a, b


def test_stage_two_raises_the_energy_weight_late():
    cfg = config_from_mapping({"model": {"family": "toy-pair"}, "data": {"train": "x"},
                               "loss": {"stage_two": {"start_epoch": 3, "energy_weight": 500.0}}})
    assert weights_at_epoch(cfg.loss, 2).energy == 1.0
    assert weights_at_epoch(cfg.loss, 3).energy == 500.0


def test_warmup_then_cosine_schedule():
    cfg = config_from_mapping({"model": {"family": "toy-pair"}, "data": {"train": "x"},
                               "optim": {"lr": 1.0, "warmup_steps": 4, "min_lr_ratio": 0.0}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, cfg.optim, total_steps=14)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(14):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.5)  # half way through the cosine part
    assert lrs[14] == pytest.approx(0.0, abs=1e-12)


def test_plateau_schedule_cuts_the_rate_after_patience_and_stage_two_pins_it():
    cfg = config_from_mapping({"model": {"family": "toy-pair"}, "data": {"train": "x"},
                               "optim": {"lr": 1.0, "scheduler": "plateau", "plateau_patience": 2,
                                         "plateau_factor": 0.1}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, cfg.optim, total_steps=10)
    for loss in (1.0, 0.5, 0.6, 0.6):  # two validations without improvement: still within patience
        sched.on_validation(loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    sched.on_validation(0.7)  # the third: cut
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    sched.set_override(0.01)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    again = LRSchedule(opt, cfg.optim, total_steps=10)
    again.load_state_dict(sched.state_dict())
    assert again.lr() == sched.lr()


# ----------------------------------------------------------------------------- runs
def test_training_writes_outputs_and_learns(tmp_path, emt_file):
    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 5, "data.test_fraction": 0.15})
    path = train(cfg)
    run = Path(cfg.output_dir)
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "steps.jsonl",
                 "learning_curve.png", "model.pt", "train.log", "test_metrics.json"):
        assert (run / name).exists(), name
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["valid_loss"] < 0.8 * rows[0]["valid_loss"]
    assert rows[-1]["valid_forces_mae"] < 0.6 * rows[0]["valid_forces_mae"]
    assert rows[-1]["valid_energy_per_atom_mae"] < 0.3  # eV/atom; E0s + shift put it within reach
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 6
    # E0s came from the isolated atoms in the file; shift is the mean per-atom energy left over
    model = load_model(path)
    iso = {int(a.numbers[0]): a.info["energy"] for a in toy_models.write_emt_data(tmp_path / "i.xyz", n=0)}
    assert {int(z): v for z, v in model.config.e0s.items()} == pytest.approx(iso, abs=1e-12)
    assert -5.0 < model.config.shift < -1.0  # EMT crystals lie ~3 eV/atom below the isolated atoms
    # model.pt holds the EMA weights of best.pt
    best = load_checkpoint(run / "best.pt")
    for k, v in best["ema"]["shadow"].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert json.loads((run / "test_metrics.json").read_text())["forces_mae"] > 0


RESUME = {"train.checkpoint_every_steps": 2, "train.epochs": 3}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, emt_file):
    """An uninterrupted run that the interrupted-and-resumed runs must reproduce."""
    cfg = _cfg(tmp_path_factory.mktemp("ref"), emt_file, **RESUME)
    train(cfg)
    return Path(cfg.output_dir)


def _assert_same_run(ref: Path, run: Path) -> None:
    a, b = _params(ref / "last.pt"), _params(run / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = load_checkpoint(ref / "last.pt")["ema"]["shadow"], load_checkpoint(run / "last.pt")["ema"]["shadow"]
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    assert [s["loss"] for s in _steps(ref)] == [s["loss"] for s in _steps(run)]
    strip = lambda p: [{k: v for k, v in json.loads(r).items() if k != "time_s"}  # noqa: E731
                       for r in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(ref) == strip(run)


@pytest.mark.parametrize("interrupt", ["epoch", "mid_epoch"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, emt_file, reference_run, interrupt):
    cfg = _cfg(tmp_path / "cut", emt_file, **RESUME)

    def stop_epoch(state):
        if state.epoch == 2:
            raise KeyboardInterrupt

    def stop_step(state):
        if state.step == 7:  # last.pt holds step 6: one step of work is lost and redone
            raise KeyboardInterrupt

    hooks = {"epoch": stop_epoch} if interrupt == "epoch" else {"step": stop_step}
    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks=hooks)
    saved = load_checkpoint(Path(cfg.output_dir) / "last.pt")
    if interrupt == "epoch":
        assert saved["epoch"] == 2 and saved["step_in_epoch"] == 0
    else:
        assert saved["step"] == 6 and saved["step_in_epoch"] > 0  # inside an epoch
    train(cfg, resume=True)
    _assert_same_run(reference_run, Path(cfg.output_dir))


def test_run_killed_by_signal_resumes_to_the_same_result(tmp_path, emt_file, reference_run):
    """A separate process is SIGKILLed mid-training; resuming gives the uninterrupted result."""
    cfg = _cfg(tmp_path / "cut", emt_file, **RESUME)
    cfg_path = tmp_path / "cut.yaml"
    from mlip.train.config import save_config

    save_config(cfg, cfg_path)
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MLIP_TOY_STEP_SLEEP": "0.2"}  # slow steps down so the kill lands mid-run
    proc = subprocess.Popen([sys.executable, str(HERE / "toy_models.py"), "train", str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = Path(cfg.output_dir) / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["step"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["step"]
    assert 2 <= killed_at < load_checkpoint(reference_run / "last.pt")["step"]  # killed mid-run
    train(cfg, resume=True)
    _assert_same_run(reference_run, Path(cfg.output_dir))


def test_nonfinite_step_is_skipped_and_logged(tmp_path, emt_file):
    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 2})
    seen = {}

    def poison(state, batch):
        if state.step == 3:
            seen["before"] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
            batch.positions[0, 0] = float("nan")
        return batch

    def after(state):
        if state.step == 4:  # the step counter advanced, the weights did not
            for k, v in state.model.state_dict().items():
                assert torch.equal(v, seen["before"][k]), k

    train(cfg, hooks={"batch": poison, "step": after})
    run = Path(cfg.output_dir)
    assert "non-finite loss" in (run / "train.log").read_text()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_steps"] == 1 and rows[1]["skipped_steps"] == 0
    assert [s["loss"] for s in _steps(run)][3] is None
    assert all(math.isfinite(r["train_loss"]) for r in rows)


def test_repeated_nonfinite_steps_stop_with_a_clear_message(tmp_path, emt_file):
    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 3, "train.max_consecutive_nonfinite": 3})
    n_first = {}

    def poison(state, batch):
        if state.epoch == 1:
            batch.positions[:] = float("nan")
        return batch

    def remember(state):
        if state.epoch == 1 and "ckpt" not in n_first:
            n_first["ckpt"] = load_checkpoint(Path(cfg.output_dir) / "last.pt")

    with pytest.raises(TrainingDiverged, match="3 consecutive steps had a non-finite loss.*last good checkpoint"):
        train(cfg, hooks={"batch": poison, "epoch": remember})
    last = load_checkpoint(Path(cfg.output_dir) / "last.pt")
    assert last["epoch"] == 1 and last["step"] == n_first["ckpt"]["step"]
    for k, v in n_first["ckpt"]["model"].items():
        assert torch.equal(last["model"][k], v)


def test_fine_tuning_starts_from_a_model_and_freezes_parameters(tmp_path, emt_file):
    base = train(_cfg(tmp_path / "a", emt_file, **{"train.epochs": 2}))
    pre = load_model(base).state_dict()
    cfg = _cfg(tmp_path / "b", emt_file, **{"train.epochs": 1, "train.init_from": str(base),
                                            "train.freeze": ["log_beta"], "optim.ema_decay": None,
                                            "train.export_from": "last"})
    seen = {}
    train(cfg, hooks={"batch": lambda s, b: seen.setdefault("w0", {k: v.clone() for k, v in s.model.state_dict().items()}) and b})
    tuned = load_model(Path(cfg.output_dir) / "model.pt").state_dict()
    for k in pre:
        assert torch.equal(seen["w0"][k], pre[k]), k  # started from the pretrained weights
    assert torch.equal(tuned["log_beta"], pre["log_beta"])  # frozen
    assert not torch.equal(tuned["coeff"], pre["coeff"])  # trained


def test_per_dataset_heads_get_their_own_e0s(tmp_path):
    a, b = tmp_path / "a.xyz", tmp_path / "b.xyz"
    toy_models.write_emt_data(a, n=4, seed=1)
    frames = toy_models.write_emt_data(b, n=4, seed=2)
    for atoms in frames:  # dataset b: a different reference (shifted energies per atom)
        atoms.info["energy"] += 1.5 * len(atoms)
    from ase.io import write

    write(b, frames, format="extxyz")
    cfg = _cfg(tmp_path, a, **{"data.train": [{"path": str(a), "head": "pbe"}, {"path": str(b), "head": "r2scan"}],
                               "data.valid_fraction": 0.0, "train.epochs": 1})
    model = load_model(train(cfg))
    assert model.config.heads == ["pbe", "r2scan"]
    e0 = {h: {int(z): v for z, v in t.items()} for h, t in model.config.e0s.items()}
    assert e0["r2scan"][29] - e0["pbe"][29] == pytest.approx(1.5)
    assert e0["r2scan"][47] - e0["pbe"][47] == pytest.approx(1.5)


def test_cli_train_runs_and_rejects_unknown_keys(tmp_path, emt_file):
    from mlip.cli.main import main

    cfg = _cfg(tmp_path, emt_file)
    from mlip.train.config import save_config

    save_config(cfg, tmp_path / "c.yaml")
    bad = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "--set", "optim.learning_rate=0.1"])
    assert bad.exit_code != 0 and "did you mean 'optim.lr'" in bad.output
    ok = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "--set", "train.epochs=1"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "run" / "model.pt").exists()
    again = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "--set", "train.epochs=1"])
    assert again.exit_code != 0 and "--resume" in again.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1


def _families():
    from mlip.models.base import MODELS, _import_families

    _import_families()
    return sorted(MODELS)


@pytest.mark.parametrize("family", _families())
def test_every_registered_family_trains_through_the_same_loop(tmp_path, family):
    from mlip.models.base import MODELS

    data = tmp_path / "tiny.xyz"
    toy_models.write_emt_data(data, n=4, seed=5)
    cfg = _cfg(tmp_path, data, **{"model": {"family": family, "r_max": 3.0}, "train.epochs": 1,
                                  "data.valid_fraction": 0.25})
    model = load_model(train(cfg))
    assert model.family == family
    atoms = toy_models.write_emt_data(tmp_path / "one.xyz", n=1, seed=9, isolated=False)[0]
    from mlip.models.outputs import predict

    out = predict(model, collate([toy_models.graph_from_atoms(atoms, 3.0)]).to(dtype=torch.float64))
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    row = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    exact = getattr(MODELS[family], "exactly_equivariant", False)
    # validation measures the rotation-equivariance error exactly for the families not exact by construction
    assert ("valid_equivariance_forces_rel" in row) == (not exact)


def test_streamed_hdf5_and_worker_processes_give_the_same_run(tmp_path, emt_file):
    """Training from mlip's HDF5 (read structure by structure, nothing cached) and with
    DataLoader workers follows the in-memory run step for step."""
    from mlip.data.formats import iter_read, write_hdf5

    h5 = tmp_path / "emt.h5"
    write_hdf5(iter_read(emt_file), h5)
    over = {"train.epochs": 1, "optim.ema_decay": None}
    ref = _cfg(tmp_path / "xyz", emt_file, **over)
    train(ref)
    streamed = _cfg(tmp_path / "h5", h5, **over, **{"data.num_workers": 1})
    seen = set()

    def no_cache(state, batch):
        seen.add(len(state.data.train.dataset.cache))
        return batch

    train(streamed, hooks={"batch": no_cache})
    assert seen == {0}  # the HDF5 source was never held in memory
    a = [s["loss"] for s in _steps(ref.output_dir)]
    b = [s["loss"] for s in _steps(streamed.output_dir)]
    assert b == pytest.approx(a, rel=1e-12)
