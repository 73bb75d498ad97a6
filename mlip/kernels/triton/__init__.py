"""Triton kernels (imported lazily, on first use of ``BACKENDS["triton"].ops``): ``ops`` mirrors
:mod:`mlip.kernels.reference`; ``codegen`` describes the fused convolution kernels' arguments and
generates their source (``conv_*``, and ``spline_*`` with the radial spline folded in), committed in
``generated/``; ``conv`` loads and launches them on CSR-ordered graphs; ``autograd`` makes them
differentiable to any order; ``grid`` is the spherical-grid product."""
