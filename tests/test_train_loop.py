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
    png = (run / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
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


@pytest.mark.parametrize("model", [
    {"family": "toy-pair", "r_max": 3.0},
    {"family": "equivariant", "r_max": 3.0, "num_channels": 8, "lmax": 1, "num_layers": 1, "correlation": 2},
], ids=lambda m: m["family"])
def test_per_dataset_heads_get_their_own_e0s(tmp_path, model):
    a, b = tmp_path / "a.xyz", tmp_path / "b.xyz"
    toy_models.write_emt_data(a, n=4, seed=1)
    frames = toy_models.write_emt_data(b, n=4, seed=2)
    for atoms in frames:  # dataset b: a different reference (shifted energies per atom)
        atoms.info["energy"] += 1.5 * len(atoms)
    from ase.io import write

    write(b, frames, format="extxyz")
    cfg = _cfg(tmp_path, a, **{"data.train": [{"path": str(a), "head": "pbe"}, {"path": str(b), "head": "r2scan"}],
                               "data.valid_fraction": 0.0, "train.epochs": 1, "model": model})
    net = load_model(train(cfg))
    assert net.config.heads == ["pbe", "r2scan"]
    e0 = {h: {int(z): v for z, v in t.items()} for h, t in net.config.e0s.items()}
    assert e0["r2scan"][29] - e0["pbe"][29] == pytest.approx(1.5)
    assert e0["r2scan"][47] - e0["pbe"][47] == pytest.approx(1.5)
    # one structure, two heads: the prediction follows each dataset's reference
    from mlip.models.outputs import predict

    atoms = frames[1]
    graphs = []
    for head in ("pbe", "r2scan"):
        atoms.info["head"] = head
        graphs.append(toy_models.graph_from_atoms(atoms, 3.0))
    energy = predict(net, collate(graphs).to(dtype=torch.float64), forces=False)["energy"].detach()
    assert float(energy[1] - energy[0]) == pytest.approx(1.5 * len(atoms), abs=0.3 * len(atoms))


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
    data = tmp_path / "tiny.xyz"
    toy_models.write_emt_data(data, n=4, seed=5)
    cfg = _cfg(tmp_path, data, **{"model": {"family": family, "r_max": 3.0}, "train.epochs": 2,
                                  "data.valid_fraction": 0.25, "optim.lr": 0.01})
    model = load_model(train(cfg))
    assert model.family == family
    rows = [json.loads(l) for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # a few steps of the shared loop learn
    atoms = toy_models.write_emt_data(tmp_path / "one.xyz", n=1, seed=9, isolated=False)[0]
    from mlip.models.outputs import predict

    out = predict(model, collate([toy_models.graph_from_atoms(atoms, 3.0)]).to(dtype=torch.float64))
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    row = rows[-1]
    exact = getattr(model, "exactly_equivariant", False)  # per instance: may depend on the config
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


# ----------------------------------------------------------------------------- data options
def _frames(n: int, seed: int) -> list:
    """Cu/Ag crystals with made-up labels (no calculator needed)."""
    import numpy as np
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1 + k % 2, 1, 1))
        atoms.numbers[rng.random(len(atoms)) < 0.5] = 47
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out.append(atoms)
    return out


def test_label_keys_split_by_file_and_structure_weights(tmp_path):
    """``data.keys`` reads MACE-style names; ``data.valid``/``data.test`` files are the splits;
    an entry's weight multiplies each structure's own ``weight``."""
    import numpy as np
    from ase.io import write

    from mlip.train.data import build_data

    files = {}
    for name, n in (("train", 6), ("valid", 3), ("test", 2)):
        frames = _frames(n, seed=len(files))
        for k, atoms in enumerate(frames):
            atoms.info["REF_energy"] = -3.0 * len(atoms) + 0.1 * k
            atoms.arrays["REF_forces"] = np.full((len(atoms), 3), 0.01 * k)
            atoms.info["weight"] = 1.0 + k
        files[name] = tmp_path / f"{name}.xyz"
        write(files[name], frames, format="extxyz")
    cfg = _cfg(tmp_path, files["train"], **{
        "data.train": [{"path": str(files["train"]), "weight": 0.5}], "data.valid": str(files["valid"]),
        "data.test": [str(files["test"])], "data.keys": {"energy": "REF_energy", "forces": "REF_forces"},
        "data.e0s": "fit"})
    data = build_data(cfg, r_max=3.0)
    assert (len(data.train), len(data.valid), len(data.test)) == (6, 3, 2)  # nothing split off train
    got = sorted((float(g.energy), float(g.weight), float(g.forces[0, 0])) for g in (data.train[k] for k in range(6)))
    want = sorted((-3.0 * (4 * (1 + k % 2)) + 0.1 * k, 0.5 * (1.0 + k), 0.01 * k) for k in range(6))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-12, atol=1e-12)
    assert sorted(float(data.valid[k].weight) for k in range(3)) == [1.0, 2.0, 3.0]


