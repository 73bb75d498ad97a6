"""Accuracy benchmark on real DFT data: every mlip family and mace-torch's MACE trained on rMD17
ethanol with the same budget of process CPU time, tested on held-out MD frames.

The data are not shipped with mlip: they are the rMD17 ethanol files (PBE/def2-SVP) of
davkovacs/BOTNet-datasets (``train.xyz``, ``test_MD.xyz``, ``isolated_atoms.xyz``); point
``--data-dir`` at a folder holding them. Examples::

    python -m benchmarks accuracy --data-dir ../shared/data/ethanol --budget-cpu-min 2.5
    python benchmarks/accuracy.py --models equivariant mace --mace-python /path/to/mace-venv/bin/python
    python benchmarks/accuracy.py --report           # table + learning curves of finished runs only
    python benchmarks/accuracy.py --rescore          # recompute test errors from the saved models
    python -m benchmarks accuracy --mean-of benchmarks/results benchmarks/results/accuracy_repeat \
        benchmarks/results/accuracy_seed1_2026-12-07 benchmarks/results/accuracy_seed2_2026-12-07
                                                     # mean errors of repeated runs (seeds, repeats)

Protocol (the same for every model):

- data: the 1000 ``train.xyz`` frames (5 % held out for validation, which picks the exported
  checkpoint), E0s from ``isolated_atoms.xyz``; test on the first ``--n-test`` frames of
  ``test_MD.xyz`` (all 1000 by default);
- loss: per-atom energy MSE (weight 1) + force-component MSE (weight 100); batches of 10 molecules
  (90 atoms); EMA of the weights (decay 0.99), exported from the best validation epoch; float32;
- budget: ``--budget-cpu-min`` minutes of *process CPU time* of the training (data preparation
  excluded, validation included), one thread. On a shared machine wall-clock time depends on the
  other load; CPU time does not count the time spent waiting for a core, so equal CPU budgets are
  fair between runs made at different loads. The load average is recorded per run.

mlip models train through :func:`mlip.train.loop.train` with ``train.time_budget_s``; the loop's
clock is switched to the process CPU clock through its ``hooks`` (``_CpuClock``), so the cosine
learning-rate schedule also follows CPU time. MACE (``mace_run_train``, run with ``--mace-python``,
a Python that has mace-torch) is stopped when its process has used the same CPU time after its
"Started training" line; its last checkpoint (EMA weights of the best validation epoch, as MACE
keeps it) is turned into a model by a second ``mace_run_train --restart_latest`` call that does
not train, and predicted with ``mace_eval_configs``. Errors of all models are computed here by the
same function (:func:`errors`).

Outputs in ``--results`` (default ``benchmarks/results``): ``accuracy-<model>.json`` per run,
``accuracy.json`` (all runs), ``accuracy_learning_curves.png``; run folders (checkpoints, models,
logs) in ``--work`` (default ``runs/accuracy``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from benchmarks import _common as common
except ImportError:  # run as a script: python benchmarks/accuracy.py
    import _common as common  # type: ignore[no-redef]

ROOT = common.ROOT
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ethanol"

#: the models compared: mlip family + model-section overrides of its ``small`` preset, or MACE
MODELS: dict[str, dict] = {
    "equivariant": {"family": "equivariant", "lr": 0.01},
    "frame-averaged": {"family": "frame-averaged", "lr": 0.01},
    "learned-equivariance": {"family": "learned-equivariance", "lr": 0.005},
    "learned-equivariance-augment": {"family": "learned-equivariance", "lr": 0.005,
                                     "model": {"symmetry_mode": "augment"}},
    "mace": {"family": "mace", "lr": 0.01},
}

#: MACE of a size comparable to the ``equivariant`` small preset (64 channels, l <= 1 features,
#: spherical harmonics l <= 2, correlation 3, 2 interactions, r_max 5 Å)
MACE_ARGS = ["--model=MACE", "--num_channels=64", "--max_L=1", "--max_ell=2", "--correlation=3",
             "--num_interactions=2", "--r_max=5.0", "--num_radial_basis=8"]

#: data splits: train on one part of the data, test on held-out files (:func:`prepare_split`)
SPLITS = ("rmd17", "temperature")

ENERGY_WEIGHT, FORCES_WEIGHT, BATCH_MOLECULES, ATOMS_PER_MOLECULE = 1.0, 100.0, 10, 9
VALID_FRACTION = 0.05


# ------------------------------------------------------------------------------------- helpers
def data_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """``train``, ``isolated_atoms`` and every ``test_*.xyz`` of the ethanol folder, or a clear error."""
    data = Path(data_dir)
    files = {k: data / f"{k}.xyz" for k in ("train", "test_MD", "isolated_atoms")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(
            f"accuracy benchmark: missing {', '.join(missing)}. The benchmark needs the rMD17 ethanol files "
            f"train.xyz, test_MD.xyz and isolated_atoms.xyz (davkovacs/BOTNet-datasets, PBE/def2-SVP); "
            f"pass their folder with --data-dir.")
    files.update({p.stem: p for p in sorted(data.glob("test_*.xyz")) if p.stem != "test_MD"})
    return files


def environment() -> dict:
    """Date, CPU model, core count, torch version and the load average now."""
    import torch

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0]}


def errors(ref_energy: np.ndarray, pred_energy: np.ndarray, n_atoms: np.ndarray, ref_forces: np.ndarray | None,
           pred_forces: np.ndarray) -> dict[str, float]:
    """Energy and force errors (eV, eV/Å), forces over Cartesian components (MACE/NequIP convention);
    no force errors when the reference has no forces (``ref_forces`` None).

    Shapes:
        ref_energy, pred_energy, n_atoms: [n_structures]; ref_forces, pred_forces: [n_atoms_total, 3].

    >>> e = errors(np.array([1.0, 2.0]), np.array([1.5, 2.0]), np.array([2, 2]), np.zeros((4, 3)), np.ones((4, 3)))
    >>> e["energy_mae"], e["energy_per_atom_mae"], e["forces_rmse"], e["energy_mean_error"]
    (0.25, 0.125, 1.0, 0.25)
    """
    de = pred_energy - ref_energy
    out = {"energy_mae": float(np.abs(de).mean()), "energy_rmse": float(np.sqrt(np.mean(de ** 2))),
           # diagnostics: a constant offset (the mean signed error) and the MAE left once it is removed
           "energy_mean_error": float(de.mean()),
           "energy_mae_offset_removed": float(np.abs(de - de.mean()).mean()),
           "energy_per_atom_mae": float(np.abs(de / n_atoms).mean()),
           "energy_per_atom_rmse": float(np.sqrt(np.mean((de / n_atoms) ** 2))),
           "n_structures": len(de), "n_atoms": int(n_atoms.sum())}
    if ref_forces is not None:
        df = (pred_forces - ref_forces).ravel()
        out.update(forces_mae=float(np.abs(df).mean()), forces_rmse=float(np.sqrt(np.mean(df ** 2))))
    return out


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Reference energies [n], atom counts [n] and forces [sum n, 3] (None if the file has none)."""
    from mlip.data.formats.extxyz import iter_extxyz

    frames = list(iter_extxyz(path))
    forces = [a.arrays.get("forces") for a in frames]
    return (np.array([a.info["energy"] for a in frames]), np.array([len(a) for a in frames]),
            None if any(f is None for f in forces) else np.concatenate(forces))


