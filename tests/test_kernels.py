"""Triton kernels vs the pure-PyTorch reference (and e3nn), on the CPU under ``TRITON_INTERPRET=1``
and, where a GPU is present, on CUDA.

Triton's interpreter runs every kernel program in Python, so CPU shapes are tiny. Block sizes are
shrunk so the kernels still walk several edge chunks and several (masked) channel blocks.

The parity tests take a ``device`` parameter (``mlip.testing.DEVICES``): the CUDA cases are skipped
with the reason "no CUDA device" where there is none. In the usual session (the interpreter on, as
in CI) a CUDA case runs the kernels in the interpreter on CUDA tensors at the CPU's sizes; with
``TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py`` on a GPU machine the CUDA cases run the
real, autotuned kernels at larger sizes, and the CPU cases (which need the interpreter) are skipped.
"""
from __future__ import annotations

import math
import os
import platform
import sys

# Triton's interpreter works only if this is set before triton is first imported (its own
# helpers such as tl.sum are jitted at import); tests run the kernels on CPU tensors.
# tests/conftest.py sets it first for the whole session (e3nn imports triton too); this line
# covers running the module on its own without that conftest. TRITON_INTERPRET=0 in the
# environment keeps the interpreter off (real kernels: the CUDA cases only).
_TRITON_WAS_IMPORTED = "triton" in sys.modules
os.environ.setdefault("TRITON_INTERPRET", "1")
#: whether this session runs the kernels in Triton's interpreter (CPU tensors possible, tiny sizes)
INTERPRETING = os.environ["TRITON_INTERPRET"] == "1"

import pytest
import torch

# The [test] extra installs triton where wheels exist (Linux x86_64): there, a missing triton is an
# install error to report, not a reason to skip every kernel test. Elsewhere the module is skipped.
if sys.platform.startswith("linux") and platform.machine() == "x86_64":
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "tests/test_kernels.py needs triton on Linux x86_64; install the test extra: pip install -e '.[test]'"
        ) from err
else:
    pytest.importorskip("triton", reason="no triton wheel for this platform (the [test] extra skips it)")

from mlip.kernels import BACKENDS, BackendUnavailableError, op_check, select_backend
from mlip.kernels import reference as ref
from mlip.kernels import reference_grid as refgrid
from mlip.kernels.triton import conv
from mlip.models import backend_check
from mlip.testing import DEVICES, require_device

LMAX_CASES = [(1, 1, 1), (0, 2, 2), (2, 2, 2), (1, 2, 1)]


@pytest.fixture(autouse=True, scope="module")
def interpret():
    """Run Triton kernels in the interpreter with small blocks."""
    if _TRITON_WAS_IMPORTED and INTERPRETING:
        import triton.language as tl
        from triton.runtime.jit import JITFunction

        assert not isinstance(tl.standard.sum, JITFunction), (
            "another test module imported triton before tests/test_kernels.py set TRITON_INTERPRET=1; "
            "run with TRITON_INTERPRET=1 in the environment"
        )
    mp = pytest.MonkeyPatch()
    mp.setitem(conv.INTERPRET_BLOCKS, "BLOCK_E", 4)
    mp.setitem(conv.INTERPRET_BLOCKS, "BLOCK_C", 2)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _cpu_cases_need_the_interpreter(request):
    """With the interpreter off (real kernels), only the CUDA cases can run."""
    callspec = getattr(request.node, "callspec", None)
    if not INTERPRETING and (callspec is None or callspec.params.get("device") != "cuda"):
        pytest.skip("TRITON_INTERPRET=0: the CPU cases run the kernels in Triton's interpreter (TRITON_INTERPRET=1)")


def _ops():
    from mlip.kernels.triton import ops

    return ops


def _sizes(device: torch.device) -> dict[str, int]:
    """Nodes, edges and channels of a parity test: tiny where the interpreter runs the kernels, larger
    (several channel blocks of the GPU configs, masked; ~30 edges per receiver) for the real kernels."""
    if device.type == "cuda" and not INTERPRETING:
        return {"n": 400, "e": 12_000, "c": 33}
    return {"n": 5, "e": 12, "c": 3}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """The CPU tests' element-wise tolerance on the CPU; on CUDA (other summation orders, larger sums)
    the error relative to the largest value, within op_check's tolerance (1e-10 / 1e-4)."""
    if device.type == "cuda":
        err = op_check._relative_error(got, want)
        assert err <= op_check.TOLERANCES[dtype], f"relative error {err:.2e} on {device}"
    else:
        torch.testing.assert_close(got, want, **_tol(dtype))


def _graph(n: int = 5, e: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random edges; node ``n-1`` is never a receiver nor a sender (its rows must come out zero)."""
    g = torch.Generator().manual_seed(seed)
    sender = torch.randint(0, n - 1, (e,), generator=g)
    receiver = torch.randint(0, n - 1, (e,), generator=g)
    receiver[:5] = 0  # one receiver with more edges than BLOCK_E
    return sender, receiver


def _inputs(lmax: tuple[int, int, int], dtype: torch.dtype, n: int = 5, e: int = 12, c: int = 3, seed: int = 0,
            requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    p = len(ref.tp_paths(*lmax))
    x = torch.randn(n, c, (lmax[0] + 1) ** 2, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(e, (lmax[1] + 1) ** 2, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(e, p, c, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, y, w)]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def big_blocks(monkeypatch):
    """Blocks covering a receiver's edges and all channels at once, for the slow tests (gradcheck,
    whole models): the block walk is tested at small blocks against the reference, first and second
    derivatives included; here small blocks would only make the interpreter several times slower."""
    monkeypatch.setitem(conv.INTERPRET_BLOCKS, "BLOCK_E", 32)
    monkeypatch.setitem(conv.INTERPRET_BLOCKS, "BLOCK_C", 4)


def _e3nn_conv(x, y, w, sender, receiver, n, lmax):
    """The same convolution with e3nn's TensorProduct ("uvu" paths) and index_add."""
    from e3nn import o3

    paths = ref.tp_paths(*lmax)
    c, e = x.shape[1], y.shape[0]
    parity = lambda l: "e" if l % 2 == 0 else "o"
    ir_in = o3.Irreps("+".join(f"{c}x{l}{parity(l)}" for l in range(lmax[0] + 1)))
    ir_sh = o3.Irreps("+".join(f"1x{l}{parity(l)}" for l in range(lmax[1] + 1)))
    ir_out = o3.Irreps("+".join(f"{c}x{l3}{parity(l3)}" for _, _, l3 in paths))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its CG buffers in the default dtype
    try:
        tp = o3.TensorProduct(ir_in, ir_sh, ir_out, [(l1, l2, p, "uvu", True) for p, (l1, l2, _) in enumerate(paths)],
                              shared_weights=False, internal_weights=False, irrep_normalization="none",
                              path_normalization="none")
    finally:
        torch.set_default_dtype(old)
    tp = tp.to(device=x.device, dtype=x.dtype)
    # our CG is e3nn's wigner_3j times sqrt(2 l3 + 1) (component normalisation)
    scale = torch.tensor([math.sqrt(2 * l3 + 1) for _, _, l3 in paths], dtype=x.dtype, device=x.device)
    xe = torch.cat([x[:, :, l * l:(l + 1) ** 2].reshape(x.shape[0], -1) for l in range(lmax[0] + 1)], 1)
    out = tp(xe[sender], y, (w * scale[None, :, None]).reshape(e, -1))
    blocks, off = [], 0
    for _, _, l3 in paths:
        d = 2 * l3 + 1
        blocks.append(out[:, off:off + c * d].reshape(e, c, d))
        off += c * d
    msg = torch.cat(blocks, -1)
    return torch.zeros(n, c, msg.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, receiver, msg)


