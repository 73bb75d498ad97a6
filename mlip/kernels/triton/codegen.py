"""Code generation for the fused convolution kernels: every kernel's argument list, and the Triton
source of the ``conv_*`` and ``spline_*`` kernels of one ``(lmax_in, lmax_sh, lmax_out)``.

The Clebsch-Gordan contractions are unrolled here: only non-zero coefficients appear, as literals.
The generated modules are committed next to this file, in ``generated/tp_<lmax_in><lmax_sh><lmax_out>.py``,
for every degree triple the ``equivariant`` model can ask for (:data:`COMMITTED`: ``lmax_in, lmax_out
<= lmax_sh <= 3``), so the kernels a model runs can be read and reviewed, and nothing is written at run
time; ``tests/test_kernels.py`` checks that they equal what this module generates now. Regenerate them
after changing this file with::

    python -m mlip.kernels.triton.codegen

Each kernel's arguments are described once, in :data:`KERNELS`: the generated ``def`` lines, the
launcher (:func:`mlip.kernels.triton.conv.launch`), the ``torch.library`` ops and the signatures of
the ahead-of-time compile all read them from there.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mlip.kernels.reference import SPLINE_ROWS, clebsch_gordan, tp_out_dim, tp_paths

#: folder of the committed generated modules
GENERATED_DIR = Path(__file__).resolve().parent / "generated"
#: degree triples whose modules are committed: what the equivariant model can ask for (its
#: convolution's input and output degrees never exceed the spherical harmonics'); other triples
#: are generated in memory on first use
COMMITTED = tuple((lin, lsh, lout) for lsh in range(4) for lin in range(lsh + 1) for lout in range(lsh + 1))


# --------------------------------------------------------------------------------------------
# kernel arguments: described once
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    """One argument of a generated kernel.

    Attributes:
        name: the parameter name in the kernel.
        role: ``"in"`` (floating input tensor), ``"index"`` (int64 tensor), ``"out"`` (floating
            tensor the kernel writes, allocated by the launcher), ``"size"`` (int32 scalar: ``C``,
            ``K`` or ``E``), ``"flag"`` (``tl.constexpr`` bool) or ``"block"`` (``tl.constexpr`` block size).
        dims: ``"out"`` only: its shape by dimension name (``N`` nodes, ``E`` edges, ``C`` channels,
            ``K`` table rows, ``P`` paths, ``D_IN``/``D_SH``/``D_OUT`` components, ``ROWS`` spline rows).
        flag: ``"out"`` only: the flag that asks for it; not asked for, it is an empty ``[0]``.
        zeroed: ``"out"`` only: summed into with atomics, so allocated with zeros.
        any_of: ``"flag"`` only: derived by the launcher, true when any of these flags is.
    """

    name: str
    role: str
    dims: tuple[str, ...] = ()
    flag: str | None = None
    zeroed: bool = False
    any_of: tuple[str, ...] = ()

    @property
    def constexpr(self) -> bool:
        return self.role in ("flag", "block")


@dataclass(frozen=True)
class KernelSpec:
    """A generated kernel: its name, what it computes (``kind``), its arguments and its launch grid.

    ``grid = "nodes"``: one program per (node, channel block), walking that node's edges in CSR
    order; ``"edges"``: one program per block of edges, looping over channel blocks.
    """

    kind: str  # "fwd" | "bwd_x" | "bwd_edge"
    spline: bool
    args: tuple[Arg, ...]

    @property
    def name(self) -> str:
        """The kernel's function name in the generated module, e.g. ``spline_bwd_edge``."""
        return _kernel_name(self.kind, self.spline)

    @property
    def op_name(self) -> str:
        """Name of its ``torch.library`` op (namespace ``mlip``), e.g. ``conv_tp_spline_bwd_edge``."""
        return f"{'conv_tp_spline' if self.spline else 'conv_tp'}_{self.kind}"

    @property
    def grid(self) -> str:
        return "edges" if self.kind == "bwd_edge" else "nodes"

    def role(self, *roles: str) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if a.role in roles)

    @property
    def inputs(self) -> tuple[Arg, ...]:
        """Tensors the caller passes (floating inputs and indices), in order."""
        return self.role("in", "index")

    @property
    def outputs(self) -> tuple[Arg, ...]:
        return self.role("out")

    @property
    def flags(self) -> tuple[Arg, ...]:
        """Flags the caller passes, in order (derived ones excluded)."""
        return tuple(a for a in self.role("flag") if not a.any_of)

    def def_lines(self) -> list[str]:
        """The ``def`` line(s) of the generated kernel, wrapped at 110 characters."""
        params = [f"{a.name}: tl.constexpr" if a.constexpr else a.name for a in self.args]
        lines, line = [], f"def {self.name}("
        indent = " " * len(line)
        for i, p in enumerate(params):
            piece = p + ("):" if i == len(params) - 1 else ",")
            if len(line) + len(piece) + 1 > 110 and line.strip():
                lines.append(line.rstrip())
                line = indent
            line += piece + " "
        return lines + [line.rstrip()]

    def signature(self, ptr: str) -> dict[str, str]:
        """Triton's ahead-of-time signature, floating pointers as ``ptr`` (``"fp32"``/``"fp64"``)."""
        types = {"in": f"*{ptr}", "out": f"*{ptr}", "index": "*i64", "size": "i32", "flag": "constexpr",
                 "block": "constexpr"}
        return {a.name: types[a.role] for a in self.args}

    def op_signature(self) -> inspect.Signature:
        """Python signature of its ``torch.library`` op (the schema is inferred from it): the input
        tensors (``_ptr`` dropped), the three degrees, then one bool per flag; one tensor or a tuple."""
        P = inspect.Parameter
        params = [P(a.name.removesuffix("_ptr"), P.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor) for a in self.inputs]
        params += [P(n, P.POSITIONAL_OR_KEYWORD, annotation=int) for n in ("lmax_in", "lmax_sh", "lmax_out")]
        params += [P(a.name.lower(), P.POSITIONAL_OR_KEYWORD, annotation=bool) for a in self.flags]
        n_out = len(self.outputs)
        ret = torch.Tensor if n_out == 1 else tuple.__class_getitem__((torch.Tensor,) * n_out)
        return inspect.Signature(params, return_annotation=ret)


