"""Fused convolution kernels: loading the generated Triton source, CSR graphs and the launcher.

The convolution of :func:`mlip.kernels.reference.conv_tp` is the derivative of one
multilinear form

    T(x, Y, w, g) = sum_e sum_c sum_p w[e,p,c] sum_{m1 m2 m3} CG_p[m1,m2,m3]
                    x[snd[e], c, l1 m1] Y[e, l2 m2] g[rcv[e], c, p m3]

with respect to ``g``; its gradients are the derivatives with respect to ``x``, ``Y`` and
``w``. So four kernels cover the forward, the backward and every higher derivative
(see :mod:`mlip.kernels.triton.autograd`):

* ``conv_fwd``  ``dT/dg``: one program per (receiver, channel block) walks the receiver's
  edges in CSR order and writes each output row once (no atomics: deterministic).
* ``conv_bwd_x`` ``dT/dx``: the same walk over the transposed graph (edges sorted by sender).
* ``conv_bwd_edge`` ``dT/dY`` and ``dT/dw``: one program per block of edges, looping over
  channel blocks; ``dT/dY`` is reduced over channels in registers.

The ``spline_*`` variants are the same three kernels for
:func:`mlip.kernels.reference.conv_tp_spline`: the radial-weight tile is rebuilt in registers
from 4 cubic B-spline values per edge and 4 rows of a ``[K, P, C]`` table, and the per-edge
gradient becomes the gradient of those values (plus the table's, by atomic adds).

No kernel stores a per-edge message ``[n_edges, C, D_out]``. The kernel source, with the
Clebsch-Gordan contractions unrolled, is generated per ``(lmax_in, lmax_sh, lmax_out)`` by
:mod:`mlip.kernels.triton.codegen` and committed in ``generated/``; a triple without a committed
module is generated in memory. Nothing is written to disk at run time.
"""
from __future__ import annotations

import functools
import importlib.util
import linecache
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from mlip.kernels.reference import SPLINE_ROWS, tp_out_dim, tp_paths

# generate_source and _paths (the CG paths) are re-exported: tests and benchmarks/tp_kernels.py read them here
from mlip.kernels.triton.codegen import (  # noqa: F401
    KERNELS,
    KernelSpec,
    _paths,
    generate_module,
    generate_source,
    generated_path,
)


# --------------------------------------------------------------------------------------------
# the generated modules
# --------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    """Whether Triton's CPU interpreter is on; raise if it was switched on too late to work."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    # triton.language's own helpers (tl.sum, ...) are jitted at import: they only run in the
    # interpreter if TRITON_INTERPRET was already set when triton was first imported
    if isinstance(tl.standard.sum, JITFunction):
        raise RuntimeError(  # noqa: TRY004 - a wrong setup, not a wrong argument
            "TRITON_INTERPRET=1 was set after triton was imported; set it before the first `import triton` "
            "(e.g. at the top of the test module or in the environment)"
        )
    return True


@functools.cache
def _generated_module(lmax_in: int, lmax_sh: int, lmax_out: int) -> ModuleType:
    """The kernels of one degree triple (their functions still undecorated): the committed module in
    ``generated/``, else the same source generated in memory (registered with ``linecache``, where
    Triton's JIT reads kernel source from). Never writes a file."""
    path = generated_path(lmax_in, lmax_sh, lmax_out)
    name = f"mlip.kernels.triton.generated.{path.stem}"
    if path.is_file():
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    src = generate_module(lmax_in, lmax_sh, lmax_out)
    filename = f"<mlip generated {path.name}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
    module = ModuleType(name)
    module.__file__ = filename
    exec(compile(src, filename, "exec"), module.__dict__)  # noqa: S102 - our own generated source
    return module


#: (BLOCK_E, BLOCK_C, num_warps) tried by the autotuner on the GPU, per kernel and channel count:
#: the register-spill-free tile sizes (docs/kernels.md, "Autotuning"); few, because each is a long compile.
GPU_CONFIGS = {
    "fwd": [(4, 32, 4), (8, 32, 4)],
    "bwd_x": [(4, 32, 4), (8, 32, 4)],
    "bwd_edge": [(4, 32, 4), (8, 32, 4)],
}
#: block sizes under ``TRITON_INTERPRET=1``: small, so that the tests walk several edge and channel blocks
INTERPRET_BLOCKS = {"BLOCK_E": 4, "BLOCK_C": 2}


def _autotune_cache_kw() -> dict[str, bool]:
    """``cache_results=True`` where Triton supports it (>= 3.2): tuned configs persist across processes."""
    import inspect

    import triton

    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@functools.cache
