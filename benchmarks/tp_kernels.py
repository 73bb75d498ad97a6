"""Fused convolution (``conv_tp``) timings: Triton vs the torch reference, e3nn, cuEquivariance, OpenEquivariance.

Run on a CUDA machine::

    python benchmarks/tp_kernels.py                       # C=128, lmax 1..3, 1e5 and 1e6 edges
    python benchmarks/tp_kernels.py --lmax 2 --edges 100000 --peers e3nn

For each shape it times the forward, forward+backward (grads of node features, spherical
harmonics and radial weights: the force path) and forward+backward+double backward (a force
loss: ``create_graph=True``, then the gradient of a scalar of those grads), as the median of
``--repeats`` CUDA-synchronised runs after warm-up (Triton autotunes on the first calls), and
prints ms, peak extra GPU memory, achieved TFLOP/s and GB/s against a stated model, and the
fraction of the GPU's peak where the GPU is known.

Peers are optional and skipped with a reason when they do not import or their API differs:
e3nn ``o3.TensorProduct`` ("uvu", per-edge weights) + ``index_add_``; cuEquivariance
``cuequivariance_torch.ChannelWiseTensorProduct`` (gather/scatter indices when the installed
version takes them, else gather + ``index_add_``); OpenEquivariance ``TensorProductConv``.
Their wheels must be carried to an offline GPU machine (see the device README). Peers are timed
on inputs of the same sizes; their outputs are not compared with ours (layouts and path
normalisations differ; correctness against e3nn is asserted in tests/test_kernels.py).

With ``--spline`` (default on) two more rows time ``conv_tp_spline`` (the radial cubic spline
folded into the kernels: 4 basis values per edge and a ``[16, P, C]`` table instead of
``edge_weights [E, P, C]``), Triton and the torch reference, with gradients of node features,
spherical harmonics and the spline values (the force path: ``dE/dr`` goes through them).

FLOP and byte model (printed): forward FLOPs = E C (2 nnz_CG_weighted + 2 D_out), where
``nnz_CG_weighted`` counts non-zero CG entries; bytes = every input read once and the output
written once (the ideal of a fused kernel). For the backward passes the same minimal-traffic model
is applied to each derivative kernel. On a CPU-only machine the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

# Peak fp32 (non-tensor-core) TFLOP/s and HBM TB/s from NVIDIA's data sheets (dense, boost clock).
PEAKS = {
    "H100 SXM": (67.0, 3.35),
    "H100 PCIe": (51.0, 2.0),
    "H100 NVL": (60.0, 3.9),
    "H200": (67.0, 4.8),
    "A100": (19.5, 2.0),
}


def gpu_peak(name: str) -> tuple[str, float, float] | None:
    for key in ("H100 PCIe", "H100 NVL", "H200", "A100"):
        if all(part in name for part in key.split()):
            return (key, *PEAKS[key])
    if "H100" in name:
        return ("H100 SXM", *PEAKS["H100 SXM"])
    return None


def model_counts(lmax: tuple[int, int, int], n_nodes: int, n_edges: int, c: int, itemsize: int,
                 spline_knots: int | None = None) -> dict[str, float]:
    """FLOPs and minimal bytes; with ``spline_knots``, the radial input is ``[E, 4]`` values, an
    index and a ``[K, P, C]`` table (plus ``2 * 4`` FLOPs per weight to rebuild it)."""
    from mlip.kernels.reference import tp_out_dim
    from mlip.kernels.triton.conv import _paths

    paths = _paths(*lmax)
    nnz = sum(len(p.nnz) for p in paths)
    d_in, d_sh, d_out, n_p = (lmax[0] + 1) ** 2, (lmax[1] + 1) ** 2, tp_out_dim(*lmax), len(paths)
    flops = n_edges * c * (2 * nnz + 2 * d_out)
    x, y, w, o, idx = n_nodes * c * d_in, n_edges * d_sh, n_edges * n_p * c, n_nodes * c * d_out, 2 * n_edges
    if spline_knots:
        flops += n_edges * n_p * c * 8
        w = n_edges * 4 + spline_knots * n_p * c  # values and table (the knot index is counted below)
        idx += n_edges
    fwd_bytes = (x + y + w + o) * itemsize + idx * 8
    bwd_bytes = (o + y + w + x) * itemsize + (x + o + y + w + y + w) * itemsize + 2 * idx * 8  # Bx + (BY, Bw)
    return {"flops_fwd": flops, "bytes_fwd": fwd_bytes, "bytes_bwd": bwd_bytes, "nnz": nnz}


def random_problem(lmax, n_nodes, n_edges, c, dtype, device, seed=0):
    from mlip.kernels.reference import tp_paths

    g = torch.Generator(device="cpu").manual_seed(seed)
    p = len(tp_paths(*lmax))
    x = torch.randn(n_nodes, c, (lmax[0] + 1) ** 2, generator=g).to(device=device, dtype=dtype)
    vec = torch.randn(n_edges, 3, generator=g)
    from mlip.nn.irreps import spherical_harmonics

    y = spherical_harmonics(lmax[1], vec).to(device=device, dtype=dtype)
    w = torch.randn(n_edges, p, c, generator=g).to(device=device, dtype=dtype)
    receiver = torch.randint(0, n_nodes, (n_edges,), generator=g).to(device)
    sender = torch.randint(0, n_nodes, (n_edges,), generator=g).to(device)
    return x, y, w, sender, receiver


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 3,
            device: torch.device | str = "cuda", max_s: float | None = None) -> tuple[float, float]:
    """Median time (ms) and peak extra memory (MiB) of ``fn`` on ``device`` (on the CPU the memory is
    not measured: NaN). CUDA-synchronised around every call; with ``max_s``, fewer than ``repeats``
    timed calls once they took that many seconds together (at least one)."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if max_s is not None and sum(times) > 1e3 * max_s:
            break
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return statistics.median(times), peak