def _kernel_name(kind: str, spline: bool) -> str:
    return f"{'spline' if spline else 'conv'}_{kind}"


def _spec(kind: str, spline: bool) -> KernelSpec:
    # the radial weights: per edge [E, P, C], or 4 spline values and a knot index per edge plus a [K, P, C] table
    radial = (Arg("v_ptr", "in"), Arg("k_ptr", "index"), Arg("t_ptr", "in")) if spline else (Arg("w_ptr", "in"),)
    k_size = (Arg("K", "size"),) if spline else ()
    if kind == "fwd":
        args = (Arg("x_ptr", "in"), Arg("y_ptr", "in"), *radial, Arg("out_ptr", "out", ("N", "C", "D_OUT")),
                Arg("snd_ptr", "index"), Arg("perm_ptr", "index"), Arg("rowptr_ptr", "index"), Arg("C", "size"), *k_size)
    elif kind == "bwd_x":
        args = (Arg("g_ptr", "in"), Arg("y_ptr", "in"), *radial, Arg("gx_ptr", "out", ("N", "C", "D_IN")),
                Arg("rcv_ptr", "index"), Arg("perm_ptr", "index"), Arg("rowptr_ptr", "index"), Arg("C", "size"), *k_size)
    elif spline:
        args = (Arg("x_ptr", "in"), Arg("y_ptr", "in"), *radial, Arg("g_ptr", "in"),
                Arg("gy_ptr", "out", ("E", "D_SH"), flag="COMPUTE_Y"),
                Arg("gv_ptr", "out", ("E", "ROWS"), flag="COMPUTE_V"),
                Arg("gt_ptr", "out", ("K", "P", "C"), flag="COMPUTE_T", zeroed=True),
                Arg("snd_ptr", "index"), Arg("rcv_ptr", "index"), Arg("E", "size"), Arg("C", "size"), *k_size,
                Arg("COMPUTE_Y", "flag"), Arg("COMPUTE_V", "flag"), Arg("COMPUTE_T", "flag"),
                Arg("COMPUTE_VT", "flag", any_of=("COMPUTE_V", "COMPUTE_T")))
    else:
        args = (Arg("x_ptr", "in"), Arg("y_ptr", "in"), *radial, Arg("g_ptr", "in"),
                Arg("gy_ptr", "out", ("E", "D_SH"), flag="COMPUTE_Y"),
                Arg("gw_ptr", "out", ("E", "P", "C"), flag="COMPUTE_W"),
                Arg("snd_ptr", "index"), Arg("rcv_ptr", "index"), Arg("E", "size"), Arg("C", "size"),
                Arg("COMPUTE_Y", "flag"), Arg("COMPUTE_W", "flag"))
    return KernelSpec(kind, spline, args + (Arg("BLOCK_E", "block"), Arg("BLOCK_C", "block")))