# --------------------------------------------------------------------------------------------
# CSR graph
# --------------------------------------------------------------------------------------------
def test_csr_graph_orders_edges_and_is_cached():
    sender, receiver = _graph(n=6, e=15)
    g = conv.csr_graph(sender, receiver, 6)
    assert torch.equal(g.rowptr_rcv, torch.tensor([0] + torch.bincount(receiver, minlength=6).cumsum(0).tolist()))
    assert torch.all(receiver[g.perm_rcv][1:] >= receiver[g.perm_rcv][:-1])
    assert torch.all(sender[g.perm_snd][1:] >= sender[g.perm_snd][:-1])
    for node in range(6):  # stable: ties keep the original edge order (a fixed summation order)
        ids = g.perm_rcv[g.rowptr_rcv[node]:g.rowptr_rcv[node + 1]]
        assert torch.equal(ids, torch.nonzero(receiver == node).flatten())
    assert conv.csr_graph(sender, receiver, 6) is g  # same tensors: cached
    receiver[0] = 5  # in-place change bumps the version: re-sorted
    g2 = conv.csr_graph(sender, receiver, 6)
    assert g2 is not g and int(g2.rowptr_rcv[6] - g2.rowptr_rcv[5]) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_csr_cache_is_per_graph_and_two_graphs_in_turn_give_the_right_results(device, monkeypatch):
    """Two edge lists used in turn (two structures, a batch and a sub-batch) each keep their own CSR
    entry while their graph is in use, so neither is re-sorted; values and gradients equal the
    reference on both, gradients taken after the other graph's forward."""
    import gc

    ops = _ops()
    device = require_device(device)
    n, e, c = _sizes(device).values()
    graphs = [tuple(t.to(device) for t in _graph(n, e, seed=seed)) for seed in (0, 1)]
    sorts = []
    original = conv._csr
    monkeypatch.setattr(conv, "_csr", lambda *a: sorts.append(1) or original(*a))
    held = [conv.csr_graph(*g, n) for g in graphs]  # the graphs in use (autograd would hold them)
    assert held[0] is not held[1] and len(sorts) == 4  # receiver and sender order of each
    x, y, w = (t.to(device).requires_grad_() for t in _inputs((1, 2, 1), torch.float64, n=n, e=e, c=c))
    for _ in range(2):
        outs = [ops.conv_tp(x, y, w, *g, n, 1, 2, 1) for g in graphs]  # A, B, A, B
        for g, out in zip(graphs, outs):
            want = ref.conv_tp(x, y, w, *g, n, 1, 2, 1)
            _close(out.detach(), want.detach(), torch.float64, device)
            for a, b in zip(torch.autograd.grad(out.square().sum(), (x, y, w)),
                            torch.autograd.grad(want.square().sum(), (x, y, w))):
                _close(a, b, torch.float64, device)
        assert [conv.csr_graph(*g, n) for g in graphs] == held and len(sorts) == 4  # no re-sort: one entry each
    # an entry goes with its graph: with nothing holding them, only the most recent one is kept
    del held, outs, out
    gc.collect()
    assert len(conv._GRAPH_CACHE) <= 1


def test_committed_kernel_sources_equal_the_generator_and_nothing_is_written_at_run_time(tmp_path, monkeypatch):
    """The generated modules in mlip/kernels/triton/generated are what the generator writes now
    (regenerate: python -m mlip.kernels.triton.codegen), the kernels are loaded from them, each
    kernel's parameters are its one argument list, and a triple without a committed module is
    generated in memory: no file is written (the old code wrote under ~/.cache)."""
    import inspect
    from pathlib import Path

    from mlip.kernels.triton import codegen

    assert codegen.stale_modules() == [], "run: python -m mlip.kernels.triton.codegen"
    assert (0, 3, 3) in codegen.COMMITTED and (1, 3, 3) in codegen.COMMITTED and (1, 2, 2) in codegen.COMMITTED
    mod = conv._generated_module(1, 2, 1)
    assert Path(mod.__file__) == codegen.generated_path(1, 2, 1)
    for name, spec in codegen.KERNELS.items():
        params = list(inspect.signature(getattr(mod, name)).parameters)
        assert params == [a.name for a in spec.args] == list(spec.signature("fp32")), name
        assert [p.name for p in spec.op_signature().parameters.values()][:len(spec.inputs)] == \
            [a.name.removesuffix("_ptr") for a in spec.inputs]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lmax = (3, 1, 2)  # lmax_in above lmax_sh: no committed module
    assert lmax not in codegen.COMMITTED and not codegen.generated_path(*lmax).exists()
    sender, receiver = _graph()
    x, y, w = _inputs(lmax, torch.float64)
    torch.testing.assert_close(_ops().conv_tp(x, y, w, sender, receiver, 5, *lmax),
                               ref.conv_tp(x, y, w, sender, receiver, 5, *lmax), **_tol(torch.float64))
    assert conv._generated_module(*lmax).__file__.startswith("<")  # in memory (linecache)
    assert not codegen.generated_path(*lmax).exists() and not any(tmp_path.iterdir())


def test_generated_kernels_unroll_only_nonzero_cg():
    src = conv.generate_source(1, 1, 1)
    n_nnz = sum(len(p.nnz) for p in conv._paths(1, 1, 1))
    assert n_nnz == 10  # (000):1, (110):3, (011):3, (101):3 -- the 1x1->1 (odd) path is excluded
    assert "def conv_fwd" in src and "def conv_bwd_x" in src and "def conv_bwd_edge" in src
    assert "0.0 *" not in src


