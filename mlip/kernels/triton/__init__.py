"""Triton kernels (imported lazily, on first use of ``BACKENDS["triton"].ops``): ``ops`` mirrors
:mod:`mlip.kernels.reference`; ``conv`` generates and launches the fused convolution kernels
(``conv_*``, and ``spline_*`` with the radial spline folded in), ``autograd`` makes them
differentiable to any order, ``grid`` is the spherical-grid product."""