#: every generated kernel by name: ``conv_fwd``, ``conv_bwd_x``, ``conv_bwd_edge`` and their ``spline_*`` twins
KERNELS: dict[str, KernelSpec] = {
    spec.name: spec for spec in (_spec(kind, spline) for spline in (False, True) for kind in ("fwd", "bwd_x", "bwd_edge"))
}


# --------------------------------------------------------------------------------------------
# kernel bodies
# --------------------------------------------------------------------------------------------
#: coefficients smaller than this (in absolute value) are structural zeros of the CG tensors
_CG_ZERO = 1e-12


@dataclass(frozen=True)
class _Path:
    index: int
    l1: int
    l2: int
    l3: int
    in_off: int  # first component of x_l1 in the dense input layout
    sh_off: int  # first component of Y_l2
    out_off: int  # first component of this path's output block
    nnz: tuple[tuple[int, int, int, float], ...]  # (m1, m2, m3, value), local indices


def _paths(lmax_in: int, lmax_sh: int, lmax_out: int) -> list[_Path]:
    out, off = [], 0
    for p, (l1, l2, l3) in enumerate(tp_paths(lmax_in, lmax_sh, lmax_out)):
        cg = clebsch_gordan(l1, l2, l3, torch.float64, torch.device("cpu"))
        nnz = tuple(
            (i, j, k, float(cg[i, j, k]))
            for i in range(2 * l1 + 1)
            for j in range(2 * l2 + 1)
            for k in range(2 * l3 + 1)
            if abs(float(cg[i, j, k])) > _CG_ZERO
        )
        out.append(_Path(p, l1, l2, l3, l1 * l1, l2 * l2, off, nnz))
        off += 2 * l3 + 1
    return out


def _lit(v: float) -> str:
    return f"({v!r})"


def _scaled(v: float, name: str) -> str:
    """``v * name`` with the trivial factors ``±1`` left out."""
    if v == 1.0:
        return name
    if v == -1.0:
        return f"(-{name})"
    return f"{_lit(v)} * {name}"


def _a_tables(path: _Path) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """``a[m1, m3] = sum_m2 CG[m1, m2, m3] Y[m2]``: the per-edge scalars of one path."""
    tab: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for i, j, k, v in path.nnz:
        tab.setdefault((i, k), []).append((j, v))
    return tab


def _emit_a(path: _Path, indent: str) -> list[str]:
    """Lines defining ``a{p}_{m1}_{m3}`` as ``[BLOCK_E, 1]`` per-edge coefficients."""
    lines = []
    for (i, k), terms in sorted(_a_tables(path).items()):
        expr = " + ".join(_scaled(v, f"y{path.sh_off + j}") for j, v in terms)
        lines.append(f"{indent}a{path.index}_{i}_{k} = ({expr})[:, None]")
    return lines