_COMPILE_SCRIPT = """
import re, warnings
import torch
warnings.filterwarnings("ignore")
from mlip.kernels.triton import conv, grid
ks = conv.compile_for_target((1, 1, 1), torch.float64, arch=90)
assert all(len(k.asm["cubin"]) > 0 for k in ks.values()), "no cubin"
consts = re.findall(r"arith.constant dense<([0-9.e+-]+)> : tensor<[0-9x]+xf64>", ks["fwd"].asm["ttir"])
assert any(c.startswith("0.577350269189625") for c in consts), consts  # sqrt(1/3) kept in float64
ks = conv.compile_for_target((1, 2, 1), torch.float32, arch=90, spline=True)
assert all(len(k.asm["cubin"]) > 0 for k in ks.values()), "no spline cubin"
assert "atom" in ks["bwd_edge"].asm["ptx"]  # the table gradient is summed with atomics
assert len(grid.compile_for_target(4, 4, 8, torch.float32).asm["cubin"]) > 0
print("compiled")
"""


def test_generated_kernels_compile_for_hopper_without_a_gpu():
    """The generated source compiles in real (non-interpreter) mode to sm_90 binaries with Triton's
    bundled ptxas, and float64 CG literals stay float64 (not rounded through float32)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# conv_tp: forward, gradients, errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lmax", LMAX_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_forward_matches_reference_and_e3nn(lmax, dtype, device):
    ops = _ops()
    device = require_device(device)
    n, e, c = _sizes(device).values()
    sender, receiver = (t.to(device) for t in _graph(n, e))
    x, y, w = (t.to(device) for t in _inputs(lmax, dtype, n=n, e=e, c=c))
    out = ops.conv_tp(x, y, w, sender, receiver, n, *lmax)
    expected = ref.conv_tp(x, y, w, sender, receiver, n, *lmax)
    assert out.shape == (n, c, ref.tp_out_dim(*lmax)) and out.dtype == dtype and out.device == device
    _close(out, expected, dtype, device)
    assert torch.all(out[n - 1] == 0)  # a node without edges
    _close(out, _e3nn_conv(x, y, w, sender, receiver, n, lmax), dtype, device)
    assert torch.equal(out, ops.conv_tp(x, y, w, sender, receiver, n, *lmax))  # deterministic (no atomics)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_forward_lmax3_matches_reference_and_e3nn(dtype, device):
    ops = _ops()
    device = require_device(device)
    n, e, c = (4, 6, 2) if device.type == "cpu" or INTERPRETING else _sizes(device).values()
    sender, receiver = (t.to(device) for t in _graph(n=n, e=e))
    x, y, w = (t.to(device) for t in _inputs((3, 3, 3), dtype, n=n, e=e, c=c))
    out = ops.conv_tp(x, y, w, sender, receiver, n, 3, 3, 3)
    _close(out, ref.conv_tp(x, y, w, sender, receiver, n, 3, 3, 3), dtype, device)
    _close(out, _e3nn_conv(x, y, w, sender, receiver, n, (3, 3, 3)), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lmax,dtype", [((1, 1, 1), torch.float32), ((2, 2, 2), torch.float64), ((1, 2, 1), torch.float64)])
def test_conv_first_and_second_derivatives_match_reference(lmax, dtype, device):
    ops = _ops()
    device = require_device(device)
    n, e, c = _sizes(device).values()
    sender, receiver = (t.to(device) for t in _graph(n, e))
    outs = {}
    for name, fn in (("triton", ops.conv_tp), ("torch", ref.conv_tp)):
        x, y, w = (t.to(device).requires_grad_() for t in _inputs(lmax, dtype, n=n, e=e, c=c))
        out = fn(x, y, w, sender, receiver, n, *lmax)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
        grads = torch.autograd.grad(out, (x, y, w), g, create_graph=True)
        v = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2 + i), dtype=torch.float64).to(device, dtype)
             for i, t in enumerate(grads)]
        second = torch.autograd.grad(grads, (x, y, w), v)
        outs[name] = [t.detach() for t in grads] + list(second)
    for a, b in zip(outs["triton"], outs["torch"]):
        _close(a, b, dtype, device)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_conv_gradients_of_a_subset_of_inputs_and_non_contiguous_inputs(needs):
    ops = _ops()
    sender, receiver = _graph()
    grads = {}
    for name, fn in (("triton", ops.conv_tp), ("torch", ref.conv_tp)):
        x, y, w = _inputs((1, 2, 1), torch.float64)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
        ins = [t.requires_grad_(n) for t, n in zip((x, y, w), needs)]
        out = fn(*ins, sender, receiver, 5, 1, 2, 1)
        grads[name] = torch.autograd.grad((out * out).sum(), [t for t in ins if t.requires_grad])
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv_gradcheck_and_gradgradcheck_float64(big_blocks):
    ops = _ops()
    sender, receiver = _graph(n=4, e=8)
    x, y, w = _inputs((1, 1, 1), torch.float64, n=4, e=8, c=2, requires_grad=True)
    fn = lambda x, y, w: ops.conv_tp(x, y, w, sender, receiver, 4, 1, 1, 1)
    assert torch.autograd.gradcheck(fn, (x, y, w), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, y, w), fast_mode=True)


def test_conv_edge_cases_and_errors():
    ops = _ops()
    x, y, w = _inputs((1, 1, 1), torch.float64, e=0)
    empty = torch.zeros(0, dtype=torch.long)
    out = ops.conv_tp(x, y, w, empty, empty, 5, 1, 1, 1)
    assert out.shape == (5, 3, 8) and torch.all(out == 0)
    sender, receiver = _graph()
    x, y, w = _inputs((1, 1, 1), torch.float64)
    with pytest.raises(ValueError, match="paths"):
        ops.conv_tp(x, y, w[:, :3], sender, receiver, 5, 1, 1, 1)
    with pytest.raises(ValueError, match="edge_attrs"):
        ops.conv_tp(x, y[:, :1], w, sender, receiver, 5, 1, 1, 1)
    with pytest.raises(TypeError, match="float32"):
        ops.conv_tp(x.half(), y.half(), w.half(), sender, receiver, 5, 1, 1, 1)
    with pytest.raises(TypeError, match="edge_weights"):
        ops.conv_tp(x, y, w.float(), sender, receiver, 5, 1, 1, 1)
    x4, y4, w4 = _inputs((4, 1, 4), torch.float64)
    with pytest.raises(ValueError, match="lmax"):
        ops.conv_tp(x4, y4, w4, sender, receiver, 5, 4, 1, 4)


def test_registry_validate(monkeypatch):
    assert select_backend("auto", "cpu", torch.float32).name == "torch"
    assert select_backend("triton", "cpu", torch.float64, lmax=3).name == "triton"  # interpreter on
    with pytest.raises(ValueError, match="lmax 4"):
        select_backend("triton", "cpu", torch.float64, lmax=4)
    with pytest.raises(ValueError, match="bfloat16"):
        select_backend("triton", "cpu", torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="not CUDA"):
        select_backend("triton", "cpu", torch.float32)
    ops = _ops()
    sender, receiver = _graph()
    x, y, w = _inputs((1, 1, 1), torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.conv_tp(x, y, w, sender, receiver, 5, 1, 1, 1)


# --------------------------------------------------------------------------------------------
# backend objects: declared capabilities, resolution at build/load/move, the op-level self-check
# --------------------------------------------------------------------------------------------
def test_registry_declares_capabilities_and_select_backend_honours_them(monkeypatch):
    from mlip.kernels import KERNEL_NAMES, OPS, backends

    torch_b, triton_b = BACKENDS["torch"], BACKENDS["triton"]
    assert KERNEL_NAMES == ("auto", "torch", "triton") and set(BACKENDS) == {"torch", "triton"}
    assert torch_b.ops is ref and triton_b.ops is _ops()
    assert all(callable(getattr(b.ops, op)) for b in (torch_b, triton_b) for op in OPS)
    assert torch_b.is_reference and not triton_b.is_reference
    assert not any(torch_b.fuses(op) for op in OPS)
    assert triton_b.fuses("conv_tp_spline") and triton_b.fuses("grid_product")
    assert not triton_b.fuses("symmetric_contraction")  # no fused kernel: the reference function
    assert torch_b.edge_chunking and not triton_b.edge_chunking
    assert (triton_b.dtypes, triton_b.max_lmax, triton_b.devices) == ((torch.float32, torch.float64), 3, ("cuda",))
    with pytest.raises(ValueError, match="unknown kernel op"):
        triton_b.fuses("conv")

    # the torch reference runs anything; triton states each problem
    assert torch_b.problems("cpu", torch.float16, 7) == [] and torch_b.supports("cpu", torch.bfloat16)
    assert triton_b.problems("cpu", torch.float64, 3) == []  # the interpreter is on in this module
    found = triton_b.problems("cuda", torch.float16, 4)
    assert any("float16" in p for p in found) and any("lmax 4" in p for p in found)
    for args, match in ((("cpu", torch.float64, 4), "lmax 4"), (("cpu", torch.float16, 2), "float16")):
        with pytest.raises(BackendUnavailableError, match=match):
            select_backend("triton", *args)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        select_backend("cuda", "cpu", torch.float32)

    # auto: triton only natively on CUDA with what it supports (never the interpreter), else torch
    assert select_backend("auto", "cpu", torch.float64, 2) is torch_b
    assert select_backend("auto", "cuda", torch.float32, 3) is triton_b  # triton imports here
    assert select_backend("auto", "cuda", torch.float16, 3) is torch_b
    assert select_backend("auto", "cuda", torch.float32, 4) is torch_b

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_b.runs_on("cpu") and triton_b.runs_on("cuda")
    with pytest.raises(BackendUnavailableError, match="not CUDA .*TRITON_INTERPRET=1"):
        select_backend("triton", "cpu", torch.float64)
    monkeypatch.setattr(backends, "_importable", lambda package: False)  # as without triton installed
    assert select_backend("auto", "cuda", torch.float32, 3) is torch_b
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        select_backend("triton", "cuda", torch.float32)


def test_model_resolves_its_backend_when_built_loaded_or_moved_never_in_forward(monkeypatch, tmp_path):
    """The selector runs when the model is built, cast or moved (``_apply``) and loaded; forward only
    uses ``kernel_backend``. An explicit backend that cannot run where the model is does not fail the
    build (it may be moved to a GPU next) but its forward there raises the reason."""
    import copy
    import pickle

    import mlip.models.equivariant as family
    from mlip.models.base import load_model, save_model
    from mlip.models.outputs import predict

    calls = []

    def counted(*args):
        calls.append(args[0])
        return select_backend(*args)

    monkeypatch.setattr(family, "select_backend", counted)
    model = _model("auto", torch.float64)
    assert calls == ["auto", "auto"]  # built (float32), then cast to float64
    assert model.kernel_backend is BACKENDS["torch"]
    batch = _batch(torch.float64)
    for _ in range(3):
        predict(model, batch, forces=True)
    assert len(calls) == 2
    model.float()
    assert len(calls) == 3 and model.kernel_backend is BACKENDS["torch"]
    path = tmp_path / "auto.pt"
    save_model(model, path)
    loaded = load_model(path)
    n = len(calls)
    assert n > 3 and loaded.kernel_backend is BACKENDS["torch"]
    predict(loaded, _batch(torch.float32), forces=True)
    assert len(calls) == n
    # a model holding its backend object is still deep-copyable and picklable (EMA copies, workers)
    assert copy.deepcopy(loaded).kernel_backend == loaded.kernel_backend
    assert pickle.loads(pickle.dumps(loaded)).kernel_backend == loaded.kernel_backend

    fast = _model("triton", torch.float64)
    assert fast.kernel_backend is BACKENDS["triton"]  # the interpreter runs it on the CPU here
    # what no move or cast fixes (here: triton missing) is refused when the model is built; auto falls back
    from mlip.kernels import backends

    with monkeypatch.context() as mp:
        mp.setattr(backends, "_importable", lambda package: False)
        with pytest.raises(BackendUnavailableError, match="kernel 'triton' cannot run this model: triton is not installed"):
            _model("triton", torch.float64)
        assert _model("auto", torch.float64).kernel_backend is BACKENDS["torch"]
    assert backends.BACKENDS["triton"].problems_anywhere(4) == ["lmax 4 is outside 0..3"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    off = _model("triton", torch.float64)  # built where triton cannot run: not refused yet
    assert off.kernel_backend is None and "not CUDA" in off.kernel_unavailable
    with pytest.raises(BackendUnavailableError, match="kernel 'triton' cannot run here: device cpu is not CUDA"):
        predict(off, batch, forces=True)
    fast.double()  # a cast re-resolves for where the parameters are
    assert fast.kernel_backend is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    off.to("cpu")
    assert off.kernel_backend is BACKENDS["triton"] and off.kernel_unavailable is None


def test_edge_chunking_runs_only_on_a_backend_that_declares_it(monkeypatch):
    """``edge_chunk_size`` chunks the convolution where the backend declares ``edge_chunking`` (the
    reference) and is ignored elsewhere; the numbers are the same either way."""
    import dataclasses

    from mlip.models.equivariant import InteractionBlock
    from mlip.models.outputs import predict

    chunked = []
    original = InteractionBlock._chunked_conv

    def counted(self, *args):
        chunked.append(1)
        return original(self, *args)

    monkeypatch.setattr(InteractionBlock, "_chunked_conv", counted)
    model = _model("torch", torch.float64, radial="mlp")
    batch = _batch(torch.float64)
    want = predict(model, batch, forces=True)["forces"].detach()
    model.set_edge_chunk_size(7)
    got = predict(model, batch, forces=True)["forces"].detach()
    assert len(chunked) == 2  # one per layer
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    model.kernel_backend = dataclasses.replace(BACKENDS["torch"], edge_chunking=False)
    got = predict(model, batch, forces=True)["forces"].detach()
    assert len(chunked) == 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_op_check_passes_for_triton_and_reports_a_wrong_op(monkeypatch):
    """The op-level self-check (mlip.kernels only): every op of the Triton backend equals the reference
    in value and input gradients; an op 0.1% off, or right in value but with wrong gradients, is
    reported, and raised with ``raise_on_mismatch``."""
    from mlip.kernels import OPS

    triton_b = BACKENDS["triton"]
    for dtype, lmax in ((torch.float64, 2), (torch.float32, 1)):
        checks = op_check.check_ops(triton_b, "cpu", dtype, lmax=lmax)
        assert [c.op for c in checks] == list(OPS) and all(c.ok for c in checks), [c.describe() for c in checks]
        assert all(c.backend == "triton" and c.dtype == dtype for c in checks)
    conv_check = checks[0]
    assert set(conv_check.errors) == {"output", "grad node_feats", "grad edge_attrs", "grad edge_weights"}

    ops = _ops()
    monkeypatch.setattr(ops, "grid_product", lambda *args: refgrid.grid_product(*args) * 1.001)

    def right_value_wrong_gradient(x, *rest):
        good, bad = ref.conv_tp(x, *rest), ref.conv_tp(x * 1.001, *rest)
        return good.detach() + (bad - bad.detach())

    monkeypatch.setattr(ops, "conv_tp", right_value_wrong_gradient)
    checks = {c.op: c for c in op_check.check_ops(triton_b, "cpu", torch.float64, lmax=1)}
    assert not checks["grid_product"].ok and checks["grid_product"].errors["output"] > 5e-4
    assert not checks["conv_tp"].ok and checks["conv_tp"].errors["output"] < 1e-12
    assert checks["conv_tp"].errors["grad node_feats"] > 5e-4
    assert checks["conv_tp_spline"].ok and checks["symmetric_contraction"].ok
    with pytest.raises(op_check.BackendMismatchError, match="conv_tp: grad .* grid_product: output"):
        op_check.check_ops(triton_b, "cpu", torch.float64, lmax=1, raise_on_mismatch=True)
    assert backend_check.BackendMismatchError is op_check.BackendMismatchError  # one error for both checks
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="not CUDA"):
        op_check.check_ops(triton_b, "cpu", torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_op_check_compares_second_derivatives_of_every_fused_op(device):
    """The GPU check's parity (python -m benchmarks gpu): forward, backward and double backward of
    every op the Triton backend fuses, within op_check's tolerances; model-like sizes on CUDA."""
    device = require_device(device)
    fused = tuple(sorted(BACKENDS["triton"].fused))
    assert fused == ("conv_tp", "conv_tp_spline", "grid_product")
    real = device.type == "cuda" and not INTERPRETING
    for dtype, lmax in ((torch.float64, 2), (torch.float32, 1)):
        sizes = {"n_nodes": 300, "n_edges": 9_000, "channels": 33, "lmax": 3} if real else {"lmax": lmax}
        checks = op_check.check_ops(BACKENDS["triton"], device, dtype, ops=fused, lmax_in=1, double_backward=True,
                                    **sizes)
        for check in checks:
            assert check.ok, check.describe()
            assert {key.split()[0] for key in check.errors} == {"output", "grad", "grad2"}
            assert check.shape["lmax_in"] == 1 and check.shape["n_edges"] == sizes.get("n_edges", 12)


