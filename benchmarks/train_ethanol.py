"""Developer benchmark: train on rMD17 ethanol (real DFT, PBE/def2-SVP) within a wall-clock
budget and report energy and force errors on the held-out MD test set.

The data are not part of the package (see ../shared/data/README.md); results, budget and
hardware are recorded in docs/training.md.

Example:
    python benchmarks/train_ethanol.py --data-dir ../shared/data/ethanol --budget-min 10
    python benchmarks/train_ethanol.py --budget-min 3 --set model.num_channels=16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mlip.models.base import load_model
from mlip.train.config import config_from_mapping, apply_override
from mlip.train.evaluate import evaluate_paths, format_report
from mlip.train.loop import train

#: the model and schedule used for the numbers in docs/training.md
BASE = {
    "seed": 0,
    "dtype": "float32",
    "num_threads": 1,
    "model": {"family": "equivariant", "r_max": 5.0, "num_channels": 32, "lmax": 2, "num_layers": 2},
    "data": {"valid_fraction": 0.05, "e0s": "isolated"},
    "batch": {"max_atoms": 90},
    "loss": {"energy_weight": 1.0, "forces_weight": 10.0, "stress_weight": 0.0},
    "optim": {"lr": 0.01, "scheduler": "cosine", "warmup_steps": 20, "ema_decay": 0.99},
    "train": {"epochs": 60, "eval_every_epochs": 2, "equivariance_structures": 2, "progress": False},
}


def hardware() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["load_average_1min"] = os.getloadavg()[0]  # other work sharing the CPU slows a budgeted run
    return info


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(here.parent / "shared" / "data" / "ethanol"))
    parser.add_argument("--budget-min", type=float, default=10.0, help="wall-clock training budget (minutes)")
    parser.add_argument("--n-train", type=int, default=None, help="use only the first N training structures")
    parser.add_argument("--out", default="runs/ethanol_benchmark")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    data = Path(args.data_dir)
    train_file = data / "train.xyz"
    if args.n_train is not None:
        from ase.io import read, write

        subset = Path(args.out + "_data") / f"train_{args.n_train}.xyz"
        subset.parent.mkdir(parents=True, exist_ok=True)
        write(subset, read(train_file, f":{args.n_train}"), format="extxyz")
        train_file = subset
    cfg_dict = json.loads(json.dumps(BASE))
    cfg_dict["output_dir"] = args.out
    cfg_dict["device"] = args.device
    cfg_dict["data"]["train"] = [str(train_file), str(data / "isolated_atoms.xyz")]
    cfg_dict["train"]["time_budget_s"] = 60.0 * args.budget_min
    for assignment in args.overrides:
        apply_override(cfg_dict, assignment)
    cfg = config_from_mapping(cfg_dict)

    load_before = os.getloadavg()[0]
    start = time.time()
    model_path = train(cfg)
    wall = time.time() - start
    model = load_model(model_path, map_location="cpu")
    result = evaluate_paths(model, [data / "test_MD.xyz"], max_atoms=900, equivariance_structures=8)
    history = [json.loads(l) for l in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    report = {
        "test_MD": result,
        "train_wall_s": wall,
        "budget_min": args.budget_min,
        "epochs_done": len(history),
        "steps_done": history[-1]["step"] if history else 0,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "config": cfg_dict,
        "hardware": {**hardware(), "load_average_1min_at_start": load_before},
    }
    Path(args.out, "benchmark.json").write_text(json.dumps(report, indent=2))
    print(format_report(result))
    print(f"trained {report['epochs_done']} epochs / {report['steps_done']} steps in {wall / 60:.1f} min "
          f"on {report['hardware']['cpu']} ({report['hardware']['torch_threads']} threads)"
          + (f", GPU {report['hardware']['gpu']}" if "gpu" in report["hardware"] else ""))


if __name__ == "__main__":
    main()