def _spline_edge_lines(indent: str, eid: str) -> list[str]:
    """``spline`` kernels: per-edge basis values ``sv{j}`` [BLOCK_E] and valid table rows ``kr{j}``."""
    L = [f"{indent}k0 = tl.load(k_ptr + {eid}, mask=mask_e, other=0).to(tl.int64)"]
    for j in range(SPLINE_ROWS):
        L += [
            f"{indent}sv{j} = tl.load(v_ptr + {eid} * {SPLINE_ROWS} + {j}, mask=mask_e, other=0.0)",
            f"{indent}ok{j} = mask_e & (k0 + {j} >= 0) & (k0 + {j} < K)",
            f"{indent}kr{j} = tl.where(ok{j}, k0 + {j}, 0)",
        ]
    return L


def _spline_tile_lines(indent: str) -> list[str]:
    """``spline`` kernels: masks ``mt{j}`` and offsets ``to{j}`` of the table tiles of one channel block."""
    L = []
    for j in range(SPLINE_ROWS):
        L += [
            f"{indent}mt{j} = ok{j}[:, None] & (offs_c < C)[None, :]",
            f"{indent}to{j} = (kr{j} * N_PATHS * C)[:, None] + offs_c[None, :]",
        ]
    return L


def _w_line(path: _Path, indent: str, spline: bool) -> str:
    """The ``[BLOCK_E, BLOCK_C]`` radial-weight tile of one path: loaded, or (``spline``) rebuilt
    from the edge's 4 basis values and 4 rows of the ``[K, P, C]`` table (never stored)."""
    p = path.index
    if not spline:
        return f"{indent}w{p} = tl.load(wb + {p} * C, mask=m2, other=0.0)"
    terms = " + ".join(f"sv{j}[:, None] * tl.load(t_ptr + to{j} + {p} * C, mask=mt{j}, other=0.0)"
                       for j in range(SPLINE_ROWS))
    return f"{indent}w{p} = {terms}"



def _gen_fwd(paths: list[_Path], d_in: int, d_sh: int, d_out: int, n_paths: int, spline: bool = False) -> str:
    I1, I2 = " " * 4, " " * 8
    L = KERNELS[_kernel_name("fwd", spline)].def_lines() + [
        f'{I1}"""out[n, c, :] = sum over edges e with receiver n (CSR order) of the weighted TP."""',
        f"{I1}node = tl.program_id(0).to(tl.int64)",
        f"{I1}offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)",
        f"{I1}mask_c = offs_c < C",
        f"{I1}start = tl.load(rowptr_ptr + node)",
        f"{I1}end = tl.load(rowptr_ptr + node + 1)",
        f"{I1}dt = out_ptr.dtype.element_ty",
    ]
    L += [f"{I1}acc{k} = tl.zeros([BLOCK_C], dtype=dt)" for k in range(d_out)]
    L += [
        f"{I1}for e0 in range(start, end, BLOCK_E):",
        f"{I2}offs_e = e0 + tl.arange(0, BLOCK_E)",
        f"{I2}mask_e = offs_e < end",
        f"{I2}eid = tl.load(perm_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)",
        f"{I2}src = tl.load(snd_ptr + eid, mask=mask_e, other=0).to(tl.int64)",
        f"{I2}m2 = mask_e[:, None] & mask_c[None, :]",
        f"{I2}xb = x_ptr + (src * C * D_IN)[:, None] + (offs_c * D_IN)[None, :]",
    ]
    if spline:
        L += _spline_edge_lines(I2, "eid") + _spline_tile_lines(I2)
    else:
        L.append(f"{I2}wb = w_ptr + (eid * N_PATHS * C)[:, None] + offs_c[None, :]")
    L.append(f"{I2}yb = y_ptr + eid * D_SH")
    L += [f"{I2}x{i} = tl.load(xb + {i}, mask=m2, other=0.0)" for i in range(d_in)]
    L += [f"{I2}y{j} = tl.load(yb + {j}, mask=mask_e, other=0.0)" for j in range(d_sh)]
    for path in paths:
        if not path.nnz:
            continue
        L.append(_w_line(path, I2, spline))
        L += _emit_a(path, I2)
        by_k: dict[int, list[int]] = {}
        for i, k in sorted(_a_tables(path)):
            by_k.setdefault(k, []).append(i)
        for k, ins in sorted(by_k.items()):
            t = " + ".join(f"x{path.in_off + i} * a{path.index}_{i}_{k}" for i in ins)
            L.append(f"{I2}acc{path.out_off + k} += tl.sum(w{path.index} * ({t}), axis=0)")
    L.append(f"{I1}ob = out_ptr + node * C * D_OUT + offs_c * D_OUT")
    L += [f"{I1}tl.store(ob + {k}, acc{k}, mask=mask_c)" for k in range(d_out)]
    return "\n".join(L) + "\n"