def _frame_blocks(path: Path) -> list[str]:
    """The text of each frame of an extxyz file (count line, comment line, atom lines), unchanged."""
    lines = Path(path).read_text().splitlines(keepends=True)
    blocks, i = [], 0
    while i < len(lines) and lines[i].strip():
        n = int(lines[i])
        blocks.append("".join(lines[i:i + n + 2]))
        i += n + 2
    return blocks


def prepare_split(split: str, files: dict[str, Path], n_test: int, work: Path) -> tuple[Path, dict[str, Path]]:
    """The training file and the named test files of a split (derived files are written under ``work``).

    ``rmd17``: ``train.xyz``; tests ``MD`` (the first ``n_test`` frames of ``test_MD.xyz``) and every
    other ``test_<name>.xyz`` (H_removal, dimers, norm_mode_*: energies only). ``temperature``: the
    2000 frames of ``train.xyz`` and ``test_MD.xyz`` sorted by energy; train on the lowest-energy
    1000, test (``hot``) on the highest-energy 200, which lie above the whole training range.
    """
    work.mkdir(parents=True, exist_ok=True)
    if split == "rmd17":
        blocks = _frame_blocks(files["test_MD"])
        test_md = files["test_MD"]
        if n_test < len(blocks):
            test_md = work / f"test_MD_first{n_test}.xyz"
            test_md.write_text("".join(blocks[:n_test]))
        tests = {"MD": test_md}
        tests.update({k[len("test_"):]: p for k, p in files.items() if k.startswith("test_") and k != "test_MD"})
        return files["train"], tests
    if split != "temperature":
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    from mlip.data.formats.extxyz import iter_extxyz

    blocks = _frame_blocks(files["train"]) + _frame_blocks(files["test_MD"])
    energy = [a.info["energy"] for f in ("train", "test_MD") for a in iter_extxyz(files[f])]
    order = np.argsort(energy, kind="stable")
    train, hot = work / "temperature_train_cool1000.xyz", work / "temperature_test_hot200.xyz"
    train.write_text("".join(blocks[i] for i in order[:1000]))
    hot.write_text("".join(blocks[i] for i in order[-200:]))
    return train, {"hot": hot}


