"""Test-session setup shared by every test module."""
from __future__ import annotations

import os

# tests/test_kernels.py runs the Triton kernels on CPU tensors in Triton's interpreter, which works
# only if TRITON_INTERPRET is set before triton is first imported; e3nn.o3 imports torch._dynamo and
# with it triton, so any module of the suite may import it first. Set it here, before any of them.
# It changes nothing else: only an explicit kernel="triton" runs Triton, and not on the CPU otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")
