"""The ``equivariant`` family: conformance (exact and grid-mixing configs) and family-specific checks."""
from __future__ import annotations

import ase
import pytest
import torch

from conformance import ModelConformance, crystal, molecule, random_rotation, rel_err, transform
from mlip.models.base import build_model

SMALL = dict(num_channels=8, lmax=2, num_layers=2, correlation=3, spline_knots=10, readout_hidden=8,
             avg_num_neighbors=8.0)


class TestExactNoMixing(ModelConformance):
    """Spline radials, correlation 3, no grid mixing: exactly O(3)-equivariant."""

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, "mixing": "none", **overrides})


class TestExactQuadraticGrid(ModelConformance):
    """Grid mixing with a quadratic pointwise MLP on a grid exact to degree 3*lmax: exact."""

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, "mixing": "grid", "grid_activation": "quadratic",
                                           "radial": "mlp", "correlation": 2, **overrides})


class TestSiluGrid(ModelConformance):
    """Default grid mixing (SiLU MLP): exactly parity-equivariant, rotation error bounded (docs/equivariant.md)."""

    exact = False
    approx_equivariance_tol = {torch.float32: 1e-3, torch.float64: 1e-3}

    def make_model(self, **overrides):
        return build_model("equivariant", {**SMALL, **overrides})


def _model(**kw):
    return build_model("equivariant", {**SMALL, "elements": [1, 6, 8], "r_max": 3.5, **kw}).double().eval()