# ---------------------------------------------------------------------------------------- mlip
def score_mlip(model_path: str | os.PathLike, test: Path) -> dict[str, float]:
    """Errors of a saved mlip model on one test file (:func:`errors`), predicted 100 structures at a time."""
    from mlip.data.datasets import open_dataset
    from mlip.data.graph import collate
    from mlip.models.base import load_model
    from mlip.models.outputs import predict

    model = load_model(model_path, map_location="cpu").eval()
    dtype = next(model.parameters()).dtype
    dataset = open_dataset([str(test)], r_max=model.r_max)
    energy, forces = [], []
    for start in range(0, len(dataset), 100):
        batch = collate([dataset[i] for i in range(start, min(start + 100, len(dataset)))]).to(dtype=dtype)
        out = predict(model, batch, forces=True)
        energy.append(out["energy"].detach().double().numpy())
        forces.append(out["forces"].detach().double().numpy())
    ref_e, n_atoms, ref_f = _reference(test)
    return errors(ref_e, np.concatenate(energy), n_atoms, ref_f, np.concatenate(forces))


class _CpuClock:
    """Hooks that make :func:`mlip.train.loop.train` measure its time budget in process CPU seconds.

    The loop stops when ``time.time() - state.started`` exceeds ``train.time_budget_s`` and sets the
    cosine schedule from the same quantity; after every step this moves ``state.started`` so that
    the difference equals the CPU time used since the first batch. ``curve`` collects one row per
    epoch (validation errors, CPU and wall seconds, load average) for the learning curves.
    """

    def __init__(self) -> None:
        self.cpu0: float | None = None
        self.wall0 = 0.0
        self.curve: list[dict] = []

    def batch(self, state: Any, batch: Any) -> Any:
        if self.cpu0 is None:
            self.cpu0, self.wall0 = time.process_time(), time.time()
        return batch

    def step(self, state: Any) -> None:
        state.started = time.time() - (time.process_time() - self.cpu0)

    def epoch(self, state: Any) -> None:
        row = state.history[-1]
        self.curve.append({"epoch": row["epoch"], "step": row["step"], "cpu_s": time.process_time() - self.cpu0,
                           "wall_s": time.time() - self.wall0, "load_average_1min": os.getloadavg()[0],
                           "valid_energy_per_atom_mae": row.get("valid_energy_per_atom_mae"),
                           "valid_forces_mae": row.get("valid_forces_mae")})

    def hooks(self) -> dict:
        return {"batch": self.batch, "step": self.step, "epoch": self.epoch}


def _preset(family: str) -> dict:
    import yaml

    with open(ROOT / "configs" / f"{family}-small.yaml") as fh:
        return dict(yaml.safe_load(fh)["model"])


