"""The effect of the ZBL pair repulsion (``model.pair_repulsion``) on trained models, without retraining.

When no pair of the training data comes within the switch range (``SWITCH_RANGE`` times its
covalent radii sum), the term is zero on every training structure, so a model trained with it has
the same weights as one trained without (up to the CPU-clock learning-rate schedule, whose noise
between two runs is larger than most effects). Rescoring the saved models of the accuracy race
with the term off and on is then its exact effect. Per family and test file: energy MAE (meV)
without and with it, and the test_MD force MAE; first, the smallest pair distance over the
covalent radii sum in each training file (the term is exact only if that is above the range)::

    python -m benchmarks.repulsion_effect                 # models in runs/accuracy/<split>/<family>
    python -m benchmarks.repulsion_effect --work runs/accuracy --families equivariant frame-averaged
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

try:
    from benchmarks import accuracy
except ImportError:  # run as a script
    import accuracy  # type: ignore[no-redef]

FAMILIES = ("equivariant", "frame-averaged", "learned-equivariance")


def closest_pair_ratio(path: Path) -> float:
    """Smallest ``r / (covalent radii sum)`` over all pairs of all frames of an extxyz file."""
    from ase.data import covalent_radii
    from ase.io import iread

    best = np.inf
    for atoms in iread(str(path)):
        d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        s = covalent_radii[atoms.numbers]
        ratio = d / (s[:, None] + s[None, :])
        np.fill_diagonal(ratio, np.inf)
        best = min(best, float(ratio.min()))
    return best


def rescore(model_path: Path, tests: dict[str, Path], tmp: Path) -> dict[str, tuple[dict, dict]]:
    """``{test: (errors without, errors with)}`` of one saved model (:func:`benchmarks.accuracy.score_mlip`)."""
    import torch

    from mlip.models.base import load_model, save_model

    torch.set_num_threads(1)
    pair = {}
    for on in (False, True):
        model = load_model(model_path)
        model.config.pair_repulsion = on
        path = tmp / f"{model_path.parent.name}-{on}.pt"
        save_model(model, path)
        pair[on] = {name: accuracy.score_mlip(path, test) for name, test in tests.items()}
    return {name: (pair[False][name], pair[True][name]) for name in tests}


def main(argv: list[str] | None = None) -> None:
    from mlip.nn.repulsion import SWITCH_RANGE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(accuracy.DEFAULT_DATA))
    ap.add_argument("--work", default="runs/accuracy", help="the accuracy race's run folders")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--n-test", type=int, default=1000)
    args = ap.parse_args(argv)
    print(f"# switch range: {SWITCH_RANGE} x covalent radii sum")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for split in accuracy.SPLITS:
            train, tests = accuracy.prepare_split(split, accuracy.data_files(args.data_dir), args.n_test,
                                                  Path(args.work) / split)
            print(f"# {split}: smallest r / covalent radii sum in {train.name}: {closest_pair_ratio(train):.3f}")
            for family in args.families:
                model_path = Path(args.work) / split / family / "model.pt"
                if not model_path.exists():
                    print(f"# {split}/{family}: no saved model at {model_path}, skipped")
                    continue
                for name, (off, on) in rescore(model_path, tests, Path(tmp)).items():
                    forces = (f"{off['forces_mae'] * 1e3:.1f} / {on['forces_mae'] * 1e3:.1f}"
                              if "forces_mae" in off else "")
                    rows.append(f"| {split} | {family} | {name} | {off['energy_mae'] * 1e3:.1f} | "
                                f"{on['energy_mae'] * 1e3:.1f} | {forces} |")
    print("| split | family | test | E MAE without (meV) | E MAE with (meV) | F MAE without / with (meV/Å) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