def test_e0s_fitted_isolated_or_given(tmp_path):
    """``fit`` recovers per-element energies that explain the data exactly; ``isolated`` without
    single atoms is an error naming the element; a mapping by symbol is taken as given."""
    from ase.io import write

    from mlip.train.config import ConfigError
    from mlip.train.data import build_data

    e0 = {29: -3.25, 47: -2.5}
    frames = _frames(6, seed=4)
    for atoms in frames:
        atoms.info["energy"] = sum(e0[int(z)] for z in atoms.numbers)
    path = tmp_path / "lin.xyz"
    write(path, frames, format="extxyz")
    for spec in ("auto", "fit"):  # auto: no isolated atoms in the file, so a fit
        data = build_data(_cfg(tmp_path, path, **{"data.e0s": spec}), r_max=3.0)
        assert data.e0s["default"] == pytest.approx(e0, abs=1e-9)
        assert data.shift == pytest.approx(0.0, abs=1e-9)  # nothing left after the E0s
    with pytest.raises(ConfigError, match=r"no single-atom structure.*\['Cu', 'Ag'\]"):
        build_data(_cfg(tmp_path, path, **{"data.e0s": "isolated"}), r_max=3.0)
    data = build_data(_cfg(tmp_path, path, **{"data.e0s": {"Cu": -1.0, "Ag": -2.0}}), r_max=3.0)
    assert data.e0s["default"] == {29: -1.0, 47: -2.0}


def test_streamed_hdf5_reads_one_structure_at_a_time(tmp_path, emt_file, monkeypatch):
    """No read of a per-atom HDF5 array returns more rows than the largest structure: the file
    is never loaded whole (index arrays of one number per structure are allowed)."""
    import h5py
    import numpy as np

    from mlip.data.formats import iter_read, write_hdf5

    h5 = tmp_path / "emt.h5"
    write_hdf5(iter_read(emt_file), h5)
    with h5py.File(h5) as f:
        offsets = f["offsets"][:]
    total, largest = int(offsets[-1]), int(np.diff(offsets).max())
    assert total > 4 * largest
    rows: list[int] = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):  # noqa: ANN001, ANN202
        out = original(self, key)
        if self.shape and self.shape[0] == total:  # a per-atom array (positions, forces, numbers)
            rows.append(len(out) if np.ndim(out) else 1)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    train(_cfg(tmp_path, h5, **{"train.epochs": 1}))
    assert rows and max(rows) <= largest


# ----------------------------------------------------------------------------- optimiser options
def test_adam_float32_grad_clipping_and_edge_bounded_batches(tmp_path, emt_file):
    cfg = _cfg(tmp_path, emt_file, **{"dtype": "float32", "optim.optimizer": "adam", "optim.clip_grad_norm": 1e-3,
                                      "batch.max_atoms": None, "batch.max_edges": 150, "train.epochs": 1,
                                      "train.amp": True, "data.test_fraction": 0.2})
    seen = {"edges": [], "norms": []}

    def on_batch(state, batch):
        assert type(state.optimizer) is torch.optim.Adam
        assert batch.positions.dtype == torch.float32
        seen["edges"].append((batch.n_edges, batch.n_graphs))
        return batch

    def on_step(state):  # gradients after the step are the clipped ones
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        seen["norms"].append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    model = load_model(train(cfg, hooks={"batch": on_batch, "step": on_step}))
    assert all(e <= 150 or g == 1 for e, g in seen["edges"]) and max(g for _, g in seen["edges"]) > 1
    assert max(seen["norms"]) <= 1e-3 * (1 + 1e-5)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # mixed precision exists only as TF32 matmuls on CUDA: on the CPU the run says so and is unchanged
    assert "train.amp has no effect on cpu" in (Path(cfg.output_dir) / "train.log").read_text()
    # the test split is evaluated in batches under the same edge bound
    assert json.loads((Path(cfg.output_dir) / "test_metrics.json").read_text())["n_structures"] == 2