def run_mlip(name: str, files: dict[str, Path], train_file: Path, tests: dict[str, Path],
             args: argparse.Namespace) -> dict:
    """Train model ``name`` of :data:`MODELS` on ``train_file`` for the CPU budget, evaluate on ``tests``."""
    import torch

    from mlip.models.base import load_model
    from mlip.train.config import apply_override, config_from_mapping
    from mlip.train.evaluate import evaluate_paths
    from mlip.train.loop import train

    spec = MODELS[name]
    out = Path(args.work) / args.split / name
    if out.exists():
        shutil.rmtree(out)
    settings = {
        "output_dir": str(out), "seed": args.seed, "dtype": "float32", "device": "cpu",
        "num_threads": args.threads,
        "model": {**_preset(spec["family"]), **spec.get("model", {})},
        "data": {"train": [str(train_file), str(files["isolated_atoms"])], "valid_fraction": VALID_FRACTION,
                 "e0s": "isolated"},
        "batch": {"max_atoms": BATCH_MOLECULES * ATOMS_PER_MOLECULE},
        "loss": {"energy_weight": ENERGY_WEIGHT, "forces_weight": FORCES_WEIGHT, "stress_weight": 0.0},
        "optim": {"optimizer": "adamw", "lr": spec["lr"], "scheduler": "cosine", "warmup_steps": 50,
                  "ema_decay": 0.99},
        "train": {"epochs": 100000, "time_budget_s": 60.0 * args.budget_cpu_min, "eval_every_epochs": 1,
                  "equivariance_structures": 2, "progress": False, "log_steps": False},
    }
    for assignment in args.overrides:
        apply_override(settings, assignment)
    cfg = config_from_mapping(settings)
    clock = _CpuClock()
    env = environment()
    t0, c0 = time.time(), time.process_time()
    model_path = train(cfg, hooks=clock.hooks())
    train_wall, train_cpu = time.time() - t0, time.process_time() - c0
    model = load_model(model_path, map_location="cpu")
    torch.set_num_threads(args.threads)
    # the rotation error on the first n_equivariance frames of the first test file
    result = evaluate_paths(model, [next(iter(tests.values()))], max_atoms=900,
                            equivariance_structures=args.n_equivariance)
    curve = clock.curve
    return {
        "model": name, "family": spec["family"], "config": settings,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "budget_cpu_s": 60.0 * args.budget_cpu_min, "train_cpu_s": curve[-1]["cpu_s"] if curve else None,
        "train_wall_s": train_wall, "process_cpu_s_with_setup": train_cpu,
        "epochs": curve[-1]["epoch"] if curve else 0, "steps": curve[-1]["step"] if curve else 0,
        "load_average_mean": float(np.mean([r["load_average_1min"] for r in curve])) if curve else None,
        "tests": {k: score_mlip(model_path, path) for k, path in tests.items()},
        "equivariance": {k[len("equivariance_"):]: v for k, v in result.items() if k.startswith("equivariance_")},
        "n_equivariance_structures": args.n_equivariance,
        "curve": curve, "env_start": env, "model_path": str(model_path),
    }


# ---------------------------------------------------------------------------------------- MACE
def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mace_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def score_mace_predictions(pred_path: Path, test: Path) -> dict[str, float]:
    """Errors (:func:`errors`) of the predictions ``mace_eval_configs`` wrote for ``test``."""
    from mlip.data.formats.extxyz import iter_extxyz
    from mlip.data.formats.labels import LabelKeys

    pred = list(iter_extxyz(pred_path, keys=LabelKeys(energy="MACE_energy", forces="MACE_forces")))
    ref_e, n_atoms, ref_f = _reference(Path(test))
    return errors(ref_e, np.array([a.info["energy"] for a in pred]), n_atoms, ref_f,
                  np.concatenate([a.arrays["forces"] for a in pred]))


