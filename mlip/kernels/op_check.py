"""Op-level self-check of a kernel backend: random inputs through each op on the backend and on the
torch reference, comparing outputs and input gradients.

It needs nothing but the ops, so it lives here; the whole-model check that
:func:`mlip.models.base.load_model` runs (energy and forces of a small structure against a
``kernel="torch"`` twin) is :mod:`mlip.models.backend_check`. Both raise
:class:`BackendMismatchError`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mlip.kernels import reference
from mlip.kernels.backends import OPS, BackendUnavailableError, KernelBackend

#: largest relative error (``max |a - b| / max |b|``) per dtype: float64 well above round-off of
#: sums of ~10 terms, float32 a few hundred ulps
TOLERANCES: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-4}


class BackendMismatchError(RuntimeError):
    """An accelerated backend disagrees with the torch reference beyond the dtype's tolerance."""


@dataclass
class OpCheck:
    """Outcome of one op in :func:`check_ops`.

    ``errors`` maps ``"output"`` and ``"grad <argument>"`` to ``max |backend - reference|``
    relative to the reference's largest magnitude.
    """

    op: str
    backend: str
    dtype: torch.dtype
    device: str
    tolerance: float
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(err <= self.tolerance for err in self.errors.values())

    def describe(self) -> str:
        worst = max(self.errors, key=self.errors.get)
        return f"{self.op}: {worst} off by {self.errors[worst]:.2e} (tolerance {self.tolerance:.0e})"


@dataclass
class _Case:
    """Arguments of one op call and which of them are differentiated (by argument name)."""

    args: list
    grads: dict[str, int]