def passes(conv: Callable, x, y, w) -> dict[str, Callable[[], object]]:
    """The three timed workloads for one implementation ``conv(x, y, w) -> out``."""
    xs, ys, ws = (t.detach().clone().requires_grad_(True) for t in (x, y, w))

    def fwd():
        with torch.no_grad():
            return conv(x, y, w)

    def fwd_bwd():
        out = conv(xs, ys, ws)
        return torch.autograd.grad(out, (xs, ys, ws), torch.ones_like(out))

    def fwd_bwd_dbl():
        out = conv(xs, ys, ws)
        gx, gy, _ = torch.autograd.grad(out, (xs, ys, ws), torch.ones_like(out), create_graph=True)
        loss = (gx * gx).sum() + (gy * gy).sum()  # like a force loss: a scalar of first derivatives
        return torch.autograd.grad(loss, (xs, ys, ws), allow_unused=True)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "fwd+bwd+dbl": fwd_bwd_dbl}


def impl_ours(lmax, n_nodes, sender, receiver, backend: str):
    from mlip.kernels import BACKENDS

    ops = BACKENDS[backend].ops
    return lambda x, y, w: ops.conv_tp(x, y, w, sender, receiver, n_nodes, *lmax)


def impl_e3nn(lmax, n_nodes, sender, receiver, c, dtype, device="cuda"):
    from e3nn import o3

    from mlip.kernels.reference import tp_paths

    paths = tp_paths(*lmax)
    par = lambda l: "e" if l % 2 == 0 else "o"
    ir_in = o3.Irreps("+".join(f"{c}x{l}{par(l)}" for l in range(lmax[0] + 1)))
    ir_sh = o3.Irreps("+".join(f"1x{l}{par(l)}" for l in range(lmax[1] + 1)))
    ir_out = o3.Irreps("+".join(f"{c}x{l3}{par(l3)}" for _, _, l3 in paths))
    tp = o3.TensorProduct(ir_in, ir_sh, ir_out, [(l1, l2, p, "uvu", True) for p, (l1, l2, _) in enumerate(paths)],
                          shared_weights=False, internal_weights=False).to(device=device, dtype=dtype)

    def conv(x, y, w):
        # e3nn wants [n, C*(2l+1)] blocks per l (mul-major): a layout change per call, as a user would do
        xe = torch.cat([x[:, :, l * l:(l + 1) ** 2].reshape(x.shape[0], -1) for l in range(lmax[0] + 1)], 1)
        msg = tp(xe[sender], y, w.reshape(w.shape[0], -1))  # [E, sum_p C (2l3+1)]: the materialised message
        out = torch.zeros(n_nodes, msg.shape[1], dtype=msg.dtype, device=msg.device)
        return out.index_add_(0, receiver, msg)

    return conv