def test_stage_two_switches_loss_weights_and_learning_rate(tmp_path, emt_file):
    """From ``stage_two.start_epoch`` the step loss uses the stage-two weights and the pinned rate."""
    from mlip.models.outputs import predict

    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 2, "optim.ema_decay": None,
                                      "loss.stage_two": {"start_epoch": 1, "energy_weight": 1000.0,
                                                         "forces_weight": 3.0, "stress_weight": 7.0, "lr": 1e-3}})
    expected = {}

    def on_batch(state, batch):
        if state.step_in_epoch == 0:  # first step of each epoch: the loss before the update
            pred = predict(state.model, batch, forces=True, stress=True)
            sums, counts = loss_sums(pred, batch)
            w = LossWeights(1000.0, 3.0, 7.0) if state.epoch == 1 else LossWeights(1.0, 10.0, 100.0)
            expected[state.step] = float(combine(sums, counts, w)[0].detach())
        return batch

    train(cfg, hooks={"batch": on_batch})
    steps = _steps(cfg.output_dir)
    assert len(expected) == 2
    for step, loss in expected.items():
        assert steps[step]["loss"] == pytest.approx(loss, rel=1e-10)
    first_two = min(s for s in expected if s > 0)
    assert all(s["lr"] == 1e-3 for s in steps[first_two:]) and all(s["lr"] != 1e-3 for s in steps[:first_two])


def test_validation_scores_the_ema_weights(tmp_path, emt_file):
    from mlip.train.loop import validate

    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 2, "optim.ema_decay": 0.9})
    checked = []

    def on_epoch(state):
        row = state.history[-1]
        w = LossWeights(cfg.loss.energy_weight, cfg.loss.forces_weight, cfg.loss.stress_weight)
        with state.ema.swapped():
            averaged = validate(state, state.data.valid, w)["loss"]
        raw = validate(state, state.data.valid, w)["loss"]
        assert averaged == pytest.approx(row["valid_loss"], rel=1e-12)
        assert abs(raw - averaged) > 1e-6 * averaged
        checked.append(row["epoch"])

    train(cfg, hooks={"epoch": on_epoch})
    assert checked == [1, 2]


# ----------------------------------------------------------------------------- logging
def test_progress_bar_shows_live_loss_and_validation_errors(tmp_path, emt_file, capfd):
    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 2, "train.progress": True})
    train(cfg)
    out, err = capfd.readouterr()
    text = out + err
    assert "epoch 2/2" in text and "loss=" in text and "lr=" in text
    assert "val F=" in text and "val E/at=" in text  # validation errors of the previous epoch, live
    assert "epoch 1: train loss" in text and "valid loss" in text and "F MAE" in text