def _random(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # drawn in float64 on the CPU: the same numbers for every dtype and device
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _graph(gen: torch.Generator, n_nodes: int, n_edges: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random edges among the first ``n_nodes - 1`` nodes (the last one has none: its rows stay zero);
    node 0 receives several edges, so a kernel walks more than one edge per receiver."""
    sender = torch.randint(0, n_nodes - 1, (n_edges,), generator=gen)
    receiver = torch.randint(0, n_nodes - 1, (n_edges,), generator=gen)
    receiver[: n_edges // 3] = 0
    return sender.to(device), receiver.to(device)


def _cases(lmax: int, channels: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, _Case]:
    """Small random inputs of every op, at degree ``lmax`` (convolution input ``lmax - 1``: a
    rectangular path set, as in the model's first layers)."""
    gen = torch.Generator().manual_seed(seed)
    n, e, c, knots = 5, 12, channels, 6
    lmax_in, lmax_sh, lmax_out = max(lmax - 1, 0), lmax, lmax
    n_paths = len(reference.tp_paths(lmax_in, lmax_sh, lmax_out))
    sender, receiver = _graph(gen, n, e, device)
    x = _random(gen, (n, c, (lmax_in + 1) ** 2), dtype, device)
    y = _random(gen, (e, (lmax_sh + 1) ** 2), dtype, device)
    w = _random(gen, (e, n_paths, c), dtype, device)
    conv_tail = [sender, receiver, n, lmax_in, lmax_sh, lmax_out]
    r = torch.rand(e, generator=gen, dtype=torch.float64) * 3.0
    vals, idx = reference.spline_coefficients(r, 3.0, knots)
    table = _random(gen, (knots, n_paths, c), dtype, device)
    to_grid, from_grid = reference.gaunt_grid(lmax, lmax, dtype=dtype, device=device)
    a = _random(gen, (n, c, (lmax + 1) ** 2), dtype, device)
    b = _random(gen, (n, c, (lmax + 1) ** 2), dtype, device)
    n_rows, correlation = 2, 3
    l2 = reference.contraction_lmax2(lmax, lmax, correlation)
    element = torch.randint(0, n_rows, (n,), generator=gen).to(device)
    w1 = _random(gen, (n_rows, lmax + 1, c), dtype, device)
    w2 = _random(gen, (n_rows, reference.pair_paths(lmax, lmax, l2, symmetric=True), c), dtype, device)
    w3 = _random(gen, (n_rows, reference.pair_paths(l2, lmax, lmax), c), dtype, device)
    return {
        "conv_tp": _Case([x, y, w, *conv_tail], {"node_feats": 0, "edge_attrs": 1, "edge_weights": 2}),
        "conv_tp_spline": _Case([x, y, vals.to(device=device, dtype=dtype), idx.to(device), table, *conv_tail],
                                {"node_feats": 0, "edge_attrs": 1, "spline_vals": 2, "table": 4}),
        "grid_product": _Case([a, b, to_grid, from_grid], {"a": 0, "b": 1}),
        "symmetric_contraction": _Case([a, element, w1, w2, w3, lmax, lmax, correlation],
                                       {"A": 0, "w1": 2, "w2": 3, "w3": 4}),
    }


def _run(fn: Callable, case: _Case, cotangent_seed: int) -> dict[str, torch.Tensor]:
    """Output and input gradients (for a fixed random cotangent) of ``fn`` on fresh leaves."""
    args = list(case.args)
    for i in case.grads.values():
        args[i] = args[i].detach().clone().requires_grad_()
    out = fn(*args)
    gen = torch.Generator().manual_seed(cotangent_seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    names = list(case.grads)
    grads = torch.autograd.grad(out, [args[case.grads[k]] for k in names], cot, allow_unused=True)
    results = {"output": out.detach()}
    for name, g in zip(names, grads):
        results[f"grad {name}"] = torch.zeros_like(args[case.grads[name]]) if g is None else g
    return results


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return diff / max(scale, 1e-30)


def check_ops(
    backend: KernelBackend,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    lmax: int = 2,
    channels: int = 3,
    ops: tuple[str, ...] = OPS,
    seed: int = 0,
    raise_on_mismatch: bool = False,
) -> list[OpCheck]:
    """Compare each op of ``backend`` with the torch reference on small random inputs.

    Every op in ``ops`` runs on the same random inputs (5 nodes, 12 edges, ``channels`` channels,
    degree ``lmax``) once on ``backend`` and once on :mod:`mlip.kernels.reference`; the output and
    the gradient of every floating input for a random cotangent are compared.

    Args:
        backend: e.g. ``BACKENDS["triton"]``.
        device: where to run (default: CUDA when available, else the CPU).
        dtype: floating dtype of the inputs (a key of :data:`TOLERANCES`).
        raise_on_mismatch: raise :class:`BackendMismatchError` instead of returning failed checks.

    Returns:
        One :class:`OpCheck` per op, in the order of ``ops``.

    Raises:
        BackendUnavailableError: ``backend`` cannot run ``dtype`` at ``lmax`` on ``device``.
        BackendMismatchError: with ``raise_on_mismatch``, an op disagrees with the reference.
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in TOLERANCES:
        raise TypeError(f"check_ops: no tolerance for {dtype}; choose one of {sorted(map(str, TOLERANCES))}")
    problems = backend.problems(device, dtype, lmax)
    if problems:
        raise BackendUnavailableError(f"check_ops: kernel {backend.name!r} cannot run here: " + "; ".join(problems))
    cases = _cases(lmax, channels, dtype, device, seed)
    checks = []
    for i, op in enumerate(ops):
        got = _run(getattr(backend.ops, op), cases[op], seed + 1 + i)
        want = _run(getattr(reference, op), cases[op], seed + 1 + i)
        errors = {key: _relative_error(got[key], want[key]) for key in want}
        checks.append(OpCheck(op, backend.name, dtype, str(device), TOLERANCES[dtype], errors))
    failed = [check for check in checks if not check.ok]
    if failed and raise_on_mismatch:
        raise BackendMismatchError(
            f"kernel backend {backend.name!r} ({dtype}, {device}) disagrees with the torch reference: "
            + "; ".join(check.describe() for check in failed)
        )
    return checks