def test_op_check_reports_an_op_right_to_first_order_but_wrong_in_its_second_derivative(monkeypatch):
    """A term with zero value and zero gradient but a nonzero second derivative: only the double
    backward sees it."""
    ops = _ops()

    def wrong_second_derivative(x, *rest):
        return ref.conv_tp(x, *rest) + 1e-3 * ((x - x.detach()) ** 2).sum()

    monkeypatch.setattr(ops, "conv_tp", wrong_second_derivative)
    first = op_check.check_ops(BACKENDS["triton"], "cpu", torch.float64, lmax=1, ops=("conv_tp",))[0]
    assert first.ok and max(first.errors.values()) < 1e-12
    second = op_check.check_ops(BACKENDS["triton"], "cpu", torch.float64, lmax=1, ops=("conv_tp",),
                                double_backward=True)[0]
    assert not second.ok and second.errors["grad2 node_feats"] > 1e-6 and second.errors["output"] < 1e-12


def test_kernels_package_imports_nothing_from_models_train_calculator_or_md():
    """mlip.kernels sits below the model code: no import statement in it (at any depth, relative
    ones resolved) names mlip.models, mlip.train, mlip.calculator or mlip.md."""
    import ast
    from pathlib import Path

    import mlip.kernels

    root = Path(mlip.kernels.__file__).resolve().parent
    banned = ("mlip.models", "mlip.train", "mlip.calculator", "mlip.md")
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 8
    offending = []
    for path in files:
        package = ["mlip", "kernels", *path.relative_to(root).parent.parts]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if any(name == b or name.startswith(b + ".") for b in banned):
                    offending.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    assert not offending, offending