def _gen_bwd_x(paths: list[_Path], d_in: int, d_sh: int, d_out: int, n_paths: int, spline: bool = False) -> str:
    I1, I2 = " " * 4, " " * 8
    L = KERNELS[_kernel_name("bwd_x", spline)].def_lines() + [
        f'{I1}"""gx[n, c, :] = sum over edges e with sender n (CSR order) of the transposed TP of g[receiver]."""',
        f"{I1}node = tl.program_id(0).to(tl.int64)",
        f"{I1}offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)",
        f"{I1}mask_c = offs_c < C",
        f"{I1}start = tl.load(rowptr_ptr + node)",
        f"{I1}end = tl.load(rowptr_ptr + node + 1)",
        f"{I1}dt = gx_ptr.dtype.element_ty",
    ]
    L += [f"{I1}acc{i} = tl.zeros([BLOCK_C], dtype=dt)" for i in range(d_in)]
    L += [
        f"{I1}for e0 in range(start, end, BLOCK_E):",
        f"{I2}offs_e = e0 + tl.arange(0, BLOCK_E)",
        f"{I2}mask_e = offs_e < end",
        f"{I2}eid = tl.load(perm_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)",
        f"{I2}dst = tl.load(rcv_ptr + eid, mask=mask_e, other=0).to(tl.int64)",
        f"{I2}m2 = mask_e[:, None] & mask_c[None, :]",
        f"{I2}gb = g_ptr + (dst * C * D_OUT)[:, None] + (offs_c * D_OUT)[None, :]",
    ]
    if spline:
        L += _spline_edge_lines(I2, "eid") + _spline_tile_lines(I2)
    else:
        L.append(f"{I2}wb = w_ptr + (eid * N_PATHS * C)[:, None] + offs_c[None, :]")
    L.append(f"{I2}yb = y_ptr + eid * D_SH")
    L += [f"{I2}y{j} = tl.load(yb + {j}, mask=mask_e, other=0.0)" for j in range(d_sh)]
    terms: dict[int, list[str]] = {}
    for path in paths:
        if not path.nnz:
            continue
        L.append(_w_line(path, I2, spline))
        ks = sorted({k for _, _, k, _ in path.nnz})
        for k in ks:
            L.append(f"{I2}u{path.index}_{k} = w{path.index} * tl.load(gb + {path.out_off + k}, mask=m2, other=0.0)")
        L += _emit_a(path, I2)
        for i, k in sorted(_a_tables(path)):
            terms.setdefault(path.in_off + i, []).append(f"u{path.index}_{k} * a{path.index}_{i}_{k}")
    for c, ts in sorted(terms.items()):
        L.append(f"{I2}acc{c} += tl.sum({' + '.join(ts)}, axis=0)")
    L.append(f"{I1}ob = gx_ptr + node * C * D_IN + offs_c * D_IN")
    L += [f"{I1}tl.store(ob + {i}, acc{i}, mask=mask_c)" for i in range(d_in)]
    return "\n".join(L) + "\n"


