"""The benchmark suite in one command, run from the repository root::

    python -m benchmarks speed [options]      # per-structure speed and MD speed, CPU (benchmarks/speed.py)
    python -m benchmarks accuracy [options]   # equal-budget training on DFT data (benchmarks/accuracy.py)
    python -m benchmarks all                  # both, default options
    python -m benchmarks gpu [--out FILE] [--smoke]   # the GPU check: kernels, model, MD on one GPU (benchmarks/gpu.py)
    python -m benchmarks train_vs_mace [--smoke]      # training-step throughput, mlip vs MACE (benchmarks/train_vs_mace.py)

``python -m benchmarks speed --help`` (or ``accuracy --help``, ``gpu --help``, ``train_vs_mace --help``) lists the
options of each part.
Results (JSON, PNG) go to ``benchmarks/results/``. Peers are optional: MACE runs from its own
virtual environment (``--mace-python``) and is skipped when that is absent.
"""
from __future__ import annotations

import importlib
import sys


def _run(part: str, argv: list[str]) -> int:
    # imported lazily: each part pulls in its own (heavy, partly optional) dependencies
    try:
        module = importlib.import_module(f"benchmarks.{part}")
    except ModuleNotFoundError as err:
        if err.name != f"benchmarks.{part}":
            raise
        sys.exit(f"benchmarks/{part}.py is missing from this checkout")
    code = module.main(argv)
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("speed", "accuracy", "all", "gpu", "train_vs_mace")
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    part, rest = argv[0], argv[1:]
    if part == "all":
        if rest:
            sys.exit("python -m benchmarks all takes no options; run the parts one by one to pass options")
        _run("speed", [])
        _run("accuracy", [])
    else:
        sys.exit(_run(part, rest))  # gpu: 1 when a parity check failed


if __name__ == "__main__":
    main()