def test_tensorboard_receives_epoch_scalars_when_installed(tmp_path, emt_file, monkeypatch):
    """TensorBoard is optional: with a ``SummaryWriter`` importable, every epoch's metrics go to it."""
    import types

    scalars = []

    class Writer:
        def __init__(self, log_dir):  # noqa: ANN001
            scalars.append(("dir", log_dir, None))

        def add_scalar(self, tag, value, step):  # noqa: ANN001
            scalars.append((tag, value, step))

        def close(self):
            scalars.append(("closed", None, None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 2})
    train(cfg)
    assert scalars[0] == ("dir", str(Path(cfg.output_dir) / "tensorboard"), None) and scalars[-1][0] == "closed"
    rows = [json.loads(l) for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert ("valid/loss", row["valid_loss"], row["epoch"]) in scalars
        assert ("valid/forces_mae", row["valid_forces_mae"], row["epoch"]) in scalars


# ----------------------------------------------------------------------------- CLI
def test_cli_resume_init_from_freeze_and_clear_errors(tmp_path, emt_file):
    from mlip.cli.main import main
    from mlip.train.config import save_config

    run = CliRunner()
    save_config(_cfg(tmp_path, emt_file, **{"train.epochs": 1}), tmp_path / "c.yaml")
    assert run.invoke(main, ["train", str(tmp_path / "c.yaml")]).exit_code == 0
    more = run.invoke(main, ["train", str(tmp_path / "c.yaml"), "--resume", "--set", "train.epochs=2"])
    assert more.exit_code == 0, more.output
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2

    base = str(tmp_path / "run" / "model.pt")
    tuned = run.invoke(main, ["train", str(tmp_path / "c.yaml"), "--init-from", base, "--freeze", "coeff",
                              "--set", f"output_dir={tmp_path / 'ft'}"])
    assert tuned.exit_code == 0, tuned.output
    assert torch.equal(load_model(tmp_path / "ft" / "model.pt").coeff, load_model(base).coeff)
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["train"]["freeze"] == ["coeff"]

    # mistakes found while building data and model: one line naming the key, no traceback
    for args, fragment in (
        (["--set", "data.e0s=isolated", "--set", f"data.train={tmp_path / 'noiso.xyz'}"], "no single-atom structure"),
        (["--init-from", base, "--freeze", "nonexistent*"], "matches no parameter"),
        (["--set", "data.train=missing.xyz"], "missing.xyz"),
        (["--set", "data.keys.energyy=E"], "did you mean 'data.keys.energy'"),
    ):
        toy_models.write_emt_data(tmp_path / "noiso.xyz", n=4, isolated=False)
        bad = run.invoke(main, ["train", str(tmp_path / "c.yaml"), "--set", f"output_dir={tmp_path / 'bad'}", *args])
        assert bad.exit_code != 0 and fragment in bad.output, (args, bad.output)
        assert "Traceback" not in bad.output and not isinstance(bad.exception, (ValueError, KeyError))


def test_cli_reports_divergence_in_one_clear_line(tmp_path, emt_file):
    from mlip.cli.main import main
    from mlip.train.config import save_config

    save_config(_cfg(tmp_path, emt_file, **{"train.epochs": 2, "optim.lr": 1e300, "optim.warmup_steps": 0,
                                            "optim.clip_grad_norm": None, "optim.ema_decay": None,
                                            "train.max_consecutive_nonfinite": 2}), tmp_path / "c.yaml")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1 and "training stopped: 2 consecutive steps" in result.output
    assert "last good checkpoint" in result.output and "lower optim.lr" in result.output
    assert "Traceback" not in result.output


def test_resume_restores_the_rng_of_a_family_that_draws_random_rotations(tmp_path, emt_file, monkeypatch):
    """learned-equivariance draws a random rotation per structure and step in training, so only a
    restored RNG reproduces the uninterrupted run; without it (control) the weights differ."""
    from mlip.train import checkpoint

    small = {"model": {"family": "learned-equivariance", "r_max": 3.0, "num_channels": 8, "num_heads": 2,
                       "num_layers": 1, "readout_hidden": 8, "transform_hidden": 8, "num_radial": 4},
             "train.epochs": 2, "train.checkpoint_every_steps": 1, "optim.lr": 0.01}
    ref = _cfg(tmp_path / "ref", emt_file, **small)
    train(ref)

    def stop(state):
        if state.step == 3:  # mid-epoch; last.pt holds step 3
            raise KeyboardInterrupt

    cut = _cfg(tmp_path / "cut", emt_file, **small)
    with pytest.raises(KeyboardInterrupt):
        train(cut, hooks={"step": stop})
    control = _cfg(tmp_path / "control", emt_file, **small)
    import shutil

    shutil.copytree(cut.output_dir, control.output_dir)
    assert load_checkpoint(Path(cut.output_dir) / "last.pt")["step_in_epoch"] > 0
    train(cut, resume=True)
    _assert_same_run(Path(ref.output_dir), Path(cut.output_dir))

    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
    train(control, resume=True)
    a, b = _params(Path(ref.output_dir) / "last.pt"), _params(Path(control.output_dir) / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_write_that_dies_leaves_the_previous_one_intact(tmp_path, emt_file, monkeypatch):
    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 2})
    real_save = torch.save

    def dying_save(obj, fh, *args, **kwargs):  # noqa: ANN001
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    def after_epoch(state):
        if state.epoch == 1:
            monkeypatch.setattr(torch, "save", dying_save)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks={"epoch": after_epoch})
    monkeypatch.setattr(torch, "save", real_save)
    run = Path(cfg.output_dir)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    train(cfg, resume=True)  # and the run continues from it
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_an_epoch_of_skipped_steps_has_no_training_loss_and_never_ranks_best(tmp_path, emt_file):
    """Without a validation set the training loss ranks checkpoints: an epoch whose every step was
    skipped reports NaN (not 0) and leaves ``best.pt`` alone."""
    cfg = _cfg(tmp_path, emt_file, **{"train.epochs": 2, "data.valid_fraction": 0.0,
                                      "train.max_consecutive_nonfinite": 1000})

    def poison(state, batch):
        if state.epoch == 1:
            batch.positions[:] = float("nan")
        return batch

    train(cfg, hooks={"batch": poison})
    rows = [json.loads(l) for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[0]["train_loss"]) and math.isnan(rows[1]["train_loss"])
    assert rows[1]["skipped_steps"] == rows[1]["step"] - rows[0]["step"] > 0
    assert load_checkpoint(Path(cfg.output_dir) / "best.pt")["epoch"] == 1