def _gen_bwd_edge(paths: list[_Path], d_in: int, d_sh: int, d_out: int, n_paths: int, spline: bool = False) -> str:
    I1, I2, I3, I4 = " " * 4, " " * 8, " " * 12, " " * 16
    doc = ("Per-edge gradients gy[e, :], gv[e, :] (reduced over channels); table gradient gt by atomics."
           if spline else "Per-edge gradients: gy[e, :] (reduced over channels) and gw[e, p, c].")
    L = KERNELS[_kernel_name("bwd_edge", spline)].def_lines() + [
        f'{I1}"""{doc}"""',
        f"{I1}offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)",
        f"{I1}mask_e = offs_e < E",
        f"{I1}src = tl.load(snd_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)",
        f"{I1}dst = tl.load(rcv_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)",
        f"{I1}yb = y_ptr + offs_e * D_SH",
        f"{I1}dt = x_ptr.dtype.element_ty",
    ]
    L += [f"{I1}y{j} = tl.load(yb + {j}, mask=mask_e, other=0.0)" for j in range(d_sh)]
    L += [f"{I1}gy{j} = tl.zeros([BLOCK_E], dtype=dt)" for j in range(d_sh)]
    if spline:
        L += _spline_edge_lines(I1, "offs_e")
        L += [f"{I1}gv{j} = tl.zeros([BLOCK_E], dtype=dt)" for j in range(SPLINE_ROWS)]
    L += [
        f"{I1}for c0 in range(0, C, BLOCK_C):",
        f"{I2}offs_c = c0 + tl.arange(0, BLOCK_C)",
        f"{I2}m2 = mask_e[:, None] & (offs_c < C)[None, :]",
        f"{I2}xb = x_ptr + (src * C * D_IN)[:, None] + (offs_c * D_IN)[None, :]",
        f"{I2}gb = g_ptr + (dst * C * D_OUT)[:, None] + (offs_c * D_OUT)[None, :]",
    ]
    if spline:
        L += _spline_tile_lines(I2)
    else:
        L.append(f"{I2}wb = (offs_e * N_PATHS * C)[:, None] + offs_c[None, :]")
    L += [f"{I2}x{i} = tl.load(xb + {i}, mask=m2, other=0.0)" for i in range(d_in)]

    def load_g(path: _Path, indent: str) -> list[str]:
        # each output component belongs to one path: load it where that path is used, which keeps
        # ~2l3+1 (not D_out) gradient tiles live at a time (lmax 3: 99 -> 7)
        ks = sorted({k for _, _, k, _ in path.nnz})
        return [f"{indent}g{path.out_off + k} = tl.load(gb + {path.out_off + k}, mask=m2, other=0.0)" for k in ks]

    def gw_expr(path: _Path) -> str:
        # dT/dw[e, p, c] = sum_m3 g_m3 * sum_m1 x_m1 a[m1, m3]
        by_k: dict[int, list[int]] = {}
        for i, k in sorted(_a_tables(path)):
            by_k.setdefault(k, []).append(i)
        return " + ".join(
            f"g{path.out_off + k} * ({' + '.join(f'x{path.in_off + i} * a{path.index}_{i}_{k}' for i in ins)})"
            for k, ins in sorted(by_k.items())
        )

    if spline:
        # dT/dv[e, j] = sum_{p,c} dT/dw[e,p,c] table[k0+j, p, c];  dT/dtable[k0+j, p, c] += v[e, j] dT/dw[e,p,c]
        L.append(f"{I2}if COMPUTE_VT:")
        L.append(f"{I3}if COMPUTE_V:")
        L += [f"{I4}zv{j} = tl.zeros([BLOCK_E, BLOCK_C], dtype=dt)" for j in range(SPLINE_ROWS)]
        for path in paths:
            if not path.nnz:
                continue
            p = path.index
            L += load_g(path, I3)
            L += _emit_a(path, I3)
            L.append(f"{I3}gw{p} = {gw_expr(path)}")
            L.append(f"{I3}if COMPUTE_V:")
            L += [f"{I4}zv{j} += gw{p} * tl.load(t_ptr + to{j} + {p} * C, mask=mt{j}, other=0.0)"
                  for j in range(SPLINE_ROWS)]
            L.append(f"{I3}if COMPUTE_T:")
            L += [f"{I4}tl.atomic_add(gt_ptr + to{j} + {p} * C, sv{j}[:, None] * gw{p}, mask=mt{j})"
                  for j in range(SPLINE_ROWS)]
        L.append(f"{I3}if COMPUTE_V:")
        L += [f"{I4}gv{j} += tl.sum(zv{j}, axis=1)" for j in range(SPLINE_ROWS)]
    else:
        L.append(f"{I2}if COMPUTE_W:")
        for path in paths:
            if not path.nnz:
                L.append(f"{I3}tl.store(gw_ptr + wb + {path.index} * C, tl.zeros([BLOCK_E, BLOCK_C], dtype=dt), mask=m2)")
                continue
            L += load_g(path, I3)
            L += _emit_a(path, I3)
            L.append(f"{I3}tl.store(gw_ptr + wb + {path.index} * C, {gw_expr(path)}, mask=m2)")
    # dT/dY[e, m2] = sum_c sum_p w_p sum_{m1 m3} CG[m1, m2, m3] x_m1 g_m3
    L.append(f"{I2}if COMPUTE_Y:")
    # per path, accumulate into one [BLOCK_E, BLOCK_C] tile per Y component and reduce over channels
    # once at the end: only this path's weight and gradient tiles are live at a time
    used_j = sorted({path.sh_off + j for path in paths for _, j, _, _ in path.nnz})
    L += [f"{I3}z{j} = tl.zeros([BLOCK_E, BLOCK_C], dtype=dt)" for j in used_j]
    for path in paths:
        if not path.nnz:
            continue
        w_line = _w_line(path, I3, spline)
        L.append(w_line if spline else f"{I3}w{path.index} = tl.load(w_ptr + wb + {path.index} * C, mask=m2, other=0.0)")
        L += load_g(path, I3)
        tab: dict[tuple[int, int], list[tuple[int, float]]] = {}
        for i, j, k, v in path.nnz:
            tab.setdefault((i, j), []).append((k, v))
        by_j: dict[int, list[str]] = {}
        for (i, j), ks in sorted(tab.items()):
            v_expr = " + ".join(_scaled(v, f"g{path.out_off + k}") for k, v in ks)
            by_j.setdefault(j, []).append(f"x{path.in_off + i} * ({v_expr})")
        for j, ts in sorted(by_j.items()):  # the path weight factors out of every (m1, m3) term
            L.append(f"{I3}z{path.sh_off + j} += w{path.index} * ({' + '.join(ts)})")
    L += [f"{I3}gy{j} += tl.sum(z{j}, axis=1)" for j in used_j]
    L.append(f"{I1}if COMPUTE_Y:")
    L += [f"{I2}tl.store(gy_ptr + offs_e * D_SH + {j}, gy{j}, mask=mask_e)" for j in range(d_sh)]
    if spline:
        L.append(f"{I1}if COMPUTE_V:")
        L += [f"{I2}tl.store(gv_ptr + offs_e * {SPLINE_ROWS} + {j}, gv{j}, mask=mask_e)" for j in range(SPLINE_ROWS)]
    return "\n".join(L) + "\n"