def kernels(lmax_in: int, lmax_sh: int, lmax_out: int, interpret: bool, spline: bool = False) -> dict[str, object]:
    """The jitted kernels ``{"fwd", "bwd_x", "bwd_edge"}`` (autotuned on the GPU); ``spline``: the
    ``spline_*`` kernels of :func:`mlip.kernels.reference.conv_tp_spline`."""
    import triton

    mod = _generated_module(lmax_in, lmax_sh, lmax_out)
    out = {}
    for kind in ("fwd", "bwd_x", "bwd_edge"):
        spec = KERNELS[f"{'spline' if spline else 'conv'}_{kind}"]
        jitted = triton.jit(getattr(mod, spec.name))
        if not interpret:
            configs = [triton.Config({"BLOCK_E": be, "BLOCK_C": bc}, num_warps=nw) for be, bc, nw in GPU_CONFIGS[kind]]
            # atomics sum into zeroed outputs: every tuning run must start from zeros
            zeroed = [a.name for a in spec.outputs if a.zeroed]
            extra = {"reset_to_zero": zeroed} if zeroed else {}
            jitted = triton.autotune(configs=configs, key=["C"] + [a.name for a in spec.flags], **extra,
                                     **_autotune_cache_kw())(jitted)
        out[kind] = jitted
    return out


def _launch_meta(interpret: bool) -> dict[str, int]:
    return dict(INTERPRET_BLOCKS) if interpret else {}


# --------------------------------------------------------------------------------------------
# graph in CSR order
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CSRGraph:
    """Edges in the two orders the kernels walk.

    Shapes:
        sender, receiver [n_edges] (original edge order);
        perm_rcv, perm_snd [n_edges] edge ids sorted (stably) by receiver / sender;
        rowptr_rcv, rowptr_snd [n_nodes + 1] CSR offsets into those permutations.
    """

    sender: torch.Tensor
    receiver: torch.Tensor
    perm_rcv: torch.Tensor
    rowptr_rcv: torch.Tensor
    perm_snd: torch.Tensor
    rowptr_snd: torch.Tensor
    n_nodes: int

    @property
    def n_edges(self) -> int:
        return int(self.sender.shape[0])


