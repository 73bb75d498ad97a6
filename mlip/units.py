"""Units and conversions. Inside mlip: eV, Å, eV/Å, eV/Å³.

Stress follows ASE's sign convention: positive stress is tensile, so a crystal
that wants to shrink has positive diagonal stress, and ``stress = (1/V) dE/dε``.
VASP (and therefore MPTrj) reports stress in kBar with the opposite sign
(positive = compressive), hence ``KBAR_VASP_TO_EV_A3 = -0.1 * GPa``.
"""
from __future__ import annotations

from ase import units as _ase_units

#: 1 GPa in eV/Å³
GPA = _ase_units.GPa
#: 1 kBar in eV/Å³
KBAR = 0.1 * _ase_units.GPa
#: multiply a VASP/MPTrj stress (kBar, positive = compressive) to get ASE stress in eV/Å³
KBAR_VASP_TO_EV_A3 = -0.1 * _ase_units.GPa