def generate_source(lmax_in: int, lmax_sh: int, lmax_out: int, spline: bool = False) -> str:
    """Triton source of the three convolution kernels for one ``(lmax_in, lmax_sh, lmax_out)``.

    With ``spline``, the ``spline_*`` kernels of :func:`mlip.kernels.reference.conv_tp_spline`:
    radial weights rebuilt per edge from 4 cubic B-spline values and a ``[K, P, C]`` table.
    """
    paths = _paths(lmax_in, lmax_sh, lmax_out)
    dims = ((lmax_in + 1) ** 2, (lmax_sh + 1) ** 2, tp_out_dim(lmax_in, lmax_sh, lmax_out), len(paths))
    return "\n\n".join([_gen_fwd(paths, *dims, spline=spline), _gen_bwd_x(paths, *dims, spline=spline),
                         _gen_bwd_edge(paths, *dims, spline=spline)])


_MODULE_HEADER = '''"""Generated by mlip.kernels.triton.codegen for lmax_in={lin}, lmax_sh={lsh}, lmax_out={lout}: the
conv_* and spline_* kernels. Do not edit: regenerate with python -m mlip.kernels.triton.codegen."""
# ruff: noqa
import triton.language as tl

D_IN = tl.constexpr({d_in})
D_SH = tl.constexpr({d_sh})
D_OUT = tl.constexpr({d_out})
N_PATHS = tl.constexpr({n_paths})
'''