def _csr(index: torch.Tensor, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a stable sort keeps the summation order fixed: results are bitwise reproducible
    sorted_idx, perm = torch.sort(index, stable=True)
    bounds = torch.arange(n_nodes + 1, device=index.device, dtype=sorted_idx.dtype)
    rowptr = torch.searchsorted(sorted_idx, bounds)  # no host sync, unlike bincount + max
    return perm.contiguous(), rowptr.contiguous()


@dataclass
class _Entry:
    sender: weakref.ref
    receiver: weakref.ref
    version: tuple
    graph: weakref.ref


class _GraphCache:
    """The CSR form of each edge list in use: every layer of a step reuses its graph's, and several
    graphs in flight (two structures evaluated in turn, a batch and its sub-batches) each keep theirs.

    One entry per ``(sender, receiver)`` pair, keyed on their identity (weak references) and in-place
    versions, so a new neighbour list, even at a recycled address, is always re-sorted. An entry lives
    as long as its :class:`CSRGraph` does: autograd holds it until the backward has run, and the cache
    holds the most recent one (layers evaluated without autograd share it too). The cache itself
    keeps no other graph alive, so it costs no memory beyond what autograd already holds.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._last: CSRGraph | None = None

    def get(self, sender: torch.Tensor, receiver: torch.Tensor, n_nodes: int) -> CSRGraph:
        key = (id(sender), id(receiver))
        version = (sender._version, receiver._version, n_nodes, tuple(sender.shape), tuple(receiver.shape),
                   sender.device)
        entry = self._entries.get(key)
        if (entry is not None and entry.sender() is sender and entry.receiver() is receiver
                and entry.version == version):
            graph = entry.graph()
            if graph is not None:
                self._last = graph
                return graph
        snd, rcv = sender.contiguous(), receiver.contiguous()
        perm_r, rowptr_r = _csr(rcv, n_nodes)
        perm_s, rowptr_s = _csr(snd, n_nodes)
        graph = CSRGraph(snd, rcv, perm_r, rowptr_r, perm_s, rowptr_s, n_nodes)
        self._prune()
        try:
            self._entries[key] = _Entry(weakref.ref(sender), weakref.ref(receiver), version, weakref.ref(graph))
        except TypeError:  # tensors that cannot be weakly referenced: no caching
            self._entries.pop(key, None)
            return graph
        self._last = graph
        return graph

    def _prune(self) -> None:
        """Drop entries whose graph or edge tensors are gone."""
        dead = [k for k, e in self._entries.items() if e.graph() is None or e.sender() is None or e.receiver() is None]
        for k in dead:
            del self._entries[k]

    def __len__(self) -> int:
        self._prune()
        return len(self._entries)


_GRAPH_CACHE = _GraphCache()


def csr_graph(sender: torch.Tensor, receiver: torch.Tensor, n_nodes: int) -> CSRGraph:
    """CSR orders of an edge list, cached per ``sender``/``receiver`` pair while its graph is in use."""
    return _GRAPH_CACHE.get(sender, receiver, n_nodes)


# --------------------------------------------------------------------------------------------
# the launcher (no autograd): one kernel launch
# --------------------------------------------------------------------------------------------
def launch(name: str, tensors: Sequence[torch.Tensor], lmax: tuple[int, int, int], flags: Sequence[bool] = (),
           wrap=None) -> tuple[torch.Tensor, ...]:
    """Launch the generated kernel ``name`` (a key of :data:`~mlip.kernels.triton.codegen.KERNELS`).

    Args:
        name: ``conv_fwd``, ``conv_bwd_x``, ``conv_bwd_edge`` or a ``spline_*`` twin.
        tensors: its inputs in the order of ``KERNELS[name].inputs``, e.g. ``(x, y, w, sender,
            perm_rcv, rowptr_rcv)`` for ``conv_fwd``.
        lmax: ``(lmax_in, lmax_sh, lmax_out)``.
        flags: its flags in the order of ``KERNELS[name].flags`` (which outputs to compute).
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``, else ``None``.

    Returns:
        Its outputs in the order of ``KERNELS[name].outputs``, allocated here: ``[n_nodes, C, D]`` for
        the node kernels (``n_nodes = len(rowptr) - 1``), per-edge gradients for the edge kernels; an
        output whose flag is off is an empty ``[0]``.
    """
    spec = KERNELS[name]
    if len(tensors) != len(spec.inputs) or len(flags) != len(spec.flags):
        raise TypeError(f"{name} takes {len(spec.inputs)} tensors and {len(spec.flags)} flags, "
                        f"got {len(tensors)} and {len(flags)}")
    given = {a.name: t for a, t in zip(spec.inputs, tensors)}
    on = {a.name: bool(f) for a, f in zip(spec.flags, flags)}
    for a in spec.role("flag"):
        if a.any_of:
            on[a.name] = any(on[f] for f in a.any_of)
    first = tensors[0]  # x or g: [n_nodes, C, D]
    sizes = {
        "N": given["rowptr_ptr"].shape[0] - 1 if "rowptr_ptr" in given else 0,
        "E": given["y_ptr"].shape[0],
        "C": first.shape[1],
        "K": given["t_ptr"].shape[0] if "t_ptr" in given else 0,
        "P": len(tp_paths(*lmax)),
        "D_IN": (lmax[0] + 1) ** 2,
        "D_SH": (lmax[1] + 1) ** 2,
        "D_OUT": tp_out_dim(*lmax),
        "ROWS": SPLINE_ROWS,
    }
    outs = {}
    for a in spec.outputs:
        shape = tuple(sizes[d] for d in a.dims) if a.flag is None or on[a.flag] else (0,)
        alloc = torch.zeros if a.zeroed else torch.empty
        outs[a.name] = alloc(shape, dtype=first.dtype, device=first.device)
    n_programs = sizes["N"] if spec.grid == "nodes" else sizes["E"]
    asked = all(a.flag is None for a in spec.outputs) or any(on[a.flag] for a in spec.outputs)
    if n_programs == 0 or sizes["C"] == 0 or not asked:
        return tuple(t.zero_() for t in outs.values())

    import triton

    interpret = _interpreting()
    kernel = kernels(*lmax, interpret, spec.spline)[spec.kind]
    kernel = wrap(kernel) if wrap is not None else kernel
    args = [given[a.name] if a.role in ("in", "index") else outs[a.name] if a.role == "out" else sizes[a.name]
            for a in spec.args if a.role in ("in", "index", "out", "size")]
    constexprs = {a.name: on[a.name] for a in spec.role("flag")}
    if spec.grid == "nodes":
        grid = lambda meta: (sizes["N"], triton.cdiv(sizes["C"], meta["BLOCK_C"]))
    else:
        grid = lambda meta: (triton.cdiv(sizes["E"], meta["BLOCK_E"]),)
    kernel[grid](*args, **constexprs, **_launch_meta(interpret))
    return tuple(outs.values())


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed): CI checks and register/spill inspection
# --------------------------------------------------------------------------------------------
def compile_for_target(lmax: tuple[int, int, int], dtype: torch.dtype = torch.float32, arch: int = 90,
                       block_e: int = 4, block_c: int = 32, num_warps: int = 4,
                       spline: bool = False) -> dict[str, object]:
    """Compile the three kernels (``spline``: the ``spline_*`` ones) to CUDA binaries for ``sm_<arch>`` without a GPU.

    Uses Triton's bundled ``ptxas``; run with ``TRITON_INTERPRET`` unset (the interpreter replaces
    Triton's own jitted helpers). Useful in CI (the generated source compiles in real mode, not
    only in the interpreter) and to read register use and spills of a block configuration. Every
    flag is on (all gradients).

    Returns:
        ``{"fwd" | "bwd_x" | "bwd_edge": triton CompiledKernel}`` (``.asm`` holds ttir/ptx/cubin).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    ptr = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    mod = _generated_module(*lmax)
    out = {}
    for kind in ("fwd", "bwd_x", "bwd_edge"):
        spec: KernelSpec = KERNELS[f"{'spline' if spline else 'conv'}_{kind}"]
        sig = spec.signature(ptr)
        names = list(sig)
        consts = {(names.index(a.name),): True for a in spec.role("flag")}
        consts[(names.index("BLOCK_E"),)] = block_e
        consts[(names.index("BLOCK_C"),)] = block_c
        src = ASTSource(fn=JITFunction(getattr(mod, spec.name)), signature=sig, constexprs=consts)
        out[kind] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return out