def impl_cueq(lmax, n_nodes, sender, receiver, c, dtype):
    import cuequivariance as cue
    import cuequivariance_torch as cuet

    par = lambda l: "e" if l % 2 == 0 else "o"
    ir_in = cue.Irreps("O3", "+".join(f"{c}x{l}{par(l)}" for l in range(lmax[0] + 1)))
    ir_sh = cue.Irreps("O3", "+".join(f"1x{l}{par(l)}" for l in range(lmax[1] + 1)))
    ir_filter = cue.Irreps("O3", "+".join(f"1x{l}{par(l)}" for l in range(lmax[2] + 1)))
    tp = cuet.ChannelWiseTensorProduct(ir_in, ir_sh, filter_irreps_out=ir_filter, layout=cue.ir_mul,
                                       shared_weights=False, internal_weights=False, device="cuda", dtype=dtype)
    n_w = tp.weight_numel
    if n_w != w_numel_of(lmax, c):
        raise RuntimeError(f"cuEquivariance has {n_w} weights per edge, we have {w_numel_of(lmax, c)}: other path set")

    def conv_fused(x, y, w):
        return tp(x.reshape(x.shape[0], -1), y, w.reshape(w.shape[0], -1), indices_1=sender, indices_out=receiver,
                  size_out=n_nodes)

    def conv_unfused(x, y, w):
        msg = tp(x.reshape(x.shape[0], -1)[sender], y, w.reshape(w.shape[0], -1))
        return torch.zeros(n_nodes, msg.shape[1], dtype=msg.dtype, device=msg.device).index_add_(0, receiver, msg)

    try:  # fused gather/scatter where the installed cuequivariance_torch takes indices
        x, y, w, _, _ = random_problem(lmax, n_nodes, sender.shape[0], c, dtype, "cuda")
        conv_fused(x, y, w)
        return conv_fused, "fused indices"
    except TypeError:
        return conv_unfused, "gather + index_add"


def w_numel_of(lmax, c):
    from mlip.kernels.reference import tp_paths

    return len(tp_paths(*lmax)) * c


def impl_oeq(lmax, n_nodes, sender, receiver, c, dtype):
    import openequivariance as oeq
    from e3nn import o3

    from mlip.kernels.reference import tp_paths

    paths = tp_paths(*lmax)
    par = lambda l: "e" if l % 2 == 0 else "o"
    ir_in = o3.Irreps("+".join(f"{c}x{l}{par(l)}" for l in range(lmax[0] + 1)))
    ir_sh = o3.Irreps("+".join(f"1x{l}{par(l)}" for l in range(lmax[1] + 1)))
    ir_out = o3.Irreps("+".join(f"{c}x{l3}{par(l3)}" for _, _, l3 in paths))
    instr = [(l1, l2, p, "uvu", True) for p, (l1, l2, _) in enumerate(paths)]
    problem = oeq.TPProblem(ir_in, ir_sh, ir_out, instr, shared_weights=False, internal_weights=False,
                            irrep_dtype=dtype, weight_dtype=dtype)
    conv_mod = oeq.TensorProductConv(problem, deterministic=False)
    rows, cols = receiver.to(torch.int64), sender.to(torch.int64)

    def conv(x, y, w):
        xe = torch.cat([x[:, :, l * l:(l + 1) ** 2].reshape(x.shape[0], -1) for l in range(lmax[0] + 1)], 1)
        return conv_mod(xe, y, w.reshape(w.shape[0], -1), rows, cols)

    return conv