def generate_module(lmax_in: int, lmax_sh: int, lmax_out: int) -> str:
    """The module of one degree triple: its dimensions, the ``conv_*`` and the ``spline_*`` kernels."""
    head = _MODULE_HEADER.format(
        lin=lmax_in, lsh=lmax_sh, lout=lmax_out, d_in=(lmax_in + 1) ** 2, d_sh=(lmax_sh + 1) ** 2,
        d_out=tp_out_dim(lmax_in, lmax_sh, lmax_out), n_paths=len(tp_paths(lmax_in, lmax_sh, lmax_out)))
    return "\n\n".join([head, generate_source(lmax_in, lmax_sh, lmax_out, spline=False),
                         generate_source(lmax_in, lmax_sh, lmax_out, spline=True)])


def generated_path(lmax_in: int, lmax_sh: int, lmax_out: int) -> Path:
    """Where the module of a degree triple is committed (whether or not it is in :data:`COMMITTED`)."""
    return GENERATED_DIR / f"tp_{lmax_in}{lmax_sh}{lmax_out}.py"


def stale_modules() -> list[str]:
    """Committed modules that differ from what this generator writes now, are missing, or are not
    in :data:`COMMITTED` (file names; empty when the folder is up to date)."""
    want = {generated_path(*lmax).name: lmax for lmax in COMMITTED}
    have = {p.name for p in GENERATED_DIR.glob("tp_*.py")} if GENERATED_DIR.is_dir() else set()
    stale = sorted(have - set(want))
    for name, lmax in want.items():
        path = GENERATED_DIR / name
        if not path.is_file() or path.read_text() != generate_module(*lmax):
            stale.append(name)
    return stale


def write_generated() -> list[Path]:
    """(Re)write every committed module of :data:`COMMITTED` and remove any other ``tp_*.py``; returns
    the files written. A developer's step after changing this generator, never run by the package."""
    GENERATED_DIR.mkdir(exist_ok=True)
    keep = {generated_path(*lmax) for lmax in COMMITTED}
    for path in GENERATED_DIR.glob("tp_*.py"):
        if path not in keep:
            path.unlink()
    written = []
    for lmax in COMMITTED:
        path, src = generated_path(*lmax), generate_module(*lmax)
        if not path.is_file() or path.read_text() != src:
            path.write_text(src)
            written.append(path)
    return written


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        stale = stale_modules()
        print("up to date" if not stale else "stale: " + ", ".join(stale))
        raise SystemExit(1 if stale else 0)
    print(f"wrote {len(write_generated())} of {len(COMMITTED)} modules in {GENERATED_DIR}")
