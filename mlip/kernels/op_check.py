"""Op-level self-check of a kernel backend: random inputs through each op on the backend and on the
torch reference, comparing outputs and input gradients.

At its defaults it is a small, fast check (5 nodes, 12 edges, first derivatives); with
``n_nodes``/``n_edges``/``channels`` at model size and ``double_backward=True`` it is the GPU parity
check of ``python -m benchmarks gpu`` (the same tolerances). It needs nothing but the ops, so it lives here; the whole-model check that
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

    ``errors`` maps ``"output"``, ``"grad <argument>"`` and (with ``double_backward``) ``"grad2
    <argument>"`` to ``max |backend - reference|`` relative to the reference's largest magnitude.
    """

    op: str
    backend: str
    dtype: torch.dtype
    device: str
    tolerance: float
    errors: dict[str, float] = field(default_factory=dict)
    #: sizes of the random inputs: n_nodes, n_edges, channels, lmax_in, lmax
    shape: dict[str, int] = field(default_factory=dict)

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
    node 0 receives several edges (a third of them, at most 64: a hub far above the others would
    shrink every other node's error relative to the largest value), so a kernel walks more than one
    edge block per receiver."""
    sender = torch.randint(0, n_nodes - 1, (n_edges,), generator=gen)
    receiver = torch.randint(0, n_nodes - 1, (n_edges,), generator=gen)
    receiver[: min(n_edges // 3, 64)] = 0
    return sender.to(device), receiver.to(device)


def _case(op: str, lmax: int, lmax_in: int, n: int, e: int, c: int, dtype: torch.dtype, device: torch.device,
          seed: int) -> _Case:
    """Random inputs of ``op`` at degree ``lmax`` (convolution input ``lmax_in``), ``n`` nodes, ``e``
    edges, ``c`` channels; drawn in one fixed order, so the same seed gives the same inputs on every
    device and in every dtype."""
    gen = torch.Generator().manual_seed(seed)
    knots = 6
    lmax_sh, lmax_out = lmax, lmax
    n_paths = len(reference.tp_paths(lmax_in, lmax_sh, lmax_out))
    sender, receiver = _graph(gen, n, e, device)
    conv_tail = [sender, receiver, n, lmax_in, lmax_sh, lmax_out]
    if op in ("conv_tp", "conv_tp_spline"):
        x = _random(gen, (n, c, (lmax_in + 1) ** 2), dtype, device)
        y = _random(gen, (e, (lmax_sh + 1) ** 2), dtype, device)
        if op == "conv_tp":
            w = _random(gen, (e, n_paths, c), dtype, device)
            return _Case([x, y, w, *conv_tail], {"node_feats": 0, "edge_attrs": 1, "edge_weights": 2})
        r = torch.rand(e, generator=gen, dtype=torch.float64) * 3.0
        vals, idx = reference.spline_coefficients(r, 3.0, knots)
        table = _random(gen, (knots, n_paths, c), dtype, device)
        return _Case([x, y, vals.to(device=device, dtype=dtype), idx.to(device), table, *conv_tail],
                     {"node_feats": 0, "edge_attrs": 1, "spline_vals": 2, "table": 4})
    a = _random(gen, (n, c, (lmax + 1) ** 2), dtype, device)
    if op == "grid_product":
        to_grid, from_grid = reference.gaunt_grid(lmax, lmax, dtype=dtype, device=device)
        b = _random(gen, (n, c, (lmax + 1) ** 2), dtype, device)
        return _Case([a, b, to_grid, from_grid], {"a": 0, "b": 1})
    if op == "symmetric_contraction":
        n_rows, correlation = 2, 3
        l2 = reference.contraction_lmax2(lmax, lmax, correlation)
        element = torch.randint(0, n_rows, (n,), generator=gen).to(device)
        w1 = _random(gen, (n_rows, lmax + 1, c), dtype, device)
        w2 = _random(gen, (n_rows, reference.pair_paths(lmax, lmax, l2, symmetric=True), c), dtype, device)
        w3 = _random(gen, (n_rows, reference.pair_paths(l2, lmax, lmax), c), dtype, device)
        return _Case([a, element, w1, w2, w3, lmax, lmax, correlation], {"A": 0, "w1": 2, "w2": 3, "w3": 4})
    raise ValueError(f"check_ops: unknown op {op!r}; ops are {OPS}")


def _cotangent(like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _run(fn: Callable, case: _Case, cotangent_seed: int, double_backward: bool = False) -> dict[str, torch.Tensor]:
    """Output and input gradients (for a fixed random cotangent) of ``fn`` on fresh leaves; with
    ``double_backward``, also the gradients of ``<gradients, random cotangents>`` (``"grad2 <name>"``:
    the second derivatives training on forces takes)."""
    args = list(case.args)
    for i in case.grads.values():
        args[i] = args[i].detach().clone().requires_grad_()
    out = fn(*args)
    names = list(case.grads)
    inputs = [args[case.grads[k]] for k in names]
    grads = torch.autograd.grad(out, inputs, _cotangent(out, cotangent_seed), allow_unused=True,
                                create_graph=double_backward)
    results = {"output": out.detach()}
    for name, g in zip(names, grads):
        results[f"grad {name}"] = torch.zeros_like(args[case.grads[name]]) if g is None else g.detach()
    if double_backward:
        # only first derivatives that depend on the inputs can be differentiated again
        pairs = [(g, _cotangent(g, cotangent_seed + 1 + i)) for i, g in enumerate(grads)
                 if g is not None and g.requires_grad]
        second = torch.autograd.grad([g for g, _ in pairs], inputs, [v for _, v in pairs], allow_unused=True) \
            if pairs else [None] * len(inputs)
        for name, g2, leaf in zip(names, second, inputs):
            results[f"grad2 {name}"] = torch.zeros_like(leaf) if g2 is None else g2
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
    n_nodes: int = 5,
    n_edges: int = 12,
    lmax_in: int | None = None,
    double_backward: bool = False,
) -> list[OpCheck]:
    """Compare each op of ``backend`` with the torch reference on random inputs.

    Every op in ``ops`` runs on random inputs (``n_nodes`` nodes, ``n_edges`` edges, ``channels``
    channels, degree ``lmax``) once on ``backend`` and once on :mod:`mlip.kernels.reference`; the
    output and the gradient of every floating input for a random cotangent are compared, and with
    ``double_backward`` the gradients of those gradients (for random cotangents) too.

    Args:
        backend: e.g. ``BACKENDS["triton"]``.
        device: where to run (default: CUDA when available, else the CPU).
        dtype: floating dtype of the inputs (a key of :data:`TOLERANCES`).
        raise_on_mismatch: raise :class:`BackendMismatchError` instead of returning failed checks.
        n_nodes, n_edges: graph size (at least 2 nodes; the last node has no edges).
        lmax_in: degree of the convolutions' node input (default ``lmax - 1``: a rectangular path
            set, as in the model's first layers).
        double_backward: also compare second derivatives (training on forces).

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
    if n_nodes < 2:
        raise ValueError(f"check_ops: n_nodes must be at least 2, got {n_nodes}")
    lmax_in = max(lmax - 1, 0) if lmax_in is None else int(lmax_in)
    shape = {"n_nodes": n_nodes, "n_edges": n_edges, "channels": channels, "lmax_in": lmax_in, "lmax": lmax}
    checks = []
    for i, op in enumerate(ops):
        case = _case(op, lmax, lmax_in, n_nodes, n_edges, channels, dtype, device, seed)
        got = _run(getattr(backend.ops, op), case, seed + 1 + i, double_backward)
        want = _run(getattr(reference, op), case, seed + 1 + i, double_backward)
        errors = {key: _relative_error(got[key], want[key]) for key in want}
        del got, want, case  # model-sized inputs: free them before the next op
        checks.append(OpCheck(op, backend.name, dtype, str(device), TOLERANCES[dtype], errors, shape))
    failed = [check for check in checks if not check.ok]
    if failed and raise_on_mismatch:
        raise BackendMismatchError(
            f"kernel backend {backend.name!r} ({dtype}, {device}) disagrees with the torch reference: "
            + "; ".join(check.describe() for check in failed)
        )
    return checks
