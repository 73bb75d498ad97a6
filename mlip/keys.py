"""Canonical field names used everywhere in mlip, with shape, meaning and unit.

Readers (``mlip.data.formats``) store labels on ``ase.Atoms`` under these names:
per-structure values in ``atoms.info``, per-atom values in ``atoms.arrays``; mlip's HDF5 files
use them as dataset names. Code reads and writes labels through these constants, never through
string literals. Model outputs (:func:`mlip.models.outputs.predict`) use the same names.
Edges are ``(sender, receiver)``: messages flow from ``edge_index[0]`` to
``edge_index[1]`` and aggregate at the receiver.
"""
from __future__ import annotations

# --- structure (inputs) -------------------------------------------------------
POSITIONS = "positions"        # (n_atoms, 3)    | Cartesian positions             | Å
NUMBERS = "numbers"            # (n_atoms,)      | atomic numbers Z                | -
CELL = "cell"                  # (n_graphs, 3, 3)| rows are lattice vectors        | Å
PBC = "pbc"                    # (n_graphs, 3)   | periodic along each cell vector | bool
EDGE_INDEX = "edge_index"      # (2, n_edges)    | (sender, receiver) atom indices | -
UNIT_SHIFTS = "unit_shifts"    # (n_edges, 3)    | integer cell shifts of sender   | -
BATCH = "batch"                # (n_atoms,)      | structure index of each atom    | -
PTR = "ptr"                    # (n_graphs + 1,) | atom offsets of each structure  | -
CHARGE = "charge"              # (n_graphs,)     | total charge                    | e
SPIN = "spin"                  # (n_graphs,)     | spin multiplicity 2S+1          | -
HEAD = "head"                  # (n_graphs,)     | dataset/head tag (string -> id) | -
WEIGHT = "weight"              # (n_graphs,)     | per-structure loss weight       | -
ISOLATED = "isolated_atom"     # (n_graphs,)     | isolated-atom reference frame   | bool
CONFIG_TYPE = "config_type"    # (n_graphs,)     | data set's own frame category   | -
SOURCE = "source"              # (n_graphs,)     | "<file> frame <i>" of a frame   | -
ORIGINAL_SOURCE = "original_source"  # (n_graphs,) | source before HDF5 conversion | -

# --- labels (targets) ---------------------------------------------------------
ENERGY = "energy"              # (n_graphs,)     | total energy                    | eV
FORCES = "forces"              # (n_atoms, 3)    | forces -dE/dr                   | eV/Å
STRESS = "stress"              # (n_graphs, 3, 3)| stress, ASE sign (+ = tensile)  | eV/Å³
MAGMOM = "magmom"              # (n_atoms,)      | magnetic moments (MPTrj)        | μB

# --- model outputs ------------------------------------------------------------
NODE_ENERGY = "node_energy"    # (n_atoms,)      | per-atom energy incl. E0        | eV
VIRIAL = "virial"              # (n_graphs, 3, 3)| virial -dE/dε                   | eV

#: per-structure labels kept in ``atoms.info``
GRAPH_LABELS = (ENERGY, STRESS)
#: per-atom labels kept in ``atoms.arrays``
NODE_LABELS = (FORCES,)
#: per-structure inputs kept in ``atoms.info``
GRAPH_INFO = (CHARGE, SPIN, WEIGHT, HEAD)
