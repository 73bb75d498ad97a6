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
