"""``torch.compile`` (Inductor) of the energy -> forces/stress function, for inference and training.

What torch 2.x cannot do shapes how this works (measured with torch 2.13 on a two-layer MLP):
``torch.compile`` of the model's forward gives forces through AOTAutograd's compiled backward, which
cannot be differentiated again ("torch.compile with aot_autograd does not currently support double
backward"), so force training fails; Dynamo does not trace ``torch.autograd.grad`` (graph break, same
error); compiled autograd refuses it too ("does not currently support higher order gradients").
So, as nequip does for its train-time compile, :func:`mlip.models.outputs.predict` as a whole (energy,
and forces and stress by autograd) is first traced by ``make_fx`` into one graph of ATen ops, with the
parameters as inputs and symbolic atom and edge counts, and that graph is compiled by
``torch.compile(dynamic=True)``. Training then differentiates this graph once w.r.t. the parameters:
a plain first backward of a graph that already holds the force derivative.

:class:`CompiledPotential` wraps a model: the first call for a new kind of input (forces/stress
wanted, head, padded structure count, train/eval mode) traces, compiles and checks the compiled
result against eager (weight gradients too, in training); later calls with any number of atoms and
edges reuse it (Dynamo may recompile once when a structure crosses ``n_atoms + readout_hidden = 32``:
Inductor writes smaller CPU matrix products as pointwise ones). If anything fails it warns once, naming
the exception, and stays eager from then on. On CPU it is not faster than eager for the presets
(``docs/benchmarks.md``, torch.compile), hence off by default.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mlip.data.graph import GraphBatch
from mlip.models.base import PotentialModel
from mlip.models.outputs import predict
from mlip.models.tracing import SymbolicBatch, traceable_kernels
from mlip.nn.embedding import check_batch_charge_spin

__all__ = ["NOT_COMPILABLE", "CompileError", "CompiledPotential", "compile_model", "compile_problem"]

#: families whose forward cannot be traced into one graph valid for every structure, and why
NOT_COMPILABLE = {
    "frame-averaged": (
        "its PCA frames are chosen by data-dependent branches (degenerate axes, mlip/nn/frames.py), which "
        "a trace would freeze at the example structure's branch"
    ),
}

#: the inputs of the traced function, in order (``GraphBatch`` fields; the labels are not inputs)
_INPUTS = ("positions", "numbers", "cell", "pbc", "edge_index", "unit_shifts", "batch", "ptr", "charge", "spin")
#: per-structure outputs, padded to the traced structure count and cut back after the call
_PER_GRAPH = ("energy", "stress", "virial")


class CompileError(RuntimeError):
    """Compilation could not give a function equal to eager (the reason is in the message)."""


def compile_problem(model: Any, training: bool = False) -> str | None:
    """Why ``model`` cannot be compiled, or ``None`` if it can (then compilation may still fail and
    fall back; this lists what is known beforehand).

    Args:
        model: a model, or anything else given to the calculator (a committee, an exported package).
        training: whether the compiled function is used to train (several structures per batch).
    """
    if not isinstance(model, PotentialModel):
        return (f"{type(model).__name__} is not a single model (a committee or an exported .pt2 package, "
                "which is compiled already)")
    if model.family in NOT_COMPILABLE:
        return f"the {model.family!r} family cannot be compiled: {NOT_COMPILABLE[model.family]}"
    if training and len(getattr(model.config, "heads", ["default"])) > 1:
        return ("the model has several heads: each structure's head index is a constant of the traced graph, "
                "so one graph cannot serve batches whose heads differ")
    return None


def compile_model(model: Any, training: bool = False, **kwargs: Any) -> Any:
    """``model`` wrapped in a :class:`CompiledPotential`, or, with a warning that says why, ``model`` itself
    when it cannot be compiled (:func:`compile_problem`). ``kwargs`` go to :class:`CompiledPotential`."""
    why = compile_problem(model, training)
    if why is not None:
        warnings.warn(f"torch.compile is not used, the model runs as it is: {why}", RuntimeWarning, stacklevel=2)
        return model
    return CompiledPotential(model, training=training, **kwargs)


class _Predict(torch.nn.Module):
    """``predict`` of one kind of call as a function of the :data:`_INPUTS` (a tuple of outputs)."""

    def __init__(self, model: PotentialModel, heads: list[str], keys: list[str], forces: bool, stress: bool,
                 create_graph: bool) -> None:
        super().__init__()
        self.model = model
        self.heads, self.keys = heads, keys
        self.forces, self.stress, self.create_graph = forces, stress, create_graph

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                edge_index: torch.Tensor, unit_shifts: torch.Tensor, batch: torch.Tensor, ptr: torch.Tensor,
                charge: torch.Tensor, spin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nan = float("nan")
        graph = SymbolicBatch(
            # [n_edges, 2] storage viewed as [2, n_edges]: the receiver row then starts at offset 1, not at
            # n_edges (tracing compares storage offsets and would fix n_edges; as in mlip.export)
            positions=positions, numbers=numbers, cell=cell, pbc=pbc, edge_index=edge_index.t().contiguous().t(),
            unit_shifts=unit_shifts, batch=batch, ptr=ptr, energy=torch.full_like(charge, nan),
            forces=torch.full_like(positions, nan), stress=torch.full_like(cell, nan), charge=charge, spin=spin,
            weight=torch.ones_like(charge), head=self.heads, isolated=torch.zeros_like(charge, dtype=torch.bool),
        )
        out = predict(self.model, graph, forces=self.forces, stress=self.stress, create_graph=self.create_graph)
        return tuple(out[k] for k in self.keys)


@dataclass
class _Compiled:
    """One compiled kind of call: the function, its output keys and the structure count it was traced for."""

    fn: Any
    keys: list[str]
    n_graphs: int


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hide a logger's warnings (the trace logs each data-dependent check it resolves from real values)."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _padded_count(n_graphs: int, at_least: int = 1) -> int:
    """Structures per traced call: one structure stays one (the calculator); a batch is padded to
    ``at_least`` structures, or if it has more, to the next power of two, so that few graphs serve
    every batch (each structure's head index is a constant of the trace, and so is their count).

    >>> [_padded_count(n) for n in (1, 2, 3, 5)], [_padded_count(n, 6) for n in (1, 6, 7)]
    ([1, 2, 4, 8], [6, 6, 8])
    """
    if n_graphs <= at_least:
        return at_least
    return 1 if n_graphs == 1 else 1 << max(1, math.ceil(math.log2(n_graphs)))


def _pad(batch: GraphBatch, n_graphs: int, head: str) -> tuple[list[torch.Tensor], list[str]]:
    """The :data:`_INPUTS` of ``batch`` with empty structures appended up to ``n_graphs`` (unit cell,
    charge 0, multiplicity 1, no atoms), and the padded head list."""
    extra = n_graphs - batch.n_graphs
    inputs = [getattr(batch, name) for name in _INPUTS]
    if extra == 0:
        return inputs, list(batch.head)
    pad = dict(zip(_INPUTS, inputs))
    eye = torch.eye(3, dtype=batch.cell.dtype, device=batch.cell.device).expand(extra, 3, 3)
    pad["cell"] = torch.cat([batch.cell, eye])
    pad["pbc"] = torch.cat([batch.pbc, batch.pbc.new_zeros(extra, 3)])
    pad["ptr"] = torch.cat([batch.ptr, batch.ptr[-1:].expand(extra)])
    pad["charge"] = torch.cat([batch.charge, batch.charge.new_zeros(extra)])
    pad["spin"] = torch.cat([batch.spin, batch.spin.new_ones(extra)])
    return [pad[name] for name in _INPUTS], list(batch.head) + [head] * extra


def _reconnect_saved_outputs(graph: torch.fx.GraphModule) -> int:
    """Undo the cut that ``make_fx`` puts into a traced double backward; returns how many it undid.

    An op that saves its own output for the backward (``exp``, ``sqrt``, ``norm``...) saves it detached
    and detaches it again when the backward unpacks it; below autograd these are two ``aten.detach``
    calls, which the trace records. Eager autograd still connects the unpacked output to the graph
    (the force's derivative w.r.t. the weights flows through it), but in the traced graph the detach
    is a stop-gradient: training on forces through it got wrong weight gradients (measured: 13 % off in
    the toy pair potential's ``exp`` basis). A user's ``x.detach()`` is a single detach and is kept.
    """
    undone = 0
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and src.op == "call_function" \
                    and src.target is torch.ops.aten.detach.default:
                node.replace_all_uses_with(src.args[0])
                graph.graph.erase_node(node)
                undone += 1
    graph.recompile()
    return undone


#: ATen ops whose result's size or value decides the rest of the trace from the example's data
_DATA_DEPENDENT = ("nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "_local_scalar_dense")


def _check_data_independent(graph: torch.fx.GraphModule) -> None:
    """Refuse a trace whose computation depends on data-dependent sizes or values.

    The trace resolves such decisions with the example's values (``fake_tensor_propagate_real_tensors``)
    and would replay them for every later structure: e.g. ``SpeciesLinear`` (``skip_per_element``)
    loops over ``torch.unique(element).tolist()`` and indexes with ``nonzero``, which fixes the example's
    set of elements (and Inductor cannot compile the data-dependent sizes: "Could not guard on
    data-dependent expression"). Checks whose results feed no computation (the unknown-element test,
    charge/spin) are dead code here and removed first; :meth:`CompiledPotential._check_inputs` runs them
    eagerly instead. A data-dependent Python branch leaves no op behind: the families shipped have none
    besides those checks, and ``frame-averaged``, which has, is refused (:data:`NOT_COMPILABLE`).
    """
    graph.graph.eliminate_dead_code()  # ops that mutate their inputs count as used
    graph.recompile()
    found = sorted({str(n.target) for n in graph.graph.nodes
                    if n.op == "call_function" and any(f"aten.{op}." in str(n.target) for op in _DATA_DEPENDENT)})
    if found:
        raise CompileError(f"the model's forward has data-dependent sizes or values ({', '.join(found)}; e.g. a "
                           "loop over the elements present, as skip_per_element's SpeciesLinear does): a trace would "
                           "fix them to the first structure's")


def _max_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[str, float]:
    """Largest ``|got - ref| / (max|ref| + 1)`` over the keys of ``ref`` (NaN where both are NaN is equal)."""
    worst, where = 0.0, ""
    for key, r in ref.items():
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            continue
        g, r = got[key].detach().double(), r.detach().double()
        both_nan = torch.isnan(g) & torch.isnan(r)
        diff = torch.where(both_nan, torch.zeros_like(g), (g - r).abs())
        scale = float(torch.nan_to_num(r, nan=0.0).abs().max()) + 1.0 if r.numel() else 1.0
        err = float(torch.nan_to_num(diff, nan=math.inf).max()) / scale if r.numel() else 0.0
        if err > worst or not where:
            worst, where = err, key
    return where, worst


class CompiledPotential:
    """A model whose energy/forces/stress function runs compiled by Inductor, with an eager fallback.

    Calls with fewer than two atoms or edges run eager (a trace would fix a size of 0 or 1). The first
    call of each kind also runs eager and compares: results that differ by more than round-off
    (``tol``, relative to the largest value of each output) are an error, and the wrapper falls back.

    Args:
        model: the model (not modified: its kernel backend is swapped only while tracing).
        training: parameters stay inputs that require grad, so that a loss built on the outputs
            (forces included, with ``create_graph=True``) trains the model.
        tol: largest relative difference from eager accepted at the first call (``None``: 1e-4 in
            float32, 1e-9 in float64).
        options: Inductor options passed to ``torch.compile``.
        min_graphs: batches are padded with empty structures to at least this many (training: the
            most structures of any batch, so that one graph serves all; see :func:`_padded_count`).

    Attributes:
        model: the eager model. failed: the fallback's reason (``None`` while compiled).
        n_compiled: kinds of call compiled so far. compile_s: seconds spent tracing and compiling
            (the first call of each kind, measured around it).
    """

    def __init__(self, model: PotentialModel, training: bool = False, tol: float | None = None,
                 options: dict[str, Any] | None = None, min_graphs: int = 1) -> None:
        self.model = model
        self.min_graphs = int(min_graphs)
        self.training = training
        self.tol = tol
        self.options = dict(options or {})
        self.failed: str | None = compile_problem(model, training)
        self.n_compiled = 0
        self.compile_s = 0.0
        self._fns: dict[tuple, _Compiled] = {}
        if self.failed is not None:
            self._warn(self.failed)

    # what the calculator, committees and md read from a model
    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        state = f"eager fallback: {self.failed}" if self.failed else f"{self.n_compiled} compiled"
        return f"CompiledPotential({self.model.family}, {state})"

    def predict_batch(self, batch: GraphBatch, forces: bool = True, stress: bool = False) -> dict[str, torch.Tensor]:
        """:func:`mlip.models.outputs.predict` (same keys, shapes and units), compiled."""
        return self.predict(batch, forces=forces, stress=stress)

    def predict(self, batch: GraphBatch, forces: bool = True, stress: bool = False,
                create_graph: bool = False) -> dict[str, torch.Tensor]:
        """:func:`mlip.models.outputs.predict` of the wrapped model, compiled (eager after a failure).

        Shapes: as :func:`~mlip.models.outputs.predict`.
        """
        if self.failed is not None or batch.n_atoms < 2 or batch.n_edges < 2:
            return predict(self.model, batch, forces=forces, stress=stress, create_graph=create_graph)
        self._check_inputs(batch)  # the checks the trace resolved once, for this batch
        n_graphs = _padded_count(batch.n_graphs, self.min_graphs)
        heads = list(getattr(self.model.config, "heads", ["default"]))
        key = (forces, stress, create_graph, self.model.training, n_graphs,
               tuple(batch.head) if len(heads) > 1 else None, batch.positions.dtype, batch.positions.device)
        try:
            entry = self._fns.get(key)
            if entry is None:
                t0 = time.perf_counter()
                entry, ref = self._build(batch, n_graphs, heads[0], forces, stress, create_graph)
                out = self._call(entry, batch)
                self.compile_s += time.perf_counter() - t0
                self._check_equal(out, ref)
                if self.training:  # on a second call: this one's graph is for the caller's backward
                    self._check_gradients(self._call(entry, batch), ref)
                self._fns[key] = entry
                self.n_compiled += 1
                return out
            return self._call(entry, batch)
        except Exception as err:  # noqa: BLE001 - any failure of tracing, compiling or running: eager
            self._warn(f"{type(err).__name__}: {err}")
            self._fns.clear()
            return predict(self.model, batch, forces=forces, stress=stress, create_graph=create_graph)

    # -- internals -----------------------------------------------------------------------------
    def _warn(self, why: str) -> None:
        self.failed = why.strip().splitlines()[0][:500] if why.strip() else "unknown error"
        warnings.warn(f"torch.compile of the {getattr(self.model, 'family', type(self.model).__name__)} model "
                      f"is not used, the model runs eager: {self.failed}", RuntimeWarning, stacklevel=3)

    def _check_inputs(self, batch: GraphBatch) -> None:
        """Unknown elements and impossible charge/spin pairs raise as in eager (in the traced graph these
        data-dependent checks were resolved for the example structure)."""
        self.model.check_batch(batch)
        check_batch_charge_spin(self.model.config, batch)

    def _params(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers, inputs of the traced function (detached unless training)."""
        named = {f"model.{k}": v for k, v in self.model.named_parameters()}
        named.update({f"model.{k}": v for k, v in self.model.named_buffers()})
        return named if self.training else {k: v.detach() for k, v in named.items()}

    def _build(self, batch: GraphBatch, n_graphs: int, head: str, forces: bool, stress: bool,
               create_graph: bool) -> tuple[_Compiled, dict[str, torch.Tensor]]:
        """Trace and compile one kind of call; also returns eager's results for ``batch`` (the check)."""
        import torch._functorch.config as functorch_config
        from torch.fx.experimental import _config as fx_config
        from torch.fx.experimental.proxy_tensor import make_fx

        ref = predict(self.model, batch, forces=forces, stress=stress, create_graph=create_graph)
        keys = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
        inputs, heads = _pad(batch, n_graphs, head)
        module = _Predict(self.model, heads, keys, forces, stress, create_graph)
        params = self._params()

        def fn(params: dict[str, torch.Tensor], *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.func.functional_call(module, params, args)

        # opt_einsum plans contractions from concrete sizes (it would fix the edge count); data-dependent
        # checks (unknown elements, charge/spin) are resolved with the example's values: they run eagerly
        # before every call instead (_check_inputs); no duck sizing, so that an atom count equal to a
        # channel count by chance does not tie the two together
        with traceable_kernels(self.model, "torch-compile"), torch.backends.opt_einsum.flags(enabled=False), \
                functorch_config.patch(fake_tensor_propagate_real_tensors=True), \
                fx_config.patch(use_duck_shape=False), _quiet("torch.fx.experimental.symbolic_shapes"):
            graph = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(params, *inputs)
        _reconnect_saved_outputs(graph)
        _check_data_independent(graph)
        self._check_symbolic(graph)
        compiled = torch.compile(graph, dynamic=True, fullgraph=True, options=self.options or None)
        return _Compiled(compiled, keys, n_graphs), ref

    @staticmethod
    def _check_symbolic(graph: torch.fx.GraphModule) -> None:
        """The trace must keep the atom and edge counts symbolic (else it is valid for one size only)."""
        inputs = [n for n in graph.graph.nodes if n.op == "placeholder"][-len(_INPUTS):]
        for node, name, dim in zip(inputs, _INPUTS, (0, 0, None, None, 1, 0, 0, None, None, None)):
            val = node.meta.get("val")
            if dim is not None and val is not None and not isinstance(val.shape[dim], torch.SymInt):
                raise CompileError(f"the trace fixed dimension {dim} of {name} to {val.shape[dim]}: "
                                   "the compiled function would be valid for one structure size only")

    def _call(self, entry: _Compiled, batch: GraphBatch) -> dict[str, torch.Tensor]:
        inputs, _ = _pad(batch, entry.n_graphs, "default")
        with torch.enable_grad() if self.training else contextlib.nullcontext():
            outs = entry.fn(self._params(), *inputs)
        result = dict(zip(entry.keys, outs))
        for key in _PER_GRAPH:
            if key in result:
                result[key] = result[key][: batch.n_graphs]
        return result

    def _tolerance(self, ref: dict[str, torch.Tensor]) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-9 if next(iter(ref.values())).dtype == torch.float64 else 1e-4

    def _check_equal(self, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
        tol = self._tolerance(ref)
        where, err = _max_error(got, ref)
        if not err <= tol:
            raise CompileError(f"compiled {where} differs from eager by {err:.2e} (relative, > {tol:.0e})")

    def _check_gradients(self, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
        """Weight gradients of a random linear function of the outputs (forces included, so second
        derivatives are compared when the forces were computed with ``create_graph``) equal eager's."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        keys = [k for k in ref if ref[k].requires_grad and got[k].requires_grad]
        if not params or not keys:
            return
        weights = {k: torch.randn(ref[k].shape, generator=gen, dtype=torch.float64).to(ref[k]) for k in keys}

        def grads(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            total = sum((weights[k] * torch.nan_to_num(out[k])).sum() for k in keys)
            gs = torch.autograd.grad(total, params, allow_unused=True)
            return {f"gradient {i}": torch.zeros_like(p) if g is None else g for i, (p, g) in enumerate(zip(params, gs))}

        tol = self._tolerance(ref)
        where, err = _max_error(grads(got), grads(ref))
        if not err <= tol:
            raise CompileError(f"compiled weight {where} differs from eager by {err:.2e} (relative, > {tol:.0e})")