def spline_problem(lmax, n_edges, c, dtype, device, knots: int = 16, r_max: float = 6.0, seed=1):
    """Spline inputs of ``conv_tp_spline``: values ``[E, 4]``, knot index ``[E]``, table ``[K, P, C]``."""
    from mlip.kernels.reference import spline_coefficients, tp_paths

    g = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.rand(n_edges, generator=g, dtype=torch.float64) * r_max
    vals, idx = spline_coefficients(r, r_max, knots)
    table = torch.randn(knots, len(tp_paths(*lmax)), c, generator=g)
    return vals.to(device=device, dtype=dtype), idx.to(device), table.to(device=device, dtype=dtype)


def impl_spline(lmax, n_nodes, sender, receiver, idx, table, backend: str):
    """``(x, y, vals) -> conv_tp_spline(...)`` with the knot index and the table held fixed."""
    from mlip.kernels import BACKENDS

    ops = BACKENDS[backend].ops
    return lambda x, y, v: ops.conv_tp_spline(x, y, v, idx, table, sender, receiver, n_nodes, *lmax)


def check_against_reference(lmax, x, y, w, sender, receiver, n_nodes, max_edges: int = 50_000,
                            spline: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Max relative difference of Triton vs the torch reference (forward and input gradients) on the
    first ``max_edges`` edges: no timing is printed for a kernel that disagrees. With ``spline =
    (idx, table)``, ``w`` holds the spline values and ``conv_tp_spline`` is checked."""
    from mlip.kernels import reference
    from mlip.kernels.triton import ops

    e = min(max_edges, sender.shape[0])
    args = (sender[:e], receiver[:e], n_nodes, *lmax)
    errs = []
    outs = []
    pair = (ops.conv_tp, reference.conv_tp)
    if spline is not None:
        idx, table = spline

        def with_table(f: Callable) -> Callable:
            return lambda x_, y_, v_, *rest: f(x_, y_, v_, idx[:e], table, *rest)

        pair = (with_table(ops.conv_tp_spline), with_table(reference.conv_tp_spline))
    for fn in pair:
        xs, ys, ws = (t.detach().clone().requires_grad_(True) for t in (x, y[:e], w[:e]))
        out = fn(xs, ys, ws, *args)
        grads = torch.autograd.grad(out, (xs, ys, ws), torch.ones_like(out))
        outs.append([out.detach(), *grads])
    for a, b in zip(*outs):
        errs.append(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return max(errs)


def peer_builders(lmax, n_nodes, sender, receiver, c, dtype) -> dict[str, Callable[[], tuple[Callable, str]]]:
    """Lazy constructors ``name -> () -> (conv, how)`` of the comparison implementations (on the
    device of ``sender``; cuEquivariance and OpenEquivariance run on CUDA only)."""
    device = sender.device
    return {
        "torch": lambda: (impl_ours(lmax, n_nodes, sender, receiver, "torch"), "reference"),
        "e3nn": lambda: (impl_e3nn(lmax, n_nodes, sender, receiver, c, dtype, device), "uvu+index_add"),
        "cueq": lambda: impl_cueq(lmax, n_nodes, sender, receiver, c, dtype) if _on_cuda(device, "cueq") else None,
        "oeq": lambda: (impl_oeq(lmax, n_nodes, sender, receiver, c, dtype), "conv") if _on_cuda(device, "oeq") else None,
    }


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here (CUDA only); callers report it as skipped, not as a failure."""


def _on_cuda(device: torch.device, peer: str) -> bool:
    if device.type != "cuda":
        raise PeerUnavailable(f"{peer} runs on CUDA only")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--lmax", type=int, nargs="+", default=[1, 2, 3], help="lmax_in = lmax_sh = lmax_out")
    ap.add_argument("--edges", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--neighbors", type=float, default=30.0, help="mean in-degree: n_nodes = edges / neighbors")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peers", nargs="*", default=["torch", "e3nn", "cueq", "oeq"])
    ap.add_argument("--spline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time conv_tp_spline (radial spline fused), triton and torch")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tp_kernels: no CUDA device; the Triton kernels need a GPU to be timed (CPU correctness: tests/test_kernels.py).")
        return 0
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    peak = gpu_peak(name)
    import triton

    print(f"# device: {name}; torch {torch.__version__}; triton {triton.__version__}; dtype {args.dtype}; C={args.channels}")
    print(f"# peak used for fractions: {peak if peak else 'unknown GPU (fractions omitted)'}")
    print(f"{'lmax':>4} {'edges':>8} {'impl':>22} {'pass':>12} {'ms':>9} {'MiB':>8} {'TFLOP/s':>8} {'GB/s':>8} {'%fp32':>6} {'%HBM':>6}")
    for L in args.lmax:
        lmax = (L, L, L)
        for n_edges in args.edges:
            n_nodes = max(1, round(n_edges / args.neighbors))
            x, y, w, sender, receiver = random_problem(lmax, n_nodes, n_edges, args.channels, dtype, "cuda")
            counts = model_counts(lmax, n_nodes, n_edges, args.channels, x.element_size())
            err = check_against_reference(lmax, x, y, w, sender, receiver, n_nodes)
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            print(f"# lmax {L}, {n_edges} edges: triton vs torch reference, max relative error {err:.1e} (tolerance {tol:.0e})")
            if not err <= tol:
                print("# triton disagrees with the reference: not timing this shape")
                continue
            # (label, conv, radial input, counts): peers take edge_weights, the spline rows spline values
            impls: list[tuple[str, Callable, torch.Tensor, dict]] = [
                ("triton", impl_ours(lmax, n_nodes, sender, receiver, "triton"), w, counts)]
            builders = peer_builders(lmax, n_nodes, sender, receiver, args.channels, dtype)
            for peer in args.peers:
                try:
                    fn, how = builders[peer]()
                    impls.append((f"{peer} ({how})", fn, w, counts))
                except Exception as err:  # noqa: BLE001 - optional peers: report and go on
                    print(f"{L:>4} {n_edges:>8} {peer:>22} skipped: {type(err).__name__}: {str(err)[:120]}")
            if args.spline:
                vals, idx, table = spline_problem(lmax, n_edges, args.channels, dtype, "cuda")
                s_err = check_against_reference(lmax, x, y, vals, sender, receiver, n_nodes, spline=(idx, table))
                print(f"# lmax {L}, {n_edges} edges: triton spline vs torch reference, max relative error {s_err:.1e}")
                s_counts = model_counts(lmax, n_nodes, n_edges, args.channels, x.element_size(), table.shape[0])
                if s_err <= tol:
                    impls.append(("triton spline", impl_spline(lmax, n_nodes, sender, receiver, idx, table, "triton"),
                                  vals, s_counts))
                else:
                    print("# triton spline disagrees with the reference: not timing it")
                impls.append(("torch spline", impl_spline(lmax, n_nodes, sender, receiver, idx, table, "torch"),
                              vals, s_counts))
            for label, fn, radial, counts_i in impls:
                for pname, work in passes(fn, x, y, radial).items():
                    try:
                        ms, mib = time_ms(work, args.repeats)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"{L:>4} {n_edges:>8} {label:>22} {pname:>12} out of memory")
                        continue
                    except Exception as err:  # noqa: BLE001
                        print(f"{L:>4} {n_edges:>8} {label:>22} {pname:>12} failed: {type(err).__name__}: {str(err)[:100]}")
                        continue
                    tflops = counts_i["flops_fwd"] / (ms * 1e-3) / 1e12 if pname == "fwd" else float("nan")
                    nbytes = counts_i["bytes_fwd"] + (counts_i["bytes_bwd"] if pname != "fwd" else 0)
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    pf = f"{100 * tflops / peak[1]:6.1f}" if peak and not math.isnan(tflops) else "     -"
                    pb = f"{100 * gbs / 1e3 / peak[2]:6.1f}" if peak else "     -"
                    tf = f"{tflops:8.2f}" if not math.isnan(tflops) else "       -"
                    print(f"{L:>4} {n_edges:>8} {label:>22} {pname:>12} {ms:9.3f} {mib:8.0f} {tf} {gbs:8.0f} {pf} {pb}")
                    sys.stdout.flush()
            impls.clear()
            del x, y, w, sender, receiver
            vals = idx = table = None  # free the GPU memory of this shape
            torch.cuda.empty_cache()
    print("# TFLOP/s is given for the forward only (FLOP model in the module docstring); GB/s counts the minimal traffic")
    print("# of a fused kernel (inputs read once, outputs written once), so unfused peers show an optimistic GB/s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
