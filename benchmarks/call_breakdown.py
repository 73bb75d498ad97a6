"""Where one energy + forces call of an ``equivariant`` preset spends its CPU time, by component, and
what a segment sum over receiver-sorted edges would cost instead of ``index_add_``.

Part 1, the breakdown of a call (``mlip.models.outputs.predict``, forces by autograd, ASE neighbour
list, float32, one thread) into the components of every layer: the edge convolution (radial
weights, gather, CG product, scatter-sum at the receiver), the symmetric contraction, the
spherical-grid mixing, and the equivariant linears with the skip; median over calls of process CPU
time. A component's forward is timed around its calls; its backward from the moment its output's
gradient arrives to the moment its last input's gradient leaves (identity autograd nodes stamp
both: autograd runs the nodes in reverse order of creation, so nothing else runs in between).
"other" is the rest of the call (harmonics, radial basis, readouts, autograd bookkeeping). One more
call under ``torch.profiler`` sums the self time of its ``index_add_``/``scatter_add_`` ops, wherever
they run (the receiver sums, the backward's sums over senders and into positions); the profiler adds a
cost to every op, so that share is an upper bound.

Part 2, the scatter lever, on the call's real receiver array (ASE's list is sorted by receiver) and
each layer's message width ``C x D_out``: the receiver sum as the torch backend runs it at this
size (``mlip.kernels.edge_conv``: cache-sized chunks of edges when the messages exceed
``DENSE_BYTES``, else all edges at once) with ``index_add_``, against ``torch.segment_reduce`` over the
same edges (segment lengths precomputed, outside the timing), and, over all edges, a cumsum-based
segment sum (differences of a running sum at the segment ends); and the backward's gather of the
output gradient to the edges, ``index_select`` against ``repeat_interleave`` of the sorted segments::

    python -m benchmarks.call_breakdown --structures Si-512,Cu-1000 --preset medium
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    from benchmarks import _common as common
    from benchmarks import speed
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]
    import speed  # type: ignore[no-redef]

COMPONENTS = ("edge convolution", "symmetric contraction", "grid mixing", "linears and skip")
SCATTER_OPS = ("aten::index_add_", "aten::index_add", "aten::scatter_add_")
#: whole-edge variants above this many bytes per ``[n_edges, width]`` tensor are not run (memory of a shared machine)
MAX_WHOLE_BYTES = 1 << 30


# ------------------------------------------------------------------------------------ part 1
def _parts(model: Any) -> list[tuple[str, Any, str]]:
    """``(component, object, attribute)`` of every layer's components (:data:`COMPONENTS`) of an
    ``EquivariantModel``: a module's ``forward`` or the layer's ``_edge_conv`` method."""
    out = []
    for layer in model.layers:
        out += [(COMPONENTS[0], layer, "_edge_conv"), (COMPONENTS[1], layer.contraction, "forward")]
        if layer.mixing is not None:
            out.append((COMPONENTS[2], layer.mixing, "forward"))
        out += [(COMPONENTS[3], m, "forward") for m in (layer.linear_up, layer.path_linear, layer.linear_out,
                                                         layer.skip) if m is not None]
    return out


@contextlib.contextmanager
def _around(model: Any, around: Callable[..., Any]) -> Iterator[None]:
    """Inside the block, every component call ``fn(*args, **kwargs)`` of ``model`` runs as
    ``around(component, fn, *args, **kwargs)``; the original methods come back after it."""
    parts = _parts(model)
    for name, obj, attr in parts:
        setattr(obj, attr, functools.partial(around, name, getattr(obj, attr)))  # an instance attribute
    try:
        yield
    finally:
        for _, obj, attr in parts:
            delattr(obj, attr)  # the class's method again


class _Stamp(torch.autograd.Function):
    """Identity whose backward appends ``(key, process CPU time)`` to ``log``: when a gradient passes."""

    @staticmethod
    def forward(ctx, x, log, key):
        ctx.log, ctx.key = log, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append((ctx.key, time.process_time()))
        return grad, None, None


def _one_call(model: Any, fn: Callable[[], Any]) -> dict[str, dict[str, float]]:
    """CPU ms of every component's forward and backward in one call ``fn()`` (see the module docstring)."""
    fwd, log, count = dict.fromkeys(COMPONENTS, 0.0), [], itertools.count()

    def timed(name: str, f: Callable, *args: Any, **kwargs: Any) -> Any:
        k = next(count)
        args = tuple(_Stamp.apply(a, log, (name, k, "in")) if torch.is_tensor(a) and a.requires_grad else a
                     for a in args)
        c0 = time.process_time()
        out = f(*args, **kwargs)
        fwd[name] += time.process_time() - c0
        return _Stamp.apply(out, log, (name, k, "out")) if out.requires_grad else out

    with _around(model, timed):
        fn()
    arrived, left = {}, {}
    for (name, k, side), t in log:
        if side == "out":
            arrived[(name, k)] = t
        else:
            left[(name, k)] = max(left.get((name, k), t), t)
    bwd = dict.fromkeys(COMPONENTS, 0.0)
    for (name, k), t in arrived.items():
        bwd[name] += left.get((name, k), t) - t
    return {name: {"fwd": 1e3 * fwd[name], "bwd": 1e3 * bwd[name]} for name in COMPONENTS}


