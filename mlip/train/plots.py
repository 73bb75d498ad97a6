"""PNG figures: the learning curve of a run and parity plots of an evaluation (matplotlib, Agg)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def learning_curve(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Plot train/valid loss and validation errors per epoch from ``metrics.jsonl`` rows.

    Args:
        rows: dicts with ``epoch``, ``train_loss`` and optionally ``valid_loss``,
            ``valid_energy_per_atom_mae`` (eV), ``valid_forces_mae`` (eV/Å).
    """
    plt = _pyplot()
    path = Path(path)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("valid_loss", "valid")):
        ys = [r.get(key, math.nan) for r in rows]
        if any(y == y for y in ys):
            axes[0].plot(epochs, ys, marker=".", label=label)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    for key, label in (
        ("valid_energy_per_atom_mae", "energy MAE (meV/atom)"),
        ("valid_forces_mae", "force MAE (meV/Å)"),
        ("valid_stress_mae", "stress MAE (meV/Å³)"),
    ):
        ys = [1e3 * r.get(key, math.nan) for r in rows]
        if any(y == y for y in ys):
            axes[1].plot(epochs, ys, marker=".", label=label)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation error")
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parity_plots(values: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per quantity: predicted against reference, with the identity line.

    Args:
        values: name -> (reference, predicted) flat arrays, e.g. ``{"energy_per_atom": (ref, pred)}``
            in eV/atom, ``{"forces": ...}`` in eV/Å, ``{"stress": ...}`` in eV/Å³.
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = {"energy_per_atom": "eV/atom", "energy": "eV", "forces": "eV/Å", "stress": "eV/Å³"}
    written = []
    for name, (ref, pred) in values.items():
        ref = np.asarray(ref, dtype=float).ravel()
        pred = np.asarray(pred, dtype=float).ravel()
        ok = np.isfinite(ref) & np.isfinite(pred)
        if not ok.any():
            continue
        ref, pred = ref[ok], pred[ok]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(ref, pred, s=4, alpha=0.5)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        mae = float(np.abs(pred - ref).mean())
        unit = units.get(name, "")
        ax.set_title(f"{name}: MAE {mae:.4g} {unit}")
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        fig.tight_layout()
        path = out / f"parity_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
