"""The model the examples run with: the one given, the quickstart one, or a freshly trained one."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def get_model(path: str | None, out_dir: Path, train_seconds: float) -> str:
    """A model file: the one given, the quickstart one, or a freshly trained small model."""
    if path is not None:
        return path
    for candidate in (Path("runs/quickstart/model.pt"), out_dir / "model/model.pt"):  # relative to the cwd
        if candidate.is_file():
            return str(candidate)
    from mlip.train.config import load_config
    from mlip.train.loop import train

    print(f"no model given: training the quickstart model for {train_seconds:.0f} s on data/emt_crystals.xyz")
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        f"output_dir={out_dir / 'model'}", f"data.train={REPO / 'data/emt_crystals.xyz'}",
        f"train.time_budget_s={train_seconds}", "train.progress=false", "data.test_fraction=0.0",
    ])
    return str(train(cfg))