def run_mace(files: dict[str, Path], train_file: Path, tests: dict[str, Path], args: argparse.Namespace) -> dict:
    """Train MACE with ``mace_run_train`` on ``train_file`` for the CPU budget, export its checkpoint,
    predict every file of ``tests``."""
    from mlip.data.formats.extxyz import iter_extxyz

    python = args.mace_python
    check = subprocess.run([python, "-c", "import mace, torch; print(mace.__version__, torch.__version__)"],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise SystemExit(f"accuracy benchmark: {python} cannot import mace (pip install mace-torch in a separate "
                         f"venv and pass its python with --mace-python):\n{check.stderr[-500:]}")
    mace_version, mace_torch = check.stdout.split()
    out = (Path(args.work) / args.split / "mace").resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    present = {int(z) for a in iter_extxyz(train_file) for z in a.numbers}
    e0s = {int(a.numbers[0]): float(a.info["energy"]) for a in iter_extxyz(files["isolated_atoms"])
           if int(a.numbers[0]) in present}  # MACE refuses E0s of elements absent from the training set
    base = [python, "-c", "from mace.cli.run_train import main; main()", "--name=mace", f"--seed={args.seed}",
            f"--train_file={train_file.resolve()}", f"--valid_fraction={VALID_FRACTION}",
            f"--E0s={e0s!r}", "--energy_key=energy", "--forces_key=forces", *MACE_ARGS,
            "--loss=weighted", f"--energy_weight={ENERGY_WEIGHT}", f"--forces_weight={FORCES_WEIGHT}",
            f"--batch_size={BATCH_MOLECULES}", f"--valid_batch_size={BATCH_MOLECULES}",
            f"--lr={MODELS['mace']['lr']}", "--optimizer=adam", "--amsgrad", "--ema", "--ema_decay=0.99",
            "--scheduler=ReduceLROnPlateau", "--eval_interval=1", "--error_table=PerAtomMAE",
            "--default_dtype=float32", "--device=cpu", "--num_workers=0",
            f"--log_dir={out / 'logs'}", f"--model_dir={out}", f"--checkpoints_dir={out / 'checkpoints'}",
            f"--results_dir={out / 'results'}", f"--work_dir={out}"]
    env_start = environment()
    budget = 60.0 * args.budget_cpu_min
    log = out / "train.stdout"
    t0 = time.time()
    curve: list[dict] = []
    epoch_re = re.compile(r"Epoch (\d+):.*MAE_E_per_atom=\s*([\d.]+) meV, MAE_F=\s*([\d.]+) meV")
    with open(log, "w") as fh:
        proc = subprocess.Popen(base + ["--max_num_epochs=100000"], stdout=fh, stderr=subprocess.STDOUT,
                                env=_mace_env(args.threads), cwd=out)
        cpu_start = wall_start = None
        seen = 0
        while proc.poll() is None:
            time.sleep(0.5)
            try:
                cpu = _cpu_seconds(proc.pid)
            except (OSError, IndexError):
                break
            text = log.read_text(errors="replace")
            if cpu_start is None and "Started training" in text:
                cpu_start, wall_start = cpu, time.time()  # MACE's data preparation is not part of the budget
            if cpu_start is None:
                continue
            for m in list(epoch_re.finditer(text))[seen:]:
                curve.append({"epoch": int(m.group(1)) + 1, "cpu_s": cpu - cpu_start,
                              "wall_s": time.time() - wall_start,
                              "load_average_1min": os.getloadavg()[0],
                              "valid_energy_per_atom_mae": float(m.group(2)) / 1e3,
                              "valid_forces_mae": float(m.group(3)) / 1e3})
                seen += 1
            if cpu - cpu_start >= budget:
                proc.terminate()
                proc.wait(timeout=60)
                break
    train_wall = time.time() - t0
    if proc.returncode not in (None, 0, -15):
        raise RuntimeError(f"mace_run_train failed (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
    ckpts = sorted((out / "checkpoints").glob("mace_run-*_epoch-*.pt"),
                   key=lambda p: int(re.search(r"epoch-(\d+)", p.name).group(1)))
    if not ckpts:
        raise RuntimeError(f"MACE wrote no checkpoint; see {log}")
    last_epoch = int(re.search(r"epoch-(\d+)", ckpts[-1].name).group(1))
    # a second call loads the latest checkpoint, trains nothing (epoch == max_num_epochs) and writes mace.model
    with open(out / "export.stdout", "w") as fh:
        subprocess.run(base + ["--restart_latest", f"--max_num_epochs={last_epoch}"], stdout=fh,
                       stderr=subprocess.STDOUT, env=_mace_env(args.threads), cwd=out, check=True)
    model = out / "mace.model"
    scores = {}
    for key, test in tests.items():
        pred_path = out / f"predictions_{key}.xyz"
        subprocess.run([python, "-c", "from mace.cli.eval_configs import main; main()",
                        f"--configs={Path(test).resolve()}", f"--model={model}", f"--output={pred_path}",
                        "--device=cpu", "--default_dtype=float32", "--batch_size=50"],
                       env=_mace_env(args.threads), cwd=out, check=True, capture_output=True)
        scores[key] = score_mace_predictions(pred_path, test)
    count = ("import torch, sys; m = torch.load(sys.argv[1], weights_only=False); "
             "print(sum(p.numel() for p in m.parameters()))")
    n_params = subprocess.run([python, "-c", count, str(model)],
                              capture_output=True, text=True, check=True).stdout.split()[-1]
    return {
        "model": "mace", "family": f"mace-torch {mace_version} (torch {mace_torch})", "config": base[3:],
        "n_parameters": int(n_params), "budget_cpu_s": budget,
        "train_cpu_s": curve[-1]["cpu_s"] if curve else None,
        "train_wall_s": train_wall, "epochs": len(curve), "checkpoint_epoch": last_epoch + 1,
        "steps": len(curve) * int(np.ceil((1 - VALID_FRACTION) * 1000 / BATCH_MOLECULES)),
        "load_average_mean": float(np.mean([r["load_average_1min"] for r in curve])) if curve else None,
        "tests": scores, "equivariance": {},
        "curve": curve, "env_start": env_start, "model_path": str(model),
    }


# -------------------------------------------------------------------------------------- report
def result_path(results: Path, split: str, name: str) -> Path:
    """``accuracy-<model>.json`` for the rmd17 split, ``accuracy-<split>-<model>.json`` for the others."""
    return results / (f"accuracy-{name}.json" if split == "rmd17" else f"accuracy-{split}-{name}.json")


def load_results(results: Path, split: str, names: list[str] | None = None) -> dict[str, dict]:
    """The finished runs of ``split`` under ``results`` (in :data:`MODELS` order)."""
    found = {}
    for name in MODELS:
        path = result_path(results, split, name)
        if path.is_file() and (names is None or name in names):
            found[name] = json.loads(path.read_text())
    return found


def table(runs: dict[str, dict]) -> str:
    """Markdown table: errors on the first test file (meV), budget use and the measured rotation error."""
    lines = [("| model | parameters | epochs | CPU min | wall min | load avg | E MAE (meV) | E RMSE (meV) "
              "| E MAE, offset removed (meV) | F MAE (meV/Å) | F RMSE (meV/Å) | rotation error: max ΔE (meV/atom) "
              "| ΔF RMS / F RMS |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        t, eq = next(iter(r["tests"].values())), r.get("equivariance", {})
        if "energy_max" not in eq:
            rot_e = "not measured (exact by construction)"
        else:
            rot_e = f"{1e3 * eq['energy_max']:.2g}" if eq["energy_max"] > 0 else "0 (float32)"
        rot_f = f"{eq['forces_rel']:.2g}" if "forces_rel" in eq else "not measured (exact by construction)"
        mev = [f"{1e3 * t[k]:.1f}" for k in ("energy_mae", "energy_rmse", "energy_mae_offset_removed",
                                              "forces_mae", "forces_rmse")]
        lines.append(f"| {name} | {r['n_parameters'] / 1e3:.0f}k | {r['epochs']} | {(r['train_cpu_s'] or 0) / 60:.1f} "
                     f"| {r['train_wall_s'] / 60:.1f} | {r['load_average_mean']:.1f} | " + " | ".join(mev) + " "
                     f"| {rot_e} | {rot_f} |")
    return "\n".join(lines)


def per_file_table(runs: dict[str, dict], key: str, label: str) -> str:
    """Markdown table of one error (``key`` of :func:`errors`, in meV) on every test file, each with its
    ratio to MACE's error on the same file (``×MACE``); files without that error are left out."""
    files = [f for f in next(iter(runs.values()))["tests"] if all(key in r["tests"].get(f, {}) for r in runs.values())]
    mace = runs.get("mace", {}).get("tests", {})
    lines = [f"| {label} | " + " | ".join(files) + " |", "|---|" + "---|" * len(files)]
    for name, r in runs.items():
        cells = []
        for f in files:
            value = r["tests"][f][key]
            ratio = f" ({value / mace[f][key]:.2f}×)" if f in mace and name != "mace" and mace[f][key] > 0 else ""
            cells.append(f"{1e3 * value:.1f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_table(folders: list[Path], split: str, key: str, label: str) -> str:
    """Markdown table of one error (``key`` of :func:`errors`, in meV) on every test file: per model
    the mean over the runs found in ``folders`` (repeats or seeds of the same protocol), their range
    and count, and the mean's ratio to MACE's mean (``×MACE``)."""
    values: dict[str, dict[str, list[float]]] = {}
    for folder in folders:
        for name, run in load_results(folder, split).items():
            for f, t in run["tests"].items():
                if key in t:
                    values.setdefault(name, {}).setdefault(f, []).append(1e3 * t[key])
    if not values:
        raise SystemExit(f"no finished {split} runs in {[str(f) for f in folders]}")
    files = list(dict.fromkeys(f for per_file in values.values() for f in per_file))
    mace = {f: float(np.mean(v)) for f, v in values.get("mace", {}).items()}
    lines = [f"| {label}: mean (min-max, runs) | " + " | ".join(files) + " |", "|---|" + "---|" * len(files)]
    for name, per_file in values.items():
        cells = []
        for f in files:
            v = per_file.get(f)
            if not v:
                cells.append("")
                continue
            ratio = f" {np.mean(v) / mace[f]:.2f}×MACE" if f in mace and name != "mace" and mace[f] > 0 else ""
            cells.append(f"{np.mean(v):.1f} ({min(v):.0f}-{max(v):.0f}, {len(v)}){ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curves(runs: dict[str, dict], path: Path, title: str) -> Path:
    """Validation energy and force MAE against training CPU minutes, one line per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in runs.items():
        rows = [c for c in r["curve"] if c.get("valid_forces_mae") is not None]
        x = [c["cpu_s"] / 60 for c in rows]
        axes[0].plot(x, [1e3 * c["valid_energy_per_atom_mae"] for c in rows], label=name)
        axes[1].plot(x, [1e3 * c["valid_forces_mae"] for c in rows], label=name)
    for ax, label in zip(axes, ("validation energy MAE (meV/atom)", "validation force MAE (meV/Å)")):
        ax.set_xlabel("training CPU time (min, 1 thread)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(results: Path, split: str) -> str:
    """Rewrite the split's summary JSON and learning-curve PNG from the per-model files; return the tables."""
    runs = load_results(results, split)
    if not runs:
        raise SystemExit(f"no finished {split} runs in {results}; run the benchmark first")
    stem = "accuracy" if split == "rmd17" else f"accuracy-{split}"
    summary = {name: {k: v for k, v in r.items() if k != "curve"} for name, r in runs.items()}
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    title = {"rmd17": "rMD17 ethanol", "temperature": "ethanol, lowest-energy 1000 frames"}[split]
    learning_curves(runs, results / f"{stem}_learning_curves.png", f"{title}, equal CPU budget (EMA weights)")
    return "\n\n".join([table(runs), per_file_table(runs, "forces_mae", "F MAE (meV/Å)"),
                        per_file_table(runs, "energy_mae", "E MAE (meV)"),
                        per_file_table(runs, "energy_mae_offset_removed", "E MAE, offset removed (meV)")])


def rescore(results: Path, split: str, tests: dict[str, Path], names: list[str]) -> None:
    """Recompute the test errors of the finished runs of ``split`` from their saved models (mlip) or
    saved predictions (MACE's ``predictions_<test>.xyz``), e.g. after :func:`errors` gained a field."""
    for name, run in load_results(results, split, names).items():
        if name == "mace":
            folder = Path(run["model_path"]).parent
            run["tests"] = {k: score_mace_predictions(folder / f"predictions_{k}.xyz", p) for k, p in tests.items()}
        else:
            run["tests"] = {k: score_mlip(run["model_path"], p) for k, p in tests.items()}
        result_path(results, split, name).write_text(json.dumps(run, indent=2))
        print(f"rescored {name}: {run['tests']}", flush=True)


def run_models(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Train and score every model of ``args.models`` on ``args.split``; one JSON per finished model."""
    import torch

    torch.set_num_threads(args.threads)
    files = data_files(args.data_dir)
    train_file, tests = prepare_split(args.split, files, args.n_test, Path(args.work) / args.split)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        if name == "mace" and shutil.which(args.mace_python) is None:
            print(f"== mace skipped: no Python at {args.mace_python} (pass --mace-python)", flush=True)
            continue
        print(f"== {name}, split {args.split}: {args.budget_cpu_min} CPU min, {args.threads} thread(s)", flush=True)
        try:
            run = (run_mace(files, train_file, tests, args) if name == "mace"
                   else run_mlip(name, files, train_file, tests, args))
        except Exception:  # noqa: BLE001 - report and go on with the other models
            import traceback

            traceback.print_exc()
            print(f"== {name} FAILED; no result written", flush=True)
            continue
        given = list(argv if argv is not None else sys.argv[1:])
        run["command"] = " ".join(["python", "-m", "benchmarks", "accuracy", *given])
        run["split"], run["train_file"] = args.split, str(train_file)
        run["test_files"] = {k: str(p) for k, p in tests.items()}
        result_path(results, args.split, name).write_text(json.dumps(run, indent=2))
        print(json.dumps({k: run[k] for k in ("n_parameters", "epochs", "train_cpu_s", "train_wall_s", "tests",
                                              "equivariance")}, indent=1), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks accuracy",
                                description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="folder with train.xyz, test_MD.xyz, isolated_atoms.xyz (and test_*.xyz)")
    p.add_argument("--split", default="rmd17", choices=SPLITS,
                   help="rmd17: train.xyz, tested on every test file; temperature: train on the lowest-energy "
                        "half of train+test_MD, test on the highest-energy 200 frames")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budget-cpu-min", type=float, default=2.5,
                   help="training budget per model, process CPU minutes (2.5: the numbers in docs/benchmarks.md)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-test", type=int, default=1000, help="first N frames of test_MD.xyz")
    p.add_argument("--n-equivariance", type=int, default=50,
                   help="test structures in the rotation-error measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mace-python", default=common.MACE_PYTHON,
                   help="a Python with mace-torch installed, e.g. a separate venv's bin/python (default: "
                        "$MACE_PYTHON, else ../venv-mace/bin/python beside the checkout); MACE is skipped when it does not exist")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", default="runs/accuracy", help="run folders: checkpoints, models, logs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the mlip training config (all mlip models)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and plot from finished runs")
    p.add_argument("--rescore", action="store_true",
                   help="recompute the test errors of finished runs from their saved models (no training)")
    p.add_argument("--mean-of", nargs="+", metavar="DIR", default=None,
                   help="only print the mean errors over the finished runs in these results folders "
                        "(repeats or seeds of the same protocol)")
    args = p.parse_args(argv)
    results = Path(args.results)
    if args.mean_of:
        folders = [Path(f) for f in args.mean_of]
        print("\n\n".join([mean_table(folders, args.split, "forces_mae", "F MAE (meV/Å)"),
                            mean_table(folders, args.split, "energy_mae", "E MAE (meV)")]))
        return
    if args.rescore:
        _, tests = prepare_split(args.split, data_files(args.data_dir), args.n_test, Path(args.work) / args.split)
        rescore(results, args.split, tests, args.models)
    elif not args.report:
        run_models(args, argv)
    print(report(results, args.split))


if __name__ == "__main__":
    main()
