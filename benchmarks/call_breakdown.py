"""Where one energy + forces call of an ``equivariant`` preset spends its CPU time, by component, and
what a segment sum over receiver-sorted edges would cost instead of ``index_add_``.

Part 1, the breakdown: one call (``mlip.models.outputs.predict``, forces by autograd, ASE neighbour
list, float32, one thread, after a warm-up call) under ``torch.profiler``. Every layer's components
run inside a named ``record_function`` range: the edge convolution (radial weights, gather, CG
product, scatter-sum at the receiver), the symmetric contraction, the spherical-grid mixing, the
equivariant linears and the skip. A backward node is charged to the component whose forward op
created it (the profiler gives both the same ``sequence_nr``), so each component's time is its
forward plus its share of the force backward; the rest (harmonics, radial basis, readouts, the
autograd bookkeeping) is "other". The ``index_add_``/``scatter_add_`` ops are also summed on their own,
wherever they run.

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
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
def _in_range(obj: Any, attr: str, name: str) -> None:
    """Run ``obj.attr`` (a module's ``forward`` or a method) inside ``record_function(name)``."""
    from torch.profiler import record_function

    fn = getattr(obj, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    setattr(obj, attr, wrapped)


def label_components(model: Any) -> None:
    """Put every layer's components (:data:`COMPONENTS`) of an ``EquivariantModel`` into named ranges."""
    for layer in model.layers:
        _in_range(layer, "_edge_conv", COMPONENTS[0])
        _in_range(layer.contraction, "forward", COMPONENTS[1])
        if layer.mixing is not None:
            _in_range(layer.mixing, "forward", COMPONENTS[2])
        for linear in (layer.linear_up, layer.path_linear, layer.linear_out, layer.skip):
            if linear is not None:
                _in_range(linear, "forward", COMPONENTS[3])


def attribute(events: Any) -> dict[str, float]:
    """CPU seconds per component: its ranges' forward time plus the backward nodes its forward ops
    created; ``other`` is the rest of the profiled self time, ``total`` all of it."""

    def owner(event: Any) -> str | None:
        while event is not None:
            if event.name in COMPONENTS:
                return event.name
            event = event.cpu_parent
        return None

    out = dict.fromkeys(COMPONENTS, 0.0)
    creator: dict[int, str] = {}
    backward = "autograd::engine::evaluate_function"
    for e in events:
        if e.name in COMPONENTS and owner(e.cpu_parent) is None:  # outermost range only
            out[e.name] += e.cpu_time_total
        elif e.sequence_nr >= 0 and not e.name.startswith(backward) and (name := owner(e)):
            creator.setdefault(e.sequence_nr, name)
    for e in events:
        if e.name.startswith(backward) and e.sequence_nr in creator:
            out[creator[e.sequence_nr]] += e.cpu_time_total
    total = sum(e.self_cpu_time_total for e in events)
    out["other"] = total - sum(out.values())
    out["total"] = total
    out["index_add_/scatter_add_ (inside the above)"] = sum(e.self_cpu_time_total for e in events if e.name in SCATTER_OPS)
    return {k: v * 1e-6 for k, v in out.items()}  # the profiler counts µs


def breakdown(engine: Any, atoms: Any) -> dict[str, Any]:
    """Part 1 on one structure: CPU seconds per component of one energy + forces call, and the call's
    own process CPU time without the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn, n_edges = engine.static(atoms, stress=False)
    c0 = time.process_time()
    fn()  # warm-up, and the call's time without the profiler
    plain = time.process_time() - c0
    label_components(engine.model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {"n_edges": n_edges, "call_cpu_s": plain, "components_s": attribute(prof.events())}


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
    if chunk is None:
        ends = torch.cumsum(torch.bincount(receiver, minlength=n_nodes), 0)
        res["cumsum"] = {"fwd": _cpu_ms(lambda: _segment_cumsum(src, ends), repeats)}
        exact = torch.zeros(n_nodes, width, dtype=torch.float64).index_add_(0, receiver, src.double())
        err = (_segment_cumsum(src, ends).double() - exact).abs().max() / exact.abs().max()
        res["cumsum_max_rel_err"] = float(err)
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
    """Markdown: the components' CPU ms and share per structure; the scatter lever per layer and mode."""
    rows = []
    for r in results:
        comp = r["components_s"]
        for name, sec in comp.items():
            if name != "total":
                rows.append([r["structure"], name, f"{1e3 * sec:,.0f}", f"{100 * sec / comp['total']:.1f} %"])
        rows.append([r["structure"], "total (profiled)", f"{1e3 * comp['total']:,.0f}",
                     f"call without profiler: {1e3 * r['call_cpu_s']:,.0f} ms"])
    first = common.markdown_table(["structure", "component", "CPU ms", "share"], rows)
    rows = []
    for r in results:
        for lv in r["scatter"]:
            mode = f"chunks of {lv['chunk']}" if lv["chunk"] else "all edges"
            cumsum = (f"{lv['cumsum']['fwd']:.1f} (rel. err {lv['cumsum_max_rel_err']:.0e})" if "cumsum" in lv else "—")
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
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per scatter variant (median)")
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
        res = {"structure": structure, "n_atoms": len(atoms), **breakdown(engine, atoms)}
        res["scatter"] = layer_levers(engine, atoms, args.repeats)
        results.append(res)
        print(f"# {structure}: {len(atoms)} atoms, {res['n_edges']} edges, done", flush=True)
    end = common.environment()["load_average"]
    print(f"\nload average at the end {end}")
    print(tables(results), flush=True)
    out = {"env": env, "load_average_end": end, "preset": args.preset, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
