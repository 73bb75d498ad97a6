"""The ``frame-averaged`` family: conformance under full averaging, stochastic averaging,
degenerate structures, the direct force head and training-mode gradients."""
from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch

from conformance import ModelConformance, atoms_to_graph, crystal, molecule, random_rotation, rel_err, transform
from mlip.data.graph import collate
from mlip.models.base import build_model
from mlip.models.outputs import predict

SMALL = dict(num_channels=16, num_layers=2, num_radial=6, readout_hidden=8, avg_num_neighbors=6.0)


class TestFullAveragingO3(ModelConformance):
    """Full averaging over the 8 O(3) frames: exact to rounding (gradients flow through the frame)."""

    def make_model(self, **overrides):
        return build_model("frame-averaged", {**SMALL, **overrides})