def breakdown(engine: Any, atoms: Any, repeats: int) -> dict[str, Any]:
    """Part 1 on one structure: the call's median CPU ms; per component the medians of its forward and
    backward CPU ms; the profiled self time of the scatter ops and of the whole call."""
    from torch.profiler import ProfilerActivity, profile

    fn, n_edges = engine.static(atoms, stress=False)
    call_ms = _cpu_ms(fn, repeats)
    calls = [_one_call(engine.model, fn) for _ in range(repeats)]
    parts = {name: {side: statistics.median(c[name][side] for c in calls) for side in ("fwd", "bwd")}
             for name in COMPONENTS}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    profiled = {"scatter_ms": 1e-3 * sum(e.self_cpu_time_total for e in events if e.name in SCATTER_OPS),
                "total_ms": 1e-3 * sum(e.self_cpu_time_total for e in events)}  # the profiler counts µs
    return {"n_edges": n_edges, "call_cpu_ms": call_ms, "components_ms": parts, "profiled": profiled}


# ------------------------------------------------------------------------------------ part 2
def _cpu_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median process CPU ms of ``fn()`` over ``repeats`` runs, after one untimed run."""
    fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return 1e3 * statistics.median(times)


def _segment_cumsum(src: Any, ends: Any) -> Any:
    """Segment sums of ``src`` [E, W] as differences of its running sum at the segment ends ``ends`` [N]
    (exclusive, non-decreasing; empty segments give 0) -> [N, W]."""
    import torch

    running = torch.cat([src.new_zeros(1, src.shape[1]), src.cumsum(0)])
    at_end = running.index_select(0, ends)
    return at_end - torch.cat([at_end.new_zeros(1, src.shape[1]), at_end[:-1]])


def scatter_lever(receiver: Any, n_nodes: int, width: int, chunk: int | None, repeats: int) -> dict[str, Any]:
    """Part 2 for one layer: CPU ms of the receiver sum (``fwd``) and of the gather of the output
    gradient to the edges (``bwd``) with ``index_add_`` / ``index_select``, ``segment_reduce`` /
    ``repeat_interleave`` and (all edges at once only) the cumsum-based sum, over ``chunk`` edges at a
    time (``None``: all). ``receiver`` [E] sorted int64; random float32 messages of ``width`` columns.
    ``cumsum_max_rel_err``: its largest error against a float64 sum, relative to the largest |sum|."""
    import torch

    torch.manual_seed(0)
    n_edges = int(receiver.shape[0])
    spans = [(a, min(a + (chunk or n_edges), n_edges)) for a in range(0, n_edges, chunk or n_edges)]
    src = torch.randn(spans[0][1] - spans[0][0], width)  # one chunk's messages, reused: they are in cache
    grad = torch.randn(n_nodes, width)
    out = torch.zeros(n_nodes, width)
    parts = []  # per span: receivers, first receiver, segment lengths
    for a, b in spans:
        rec = receiver[a:b]
        lo = int(rec[0])
        parts.append((rec, lo, torch.bincount(rec - lo)))

    def index_add() -> None:
        for rec, _, _ in parts:
            out.index_add_(0, rec, src[: rec.shape[0]])

    def segment() -> None:
        for rec, lo, lengths in parts:
            out[lo : lo + lengths.shape[0]] += torch.segment_reduce(src[: rec.shape[0]], "sum", lengths=lengths, axis=0)

    def gather() -> None:
        for rec, _, _ in parts:
            grad.index_select(0, rec)

    def repeat() -> None:
        for _, lo, lengths in parts:
            grad[lo : lo + lengths.shape[0]].repeat_interleave(lengths, dim=0)

    res = {"width": width, "chunk": chunk, "index_add_": {"fwd": _cpu_ms(index_add, repeats), "bwd": _cpu_ms(gather, repeats)},
           "segment_reduce": {"fwd": _cpu_ms(segment, repeats), "bwd": _cpu_ms(repeat, repeats)}}
    if chunk is None:  # timed once: torch's cumsum along the rows of a wide tensor is far slower than the rest
        ends = torch.cumsum(torch.bincount(receiver, minlength=n_nodes), 0)
        c0 = time.process_time()
        sums = _segment_cumsum(src, ends)
        res["cumsum"] = {"fwd": 1e3 * (time.process_time() - c0)}
        exact = torch.zeros(n_nodes, width, dtype=torch.float64)
        for a in range(0, n_edges, 4096):  # in pieces: a float64 copy of all messages would double the memory
            exact.index_add_(0, receiver[a : a + 4096], src[a : a + 4096].double())
        res["cumsum_max_rel_err"] = float((sums.double() - exact).abs().max() / exact.abs().max())
    return res


def layer_levers(engine: Any, atoms: Any, repeats: int) -> list[dict[str, Any]]:
    """Part 2 for every layer of the engine's model on ``atoms``: chunked as the torch backend runs it
    at this size, and over all edges at once where a ``[n_edges, width]`` tensor stays under
    :data:`MAX_WHOLE_BYTES`."""
    import torch

    from mlip.kernels.edge_conv import DENSE_BYTES, chunk_edges

    i, _, _ = common.ase_edges(atoms, engine.r_max)
    receiver = torch.as_tensor(i, dtype=torch.long)
    assert bool((receiver[1:] >= receiver[:-1]).all()), "ASE's neighbour list is sorted by receiver"
    out = []
    for k, layer in enumerate(engine.model.layers):
        width = layer.C * layer.conv.out_dim
        row_bytes = 4 * width
        chunked = receiver.shape[0] * row_bytes > DENSE_BYTES
        modes = [chunk_edges(receiver.shape[0], row_bytes, torch.device("cpu")) if chunked else None]
        if chunked and receiver.shape[0] * row_bytes <= MAX_WHOLE_BYTES:
            modes.append(None)
        for chunk in modes:
            out.append({"layer": k, "as_run": chunk == modes[0],
                        **scatter_lever(receiver, len(atoms), width, chunk, repeats)})
    return out


# ------------------------------------------------------------------------------------ driver
def tables(results: list[dict[str, Any]]) -> str:
    """Markdown: per structure and component, forward and backward CPU ms and the share of the call;
    then the scatter lever per layer and mode."""
    rows = []
    for r in results:
        call, parts, prof = r["call_cpu_ms"], r["components_ms"], r["profiled"]
        for name in COMPONENTS:
            fb = parts[name]["fwd"] + parts[name]["bwd"]
            rows.append([r["structure"], name, f"{parts[name]['fwd']:,.0f}", f"{parts[name]['bwd']:,.0f}",
                         f"{fb:,.0f}", f"{100 * fb / call:.1f} %"])
        other = call - sum(p["fwd"] + p["bwd"] for p in parts.values())
        rows.append([r["structure"], "other", "", "", f"{other:,.0f}", f"{100 * other / call:.1f} %"])
        rows.append([r["structure"], "whole call", "", "", f"{call:,.0f}", "100 %"])
        rows.append([r["structure"], "index_add_/scatter_add_ ops (inside the above; profiled)", "", "",
                     f"{prof['scatter_ms']:,.0f} of {prof['total_ms']:,.0f}",
                     f"{100 * prof['scatter_ms'] / prof['total_ms']:.1f} %"])
    first = common.markdown_table(["structure", "component", "fwd CPU ms", "bwd CPU ms", "fwd + bwd CPU ms",
                                   "share of the call"], rows)
    rows = []
    for r in results:
        for lv in r["scatter"]:
            mode = f"chunks of {lv['chunk']}" if lv["chunk"] else "all edges"
            cumsum = (f"{lv['cumsum']['fwd']:,.0f} (rel. err {lv['cumsum_max_rel_err']:.0e})" if "cumsum" in lv else "—")
            rows.append([r["structure"], lv["layer"], lv["width"], mode + (" (as run)" if lv["as_run"] else ""),
                         f"{lv['index_add_']['fwd']:.1f}", f"{lv['segment_reduce']['fwd']:.1f}", cumsum,
                         f"{lv['index_add_']['bwd']:.1f}", f"{lv['segment_reduce']['bwd']:.1f}"])
    second = common.markdown_table(
        ["structure", "layer", "width C·D", "edges at a time", "index_add_ fwd ms", "segment_reduce fwd ms",
         "cumsum fwd ms", "index_select bwd ms", "repeat_interleave bwd ms"], rows)
    return first + "\n\n" + second


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", default="Si-512,Cu-1000")
    ap.add_argument("--preset", default="medium", help="configs/equivariant-<preset>.yaml")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per call, component and scatter variant (median)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    env = common.environment()
    print(f"# {common.describe(env)}; float32, 1 torch thread; equivariant {args.preset}, energy + forces", flush=True)
    results = []
    for structure in args.structures.split(","):
        engine = speed.MlipEngine({"kind": "mlip", "family": "equivariant", "preset": args.preset, "config": {},
                                   "dtype": "float32"})
        atoms = common.make_structure(structure)
        res = {"structure": structure, "n_atoms": len(atoms), **breakdown(engine, atoms, args.repeats)}
        res["scatter"] = layer_levers(engine, atoms, args.repeats)
        results.append(res)
        print(f"# {structure}: {len(atoms)} atoms, {res['n_edges']} edges, done", flush=True)
    end = common.environment()["load_average"]
    print(f"\nload average at the end {end}")
    print(tables(results), flush=True)
    out = {"env": env, "load_average_end": end, "preset": args.preset, "results": results}
    if args.json:
        common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