# --------------------------------------------------------------------------------------------
# conv_tp_spline: the radial spline folded into the convolution
# --------------------------------------------------------------------------------------------
def _spline_inputs(lmax, dtype, n=5, e=12, c=3, k=6, seed=0, requires_grad=False):
    """Node/edge inputs plus spline values of random lengths in [0, r_max=3] (several edges share
    table rows, so the atomic table gradient sums duplicates) and a ``[k, P, c]`` table."""
    x, y, _ = _inputs(lmax, dtype, n=n, e=e, c=c, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    r = torch.rand(e, generator=g, dtype=torch.float64) * 3.0
    r[:1] = 3.0  # the last knot: rows beyond the table are masked
    vals, idx = ref.spline_coefficients(r, 3.0, k)
    table = torch.randn(k, len(ref.tp_paths(*lmax)), c, generator=g, dtype=torch.float64)
    ins = [x, y, vals.to(dtype), table.to(dtype)]
    return [t.requires_grad_(requires_grad) for t in ins], idx


def test_spline_coefficients_are_the_models_spline_basis():
    from mlip.nn.radial import SplineBasis

    r = torch.cat([torch.rand(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3.0,
                   torch.tensor([0.0, 0.375, 1.5, 3.0], dtype=torch.float64)])  # knots h = 3/8 included
    dense = SplineBasis(3.0, 9)(r)  # [n_edges, 9]
    vals, idx = ref.spline_coefficients(r, 3.0, 9)
    rows = idx[:, None] + torch.arange(4)
    rebuilt = torch.zeros_like(dense)
    valid = (rows >= 0) & (rows < 9)
    rebuilt[torch.arange(len(r))[:, None].expand_as(rows)[valid], rows[valid]] = vals[valid]
    torch.testing.assert_close(rebuilt, dense, rtol=0, atol=1e-15)
    table = torch.randn(9, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(ref.spline_weights(vals, idx, table), (dense @ table.view(9, -1)).view(-1, 2, 3),
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lmax", [(1, 1, 1), (2, 2, 2), (1, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_spline_forward_matches_reference(lmax, dtype, device):
    ops = _ops()
    device = require_device(device)
    n, e, c = _sizes(device).values()
    sender, receiver = (t.to(device) for t in _graph(n, e))
    (x, y, v, t), idx = _spline_inputs(lmax, dtype, n=n, e=e, c=c)
    x, y, v, t, idx = (q.to(device) for q in (x, y, v, t, idx))
    out = ops.conv_tp_spline(x, y, v, idx, t, sender, receiver, n, *lmax)
    expected = ref.conv_tp_spline(x, y, v, idx, t, sender, receiver, n, *lmax)
    assert out.shape == (n, c, ref.tp_out_dim(*lmax)) and out.dtype == dtype and out.device == device
    _close(out, expected, dtype, device)
    w = ref.spline_weights(v, idx, t)  # the same as the unfused kernel on materialised weights
    _close(out, ops.conv_tp(x, y, w, sender, receiver, n, *lmax), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lmax,dtype", [((1, 1, 1), torch.float32), ((1, 2, 1), torch.float64)])
def test_conv_spline_first_and_second_derivatives_match_reference(lmax, dtype, device):
    ops = _ops()
    device = require_device(device)
    n, e, c = _sizes(device).values()
    sender, receiver = (q.to(device) for q in _graph(n, e))
    outs = {}
    for name, fn in (("triton", ops.conv_tp_spline), ("torch", ref.conv_tp_spline)):
        (x, y, v, t), idx = _spline_inputs(lmax, dtype, n=n, e=e, c=c)
        x, y, v, t = (q.to(device).requires_grad_() for q in (x, y, v, t))
        idx = idx.to(device)
        out = fn(x, y, v, idx, t, sender, receiver, n, *lmax)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
        grads = torch.autograd.grad(out, (x, y, v, t), g, create_graph=True)
        cot = [torch.randn(q.shape, generator=torch.Generator().manual_seed(2 + i), dtype=torch.float64).to(device, dtype)
               for i, q in enumerate(grads)]
        second = torch.autograd.grad(grads, (x, y, v, t), cot)
        outs[name] = [q.detach() for q in grads] + list(second)
    for a, b in zip(outs["triton"], outs["torch"]):
        _close(a, b, dtype, device)


def test_conv_spline_gradcheck_and_gradgradcheck_float64(big_blocks):
    ops = _ops()
    sender, receiver = _graph(n=4, e=6)
    (x, y, v, t), idx = _spline_inputs((1, 1, 1), torch.float64, n=4, e=6, c=2, k=4, requires_grad=True)
    fn = lambda x, y, v, t: ops.conv_tp_spline(x, y, v, idx, t, sender, receiver, 4, 1, 1, 1)
    assert torch.autograd.gradcheck(fn, (x, y, v, t), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, y, v, t), fast_mode=True)


def test_conv_spline_forces_through_edge_lengths_match_reference():
    """The force path: d/dr through the spline values (spline_coefficients is differentiable in r)."""
    ops = _ops()
    sender, receiver = _graph()
    (x, y, _, t), _ = _spline_inputs((1, 1, 1), torch.float64)
    r0 = torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3.0
    grads = []
    for fn in (ops.conv_tp_spline, ref.conv_tp_spline):
        r = r0.clone().requires_grad_()
        vals, idx = ref.spline_coefficients(r, 3.0, 6)
        out = fn(x, y, vals, idx, t, sender, receiver, 5, 1, 1, 1)
        grads.append(torch.autograd.grad((out * out).sum(), r)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert float(grads[1].abs().max()) > 1e-3


def test_conv_spline_edge_cases_and_errors():
    ops = _ops()
    (x, y, v, t), idx = _spline_inputs((1, 1, 1), torch.float64, e=0)
    empty = torch.zeros(0, dtype=torch.long)
    out = ops.conv_tp_spline(x, y, v, idx, t, empty, empty, 5, 1, 1, 1)
    assert out.shape == (5, 3, 8) and torch.all(out == 0)
    sender, receiver = _graph()
    (x, y, v, t), idx = _spline_inputs((1, 1, 1), torch.float64)
    with pytest.raises(ValueError, match="table"):
        ops.conv_tp_spline(x, y, v, idx, t[:, :3], sender, receiver, 5, 1, 1, 1)
    with pytest.raises(ValueError, match="spline_vals"):
        ops.conv_tp_spline(x, y, v[:, :3], idx, t, sender, receiver, 5, 1, 1, 1)
    with pytest.raises(TypeError, match="spline_idx"):
        ops.conv_tp_spline(x, y, v, idx.int(), t, sender, receiver, 5, 1, 1, 1)
    with pytest.raises(TypeError, match="table"):
        ops.conv_tp_spline(x, y, v, idx, t.float(), sender, receiver, 5, 1, 1, 1)


# --------------------------------------------------------------------------------------------
# spherical-grid (Gaunt) product
# --------------------------------------------------------------------------------------------
def _three_j_000(l1: int, l2: int, l3: int) -> float:
    """Wigner 3j symbol (l1 l2 l3; 0 0 0) by Racah's closed form (zero for odd l1 + l2 + l3)."""
    J = l1 + l2 + l3
    if J % 2 or not abs(l1 - l2) <= l3 <= l1 + l2:
        return 0.0
    g = J // 2
    f = math.factorial
    val = math.sqrt(f(J - 2 * l1) * f(J - 2 * l2) * f(J - 2 * l3) / f(J + 1)) * f(g) / (f(g - l1) * f(g - l2) * f(g - l3))
    return (-1) ** g * val


def test_gaunt_grid_reference_is_the_exact_gaunt_product():
    """On the exact grid, grid_product's coefficients are Gaunt integrals: by Wigner-Eckart each
    (l1, l2, l3) block is e3nn's wigner_3j times sqrt((2l1+1)(2l2+1)(2l3+1)) |(l1 l2 l3; 0 0 0)|."""
    from e3nn import o3

    to_grid, from_grid = refgrid.gaunt_grid(2, 2)
    gaunt = torch.einsum("gi,gj,kg->ijk", to_grid, to_grid, from_grid)
    for l1 in range(3):
        for l2 in range(3):
            for l3 in range(3):
                blk = gaunt[l1 * l1:(l1 + 1) ** 2, l2 * l2:(l2 + 1) ** 2, l3 * l3:(l3 + 1) ** 2]
                if not abs(l1 - l2) <= l3 <= l1 + l2 or (l1 + l2 + l3) % 2:
                    assert blk.abs().max() < 1e-13, (l1, l2, l3)
                    continue
                w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
                c = math.sqrt((2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1)) * abs(_three_j_000(l1, l2, l3))
                sign = torch.sign((blk * w3j).sum())
                torch.testing.assert_close(blk, sign * c * w3j, rtol=0, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lmax,lmax_out", [(1, 2), (2, 2), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_product_matches_reference(lmax, lmax_out, dtype, device):
    ops = _ops()
    device = require_device(device)
    rows, c = (3, 3) if device.type == "cpu" or INTERPRETING else (500, 33)
    to_grid, from_grid = refgrid.gaunt_grid(lmax, lmax_out, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, c, (lmax + 1) ** 2, generator=g, dtype=torch.float64).to(device, dtype)
    b = torch.randn(rows, c, (lmax + 1) ** 2, generator=g, dtype=torch.float64).to(device, dtype)
    out = ops.grid_product(a, b, to_grid, from_grid)
    assert out.shape == (rows, c, (lmax_out + 1) ** 2) and out.device == device
    _close(out, refgrid.grid_product(a, b, to_grid, from_grid), dtype, device)


def test_grid_product_gradcheck_and_gradgradcheck_float64():
    ops = _ops()
    to_grid, from_grid = refgrid.gaunt_grid(1, 2)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = to_grid.clone().requires_grad_()
    f = from_grid.clone().requires_grad_()
    assert torch.autograd.gradcheck(ops.grid_product, (a, b, t, f), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda a, b: ops.grid_product(a, b, to_grid, from_grid), (a, b), fast_mode=True)
    with pytest.raises(ValueError, match="to_grid"):
        ops.grid_product(a, b, to_grid[:, :3], from_grid)


# --------------------------------------------------------------------------------------------
# whole model and the load-time check
# --------------------------------------------------------------------------------------------
def _model(kernel: str, dtype: torch.dtype, radial: str = "spline"):
    from mlip.models.base import build_model

    cfg = {"r_max": 3.0, "elements": [1, 8], "num_channels": 4, "lmax": 1, "num_layers": 2, "correlation": 2,
           "avg_num_neighbors": 10.0, "kernel": kernel, "radial": radial, "spline_knots": 6}
    return build_model("equivariant", cfg).to(dtype)


def _batch(dtype: torch.dtype):
    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph

    atoms = backend_check.builtin_structure([1, 8], 3.0)
    return collate([atoms_to_graph(atoms, 3.0)]).to(dtype=dtype)


@pytest.mark.parametrize("radial", ["spline", "mlp"])  # fused spline (conv_tp_spline) | weights from an MLP (conv_tp)
def test_equivariant_model_energy_forces_stress_and_training_grads_triton_equals_torch(radial, big_blocks, monkeypatch):
    from mlip.models.outputs import predict

    ops = _ops()
    unused = "conv_tp" if radial == "spline" else "conv_tp_spline"
    monkeypatch.setattr(ops, unused, None)  # the model must take the path named by `radial`
    grid_calls = []
    triton_grid_product = ops.grid_product

    def counted_grid_product(*args):
        grid_calls.append(tuple(args[0].shape))
        return triton_grid_product(*args)

    monkeypatch.setattr(ops, "grid_product", counted_grid_product)
    dtype = torch.float64
    batch = _batch(dtype)
    fast, slow = _model("triton", dtype, radial), _model("torch", dtype, radial)
    slow.load_state_dict(fast.state_dict())
    # the default config: quadratic grid mixing after the first layer (l <= 1 output)
    assert fast.layers[0].mixing is not None and fast.layers[0].mixing.activation == "quadratic"
    # skip the first-forward load-time check (tested below): this test compares more than it does
    fast.__dict__[backend_check._CHECKED] = {("cpu", dtype)}
    a = predict(fast, batch, forces=True, stress=True, create_graph=True)
    b = predict(slow, batch, forces=True, stress=True, create_graph=True)
    assert grid_calls == [(batch.n_atoms, 4, 4)]  # the mixing's Gaunt product ran on the Triton kernel
    # no fused kernel for the body-order contraction yet (docs/kernels.md): the backend lists the reference
    assert ops.symmetric_contraction is ref.symmetric_contraction
    assert batch.n_edges > 40  # several edges per receiver: the CSR walk is exercised
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)
    assert float(b["forces"].detach().abs().max()) > 1e-3  # the comparison is not between zeros
    # training on forces and stress: parameter gradients go through the double backward
    grads = []
    for model, out in ((fast, a), (slow, b)):
        loss = out["energy"].sum() + (out["forces"] ** 2).sum() + (out["stress"] ** 2).sum()
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True))
    n_checked = 0
    for (name, _), ga, gb in zip(fast.named_parameters(), *grads):
        if gb is None:
            assert ga is None, name
            continue
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        n_checked += 1
    radial = [n for n, _ in fast.named_parameters() if "radial" in n]
    assert radial and n_checked > len(radial)  # radial weights (edge_weights) and node-side parameters


def test_check_backend_accepts_triton_and_refuses_a_wrong_kernel(monkeypatch, big_blocks):
    model = _model("triton", torch.float32)
    check = backend_check.check_backend(model)
    assert check is not None and check.ok and check.backend == "triton" and check.dtype == torch.float32
    assert backend_check.check_backend(_model("torch", torch.float32)) is None  # nothing to check

    _counting_exact_kernel(monkeypatch, factor=1.001)  # kernels 0.1% off
    with pytest.raises(backend_check.BackendMismatchError, match="disagrees with the torch reference"):
        backend_check.check_backend(_model("triton", torch.float64))


def test_check_backend_refuses_a_wrong_grid_product_kernel(monkeypatch):
    """The load-time check covers the mixing layer's kernel too: exact convolutions with a grid
    product 0.1% off are refused."""
    _counting_exact_kernel(monkeypatch)
    ops = _ops()
    monkeypatch.setattr(ops, "grid_product", lambda *args: refgrid.grid_product(*args) * 1.001)
    with pytest.raises(backend_check.BackendMismatchError, match="disagrees with the torch reference"):
        backend_check.check_backend(_model("triton", torch.float64))
    monkeypatch.setattr(ops, "grid_product", refgrid.grid_product)
    assert backend_check.check_backend(_model("triton", torch.float64)).ok


@pytest.mark.parametrize("lmax,hidden", [(2, None), (3, 3)])
def test_grid_mixing_on_the_triton_grid_product_matches_the_reference(lmax, hidden):
    """GridMixing (quadratic) with the Triton backend: output and input/weight gradients equal the
    torch backend's in float64."""
    from mlip.kernels import reference
    from mlip.nn.s2grid import GridMixing

    torch.manual_seed(0)
    mix = GridMixing(3, lmax, hidden=hidden).double()
    x = torch.randn(2, 3, (lmax + 1) ** 2, dtype=torch.float64, requires_grad=True)
    outs = [mix(x, backend) for backend in (_ops(), reference)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad((o ** 2).sum(), [x, mix.w1, mix.w2]) for o in outs]
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_ensure_checked_runs_once_per_device_and_dtype(monkeypatch):
    calls = _counting_exact_kernel(monkeypatch)  # an exact "accelerated" kernel: the check passes
    model = _model("triton", torch.float64)
    backend_check.ensure_checked(model, "cpu", torch.float64)
    n = len(calls)
    assert n > 0  # the check evaluated the model with its backend
    backend_check.ensure_checked(model, "cpu", torch.float64)
    assert len(calls) == n  # cached for (cpu, float64)
    _counting_exact_kernel(monkeypatch, factor=1.001)
    with pytest.raises(backend_check.BackendMismatchError):
        backend_check.ensure_checked(model, "cpu", torch.float32)  # another dtype: checked again, and refused
    with pytest.raises(backend_check.BackendMismatchError):
        backend_check.ensure_checked(model, "cpu", torch.float32)  # a failed check is not remembered


def _counting_exact_kernel(monkeypatch, factor: float = 1.0) -> list[int]:
    """Replace the Triton ``conv_tp`` and ``conv_tp_spline`` by the reference times ``factor`` (1: an
    exact "accelerated" kernel, fast; else a wrong one) and count their calls: tests of where the
    check is wired."""
    ops = _ops()
    calls: list[int] = []

    def counted(reference_op):
        def patched(*args):
            calls.append(1)
            return reference_op(*args) * factor

        return patched

    monkeypatch.setattr(ops, "conv_tp", counted(ref.conv_tp))
    monkeypatch.setattr(ops, "conv_tp_spline", counted(ref.conv_tp_spline))
    return calls


def test_loading_a_model_checks_its_accelerated_backend_and_refuses_a_mismatch(tmp_path, monkeypatch):
    """load_model, mlip.load and MLIPCalculator(path) run the check before returning a model."""
    import mlip
    from mlip.calculator import MLIPCalculator
    from mlip.models.base import load_model, save_model

    path = tmp_path / "triton.pt"
    save_model(_model("triton", torch.float64), path)
    calls = _counting_exact_kernel(monkeypatch)
    model = load_model(path)
    assert calls, "load_model did not evaluate the accelerated backend"
    assert ("cpu", torch.float64) in model.__dict__[backend_check._CHECKED]
    n = len(calls)
    from mlip.models.outputs import predict

    predict(model, _batch(torch.float64), forces=True)  # already checked at load: only the model's own calls
    assert len(calls) == n + 2  # two layers, one conv each

    _counting_exact_kernel(monkeypatch, factor=1.001)  # a kernel 0.1% off
    for load in (load_model, mlip.load, lambda p: MLIPCalculator(p, device="cpu", dtype="float64")):
        with pytest.raises(backend_check.BackendMismatchError, match="disagrees with the torch reference"):
            load(path)

    # kernel "auto" on the CPU resolves to the reference: nothing to check, the kernel is never called
    auto = tmp_path / "auto.pt"
    save_model(_model("auto", torch.float64), auto)
    calls = _counting_exact_kernel(monkeypatch, factor=1.001)
    assert backend_check.check_loaded(load_model(auto)) is None and not calls
    # an explicit kernel the load device cannot run (interpreter off: CPU is not CUDA) is refused at
    # load, with the reason (it used to load and fail at the first forward)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for load in (load_model, mlip.load, lambda p: MLIPCalculator(p, device="cpu", dtype="float64")):
        with pytest.raises(BackendUnavailableError, match="onto cpu .*kernel 'triton' cannot run here: device cpu is not CUDA"):
            load(path)
    assert not calls
    assert backend_check.check_loaded(load_model(auto)) is None  # auto falls back to the reference


def test_first_forward_checks_a_built_or_cast_model_and_refuses_a_mismatch(monkeypatch):
    """A model never loaded (built, or cast after loading) is checked by its first forward on each dtype."""
    from mlip.models.outputs import predict

    model = _model("triton", torch.float64)
    _counting_exact_kernel(monkeypatch, factor=1.001)
    for _ in range(2):  # refused on every call: a failed check is not remembered
        with pytest.raises(backend_check.BackendMismatchError):
            predict(model, _batch(torch.float64), forces=True)

    calls = _counting_exact_kernel(monkeypatch)
    predict(model, _batch(torch.float64), forces=True)
    n_first = len(calls)
    assert n_first > 2  # the check's own evaluation (with forces) plus the model's two convolutions
    predict(model, _batch(torch.float64), forces=True)
    assert len(calls) == n_first + 2  # checked once for (cpu, float64)
    model.float()
    _counting_exact_kernel(monkeypatch, factor=1.001)
    with pytest.raises(backend_check.BackendMismatchError, match="float32"):
        predict(model, _batch(torch.float32), forces=True)  # a new dtype is checked again


# --------------------------------------------------------------------------------------------
# GPU benchmarks: the parts that run without a GPU
# --------------------------------------------------------------------------------------------
def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_kernel_benchmarks_without_cuda_say_so_and_exit_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("tp_kernels", "md_step_kernels"):
        assert _bench(name).main([]) == 0
        assert "no CUDA device" in capsys.readouterr().out


def test_tp_kernels_benchmark_workloads_and_reference_check_on_cpu(big_blocks):
    """The benchmark's problem, its three timed workloads and its pre-timing correctness gate, run on
    CPU tensors (the interpreter) at a tiny size: what the GPU run times is what the tests check."""
    bench = _bench("tp_kernels")
    lmax, n_nodes = (1, 1, 1), 4
    x, y, w, sender, receiver = bench.random_problem(lmax, n_nodes, 10, 2, torch.float64, "cpu")
    assert bench.check_against_reference(lmax, x, y, w, sender, receiver, n_nodes) < 1e-12
    ours = bench.impl_ours(lmax, n_nodes, sender, receiver, "triton")
    theirs = bench.impl_ours(lmax, n_nodes, sender, receiver, "torch")
    for (name, work), (_, ref_work) in zip(bench.passes(ours, x, y, w).items(), bench.passes(theirs, x, y, w).items()):
        got, expected = work(), ref_work()
        for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    counts = bench.model_counts(lmax, n_nodes, 10, 2, 8)
    assert counts["nnz"] == 10 and counts["flops_fwd"] == 10 * 2 * (2 * 10 + 2 * 8)
    # the fused-spline rows: their gate and their workloads (inputs x, y and the spline values)
    vals, idx, table = bench.spline_problem(lmax, 10, 2, torch.float64, "cpu", knots=5, r_max=3.0)
    assert bench.check_against_reference(lmax, x, y, vals, sender, receiver, n_nodes, spline=(idx, table)) < 1e-12
    fused = bench.impl_spline(lmax, n_nodes, sender, receiver, idx, table, "triton")
    plain = bench.impl_ours(lmax, n_nodes, sender, receiver, "torch")
    w_spline = ref.spline_weights(vals, idx, table)
    torch.testing.assert_close(bench.passes(fused, x, y, vals)["fwd"](), plain(x, y, w_spline), rtol=1e-12, atol=1e-12)
    grads = bench.passes(fused, x, y, vals)["fwd+bwd+dbl"]()
    assert len(grads) == 3 and grads[2] is not None and grads[2].shape == vals.shape
