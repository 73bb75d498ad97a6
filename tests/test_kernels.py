"""Triton kernels vs the pure-PyTorch reference (and e3nn), on the CPU under ``TRITON_INTERPRET=1``.

Triton's interpreter runs every kernel program in Python, so shapes are tiny. Block sizes are
shrunk so the kernels still walk several edge chunks and several (masked) channel blocks.
"""
from __future__ import annotations

import math
import os
import sys

# Triton's interpreter works only if this is set before triton is first imported (its own
# helpers such as tl.sum are jitted at import); tests run the kernels on CPU tensors.
_TRITON_WAS_IMPORTED = "triton" in sys.modules
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="the triton extra is not installed (pip install 'mlip[gpu]')")

from mlip.kernels import reference as ref
from mlip.kernels import reference_grid as refgrid
from mlip.kernels import validate
from mlip.kernels.triton import conv

LMAX_CASES = [(1, 1, 1), (0, 2, 2), (2, 2, 2), (1, 2, 1)]


@pytest.fixture(autouse=True, scope="module")
def interpret(tmp_path_factory):
    """Run Triton kernels in the interpreter with small blocks."""
    if _TRITON_WAS_IMPORTED:
        import triton.language as tl
        from triton.runtime.jit import JITFunction

        assert not isinstance(tl.standard.sum, JITFunction), (
            "another test module imported triton before tests/test_kernels.py set TRITON_INTERPRET=1; "
            "run with TRITON_INTERPRET=1 in the environment"
        )
    mp = pytest.MonkeyPatch()
    mp.setenv("MLIP_CACHE_DIR", str(tmp_path_factory.mktemp("mlip_cache")))  # generated kernel source
    mp.setitem(conv.INTERPRET_BLOCKS, "BLOCK_E", 4)
    mp.setitem(conv.INTERPRET_BLOCKS, "BLOCK_C", 2)
    yield
    mp.undo()


def _ops():
    from mlip.kernels.triton import ops

    return ops


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
    tp = tp.to(x.dtype)
    # our CG is e3nn's wigner_3j times sqrt(2 l3 + 1) (component normalisation)
    scale = torch.tensor([math.sqrt(2 * l3 + 1) for _, _, l3 in paths], dtype=x.dtype)
    xe = torch.cat([x[:, :, l * l:(l + 1) ** 2].reshape(x.shape[0], -1) for l in range(lmax[0] + 1)], 1)
    out = tp(xe[sender], y, (w * scale[None, :, None]).reshape(e, -1))
    blocks, off = [], 0
    for _, _, l3 in paths:
        d = 2 * l3 + 1
        blocks.append(out[:, off:off + c * d].reshape(e, c, d))
        off += c * d
    msg = torch.cat(blocks, -1)
    return torch.zeros(n, c, msg.shape[-1], dtype=x.dtype).index_add_(0, receiver, msg)


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
@pytest.mark.parametrize("lmax", LMAX_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_forward_matches_reference_and_e3nn(lmax, dtype):
    ops = _ops()
    sender, receiver = _graph()
    x, y, w = _inputs(lmax, dtype)
    out = ops.conv_tp(x, y, w, sender, receiver, 5, *lmax)
    expected = ref.conv_tp(x, y, w, sender, receiver, 5, *lmax)
    assert out.shape == (5, 3, ref.tp_out_dim(*lmax)) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **_tol(dtype))
    assert torch.all(out[4] == 0)  # a node without edges
    torch.testing.assert_close(out, _e3nn_conv(x, y, w, sender, receiver, 5, lmax), **_tol(dtype))
    assert torch.equal(out, ops.conv_tp(x, y, w, sender, receiver, 5, *lmax))  # deterministic (no atomics)


def test_conv_forward_lmax3_matches_reference():
    ops = _ops()
    sender, receiver = _graph(n=4, e=6)
    x, y, w = _inputs((3, 3, 3), torch.float64, n=4, e=6, c=2)
    out = ops.conv_tp(x, y, w, sender, receiver, 4, 3, 3, 3)
    torch.testing.assert_close(out, ref.conv_tp(x, y, w, sender, receiver, 4, 3, 3, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lmax,dtype", [((1, 1, 1), torch.float32), ((2, 2, 2), torch.float64), ((1, 2, 1), torch.float64)])
def test_conv_first_and_second_derivatives_match_reference(lmax, dtype):
    ops = _ops()
    sender, receiver = _graph()
    outs = {}
    for name, fn in (("triton", ops.conv_tp), ("torch", ref.conv_tp)):
        x, y, w = _inputs(lmax, dtype, requires_grad=True)
        out = fn(x, y, w, sender, receiver, 5, *lmax)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(out, (x, y, w), g, create_graph=True)
        v = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2 + i), dtype=torch.float64).to(dtype)
             for i, t in enumerate(grads)]
        second = torch.autograd.grad(grads, (x, y, w), v)
        outs[name] = [t.detach() for t in grads] + list(second)
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, b, **_tol(dtype))


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


