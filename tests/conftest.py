"""Test-session setup shared by every test module."""
from __future__ import annotations

import os

# tests/test_kernels.py runs the Triton kernels on CPU tensors in Triton's interpreter, which works
# only if TRITON_INTERPRET is set before triton is first imported; e3nn.o3 imports torch._dynamo and
# with it triton, so any module of the suite may import it first. Set it here, before any of them.
# It changes nothing else: only an explicit kernel="triton" runs Triton, and not on the CPU otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # imported after TRITON_INTERPRET is set (see above)
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): graph
    building is many tiny torch ops, which run faster on one thread, on a busy CI box by far."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS thread for a module (with ``one_torch_thread``): OpenBLAS, used by ASE's cell filters
    through scipy, otherwise fights torch for the cores of a small shared machine (speed only)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    import scipy.linalg  # noqa: F401 - scipy bundles its own OpenBLAS: load it so that the limit covers it

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def trained_model():
    """A small equivariant model fitted for a few seconds to the Cu frames of data/emt_crystals.xyz
    (see ``toy_models.fit_small_equivariant``); shared read-only by the MD and example tests."""
    from pathlib import Path

    from toy_models import fit_small_equivariant

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest
    try:
        model, force_rmse = fit_small_equivariant(Path(__file__).resolve().parents[1] / "data/emt_crystals.xyz")
    finally:
        torch.set_num_threads(n_threads)
    assert force_rmse[-1] < 0.6 * force_rmse[0]  # it learned something from the data
    return model