def test_validation_runs_the_model_in_eval_mode(tmp_path, emt_file):
    """frame-averaged trains on one random frame per structure but validates on all frames: the
    validation numbers are deterministic and the model is back in training mode afterwards."""
    from mlip.train.loop import validate

    cfg = _cfg(tmp_path, emt_file, **{"model": {"family": "frame-averaged", "r_max": 3.0, "num_channels": 8,
                                                "num_layers": 1}, "train.epochs": 1, "optim.ema_decay": None})
    seen = []

    def on_epoch(state):
        w = LossWeights(1.0, 10.0, 100.0)
        state.model.train()
        first, second = validate(state, state.data.valid, w), validate(state, state.data.valid, w)
        assert state.model.training
        assert first["loss"] == second["loss"] == state.history[-1]["valid_loss"]
        seen.append(first["loss"])

    train(cfg, hooks={"epoch": on_epoch})
    assert len(seen) == 1


def test_validation_measures_equivariance_when_the_config_makes_a_family_approximate(tmp_path, emt_file):
    """``equivariant`` is exact with its default grid activation and approximate with SiLU; the
    loop follows the instance, so only the SiLU run logs the measured rotation error."""
    # two layers: the first keeps l = 1 features, which is where a SiLU grid breaks exactness
    small = {"family": "equivariant", "r_max": 3.0, "num_channels": 8, "lmax": 1, "num_layers": 2,
             "correlation": 2}
    logged = {}
    for activation in ("quadratic", "silu"):
        cfg = _cfg(tmp_path / activation, emt_file, **{"model": {**small, "grid_activation": activation},
                                                      "train.epochs": 1, "dtype": "float32"})
        model = load_model(train(cfg))
        row = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        logged[activation] = (model.exactly_equivariant, "valid_equivariance_forces_rel" in row)
    assert logged == {"quadratic": (True, False), "silu": (False, True)}


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_charge_and_spin_in_the_data_switch_the_model_on_unless_told_otherwise(tmp_path, setting):
    """OMol25-style data (every structure has a total charge and spin) train a model that uses and
    requires them, unless the config says ``use_charge_spin: false``: never a silent neutral singlet."""
    import ase.io

    from mlip.models.outputs import predict

    frames = ase.io.read(Path(__file__).resolve().parents[1] / "data" / "xtb_molecules.xyz", ":40")
    assert all("charge" in a.info and "spin" in a.info for a in frames)
    data = tmp_path / "mol.xyz"
    ase.io.write(data, frames, format="extxyz")
    model_section = {"family": "equivariant", "r_max": 3.0, "num_channels": 4, "lmax": 1, "num_layers": 1}
    if setting == "off":
        model_section["use_charge_spin"] = False
    cfg = _cfg(tmp_path, data, **{"model": model_section, "train.epochs": 1, "data.valid_fraction": 0.2,
                                  "data.test_fraction": 0.0, "data.e0s": "fit"})
    model = load_model(train(cfg))
    assert model.config.use_charge_spin is (setting == "auto")
    mol = next(a for a in frames if len(a) > 2)
    from mlip.data.transforms import atoms_to_graph

    graph = atoms_to_graph(mol, r_max=3.0)
    assert math.isfinite(float(graph.charge)) and math.isfinite(float(graph.spin))
    e_given = predict(model, collate([graph]).to(dtype=torch.float64), forces=False)["energy"]
    assert torch.isfinite(e_given).all()
    graph.charge = torch.tensor(float("nan"), dtype=torch.float64)
    graph.spin = torch.tensor(float("nan"), dtype=torch.float64)
    if setting == "auto":
        with pytest.raises(ValueError, match="charge"):
            predict(model, collate([graph]).to(dtype=torch.float64), forces=False)
    else:
        e_missing = predict(model, collate([graph]).to(dtype=torch.float64), forces=False)["energy"]
        assert torch.equal(e_missing, e_given)