def test_conv_gradcheck_and_gradgradcheck_float64():
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
    from mlip.kernels import validate_backend

    assert validate_backend("auto", "cpu", torch.float32) == "torch"
    assert validate_backend("triton", "cpu", torch.float64, lmax=3) == "triton"  # interpreter on
    with pytest.raises(ValueError, match="lmax 4"):
        validate_backend("triton", "cpu", torch.float64, lmax=4)
    with pytest.raises(ValueError, match="bfloat16"):
        validate_backend("triton", "cpu", torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="not CUDA"):
        validate_backend("triton", "cpu", torch.float32)
    ops = _ops()
    sender, receiver = _graph()
    x, y, w = _inputs((1, 1, 1), torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.conv_tp(x, y, w, sender, receiver, 5, 1, 1, 1)


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


@pytest.mark.parametrize("lmax,lmax_out", [(1, 2), (2, 2), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_product_matches_reference(lmax, lmax_out, dtype):
    ops = _ops()
    to_grid, from_grid = refgrid.gaunt_grid(lmax, lmax_out, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, (lmax + 1) ** 2, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(3, 3, (lmax + 1) ** 2, generator=g, dtype=torch.float64).to(dtype)
    out = ops.grid_product(a, b, to_grid, from_grid)
    assert out.shape == (3, 3, (lmax_out + 1) ** 2)
    torch.testing.assert_close(out, refgrid.grid_product(a, b, to_grid, from_grid),
                               **({"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}))


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
def _model(kernel: str, dtype: torch.dtype):
    from mlip.models.base import build_model

    cfg = {"r_max": 3.0, "elements": [1, 8], "num_channels": 4, "lmax": 1, "num_layers": 2, "correlation": 2,
           "avg_num_neighbors": 10.0, "kernel": kernel}
    return build_model("equivariant", cfg).to(dtype)


def _batch(dtype: torch.dtype):
    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph

    atoms = validate.builtin_structure([1, 8], 3.0)
    return collate([atoms_to_graph(atoms, 3.0)]).to(dtype=dtype)


def test_equivariant_model_energy_forces_stress_and_training_grads_triton_equals_torch():
    pytest.importorskip("mlip.models.equivariant")
    from mlip.models.outputs import predict

    dtype = torch.float64
    batch = _batch(dtype)
    fast, slow = _model("triton", dtype), _model("torch", dtype)
    slow.load_state_dict(fast.state_dict())
    a = predict(fast, batch, forces=True, stress=True, create_graph=True)
    b = predict(slow, batch, forces=True, stress=True, create_graph=True)
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


def test_check_backend_accepts_triton_and_refuses_a_wrong_kernel(monkeypatch):
    pytest.importorskip("mlip.models.equivariant")
    model = _model("triton", torch.float32)
    check = validate.check_backend(model)
    assert check is not None and check.ok and check.backend == "triton" and check.dtype == torch.float32
    assert validate.check_backend(_model("torch", torch.float32)) is None  # nothing to check

    ops = _ops()
    wrong = lambda *args: ref.conv_tp(*args) * 1.001
    monkeypatch.setattr(ops, "conv_tp", wrong)
    with pytest.raises(validate.BackendMismatchError, match="disagrees with the torch reference"):
        validate.check_backend(_model("triton", torch.float64))


def test_ensure_checked_runs_once_per_device_and_dtype(monkeypatch):
    pytest.importorskip("mlip.models.equivariant")
    ops = _ops()
    calls = []

    def counted(*args):
        calls.append(1)
        return ref.conv_tp(*args)  # an exact "accelerated" kernel: the check passes

    monkeypatch.setattr(ops, "conv_tp", counted)
    model = _model("triton", torch.float64)
    validate.ensure_checked(model, "cpu", torch.float64)
    n = len(calls)
    assert n > 0  # the check evaluated the model with its backend
    validate.ensure_checked(model, "cpu", torch.float64)
    assert len(calls) == n  # cached for (cpu, float64)
    monkeypatch.setattr(ops, "conv_tp", lambda *args: ref.conv_tp(*args) * 1.001)
    with pytest.raises(validate.BackendMismatchError):
        validate.ensure_checked(model, "cpu", torch.float32)  # another dtype: checked again, and refused
    with pytest.raises(validate.BackendMismatchError):
        validate.ensure_checked(model, "cpu", torch.float32)  # a failed check is not remembered
