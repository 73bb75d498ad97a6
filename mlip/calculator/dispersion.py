"""DFT-D3(BJ) dispersion added to a model's energy, forces and stress, through simple-dftd3.

A model trained on PBE data (MPTrj, most of OMat/OMol) lacks the long-range dispersion that
PBE lacks; :class:`D3Dispersion` adds Grimme's D3 with Becke-Johnson damping (Grimme et al.,
J. Comput. Chem. 32, 1456 (2011)), with the damping parameters of the functional it is named
after. The numbers come from simple-dftd3's Python API (``pip install 'mlip[d3]'``), the
reference implementation's library with analytic gradients and virial; torch-dftd agrees with it
to 3e-6 eV at equal cutoffs but was 300-700x slower on our CPU benchmark (docs/md.md).
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from ase.units import Bohr, Hartree

from mlip.data.graph import GraphBatch

__all__ = ["D3Dispersion", "resolve_dispersion"]

#: the error when simple-dftd3 is missing
MISSING_DFTD3 = (
    "dispersion needs simple-dftd3's Python API (the 'dftd3' package): pip install 'mlip[d3]' "
    "(or pip install dftd3)"
)


def _dftd3() -> Any:
    try:
        from dftd3 import interface
    except ImportError as err:
        raise ImportError(MISSING_DFTD3) from err
    return interface


class D3Dispersion:
    """D3(BJ) energy, forces and virial of structures, in eV, eV/Å and eV.

    Args:
        functional: the density functional whose D3(BJ) parameters are used (``"pbe"``,
            ``"r2scan"``, ``"b3lyp"``, ... any name simple-dftd3 knows; case-insensitive).
        three_body: add the Axilrod-Teller-Muto three-body term (``s9 = 1``); off by default, as
            in the D3(BJ) parameters fitted without it and in torch-dftd's default.
        cutoff, cn_cutoff: real-space cutoffs (Å) of the pair sum and of the coordination numbers;
            ``None`` keeps simple-dftd3's defaults (60 and 40 bohr, 31.8 and 21.2 Å).
        smooth_width: width (Å) over which the pair sum is switched off before ``cutoff`` (simple-dftd3's
            ``width2``), so that forces are the gradient of a continuous energy. 0 is D3's plain
            truncation (simple-dftd3's default), whose energy steps when a pair crosses the cutoff: in
            a rattled 32-atom Cu cell that made central-difference forces differ from the analytic
            ones by 5e-4 eV/Å, against 1e-8 eV/Å with 0.5 Å or more; the 1 Å default moves that
            cell's D3 energy by 3e-5 eV/atom.

    Raises:
        ImportError: simple-dftd3 is not installed (the message says what to install).
        ValueError: simple-dftd3 has no D3(BJ) parameters for ``functional``.
    """

    def __init__(self, functional: str = "pbe", three_body: bool = False, cutoff: float | None = None,
                 cn_cutoff: float | None = None, smooth_width: float = 1.0) -> None:
        api = _dftd3()
        self.functional = str(functional).lower()
        try:
            self._param = api.RationalDampingParam(method=self.functional, atm=bool(three_body))
        except RuntimeError as err:
            raise ValueError(f"dispersion {functional!r}: simple-dftd3 has no D3(BJ) parameters for it ({err}); "
                             "use a functional name such as 'pbe', 'pbesol', 'r2scan', 'b3lyp'") from err
        self.three_body = bool(three_body)
        # simple-dftd3 takes bohr; its defaults are 60 (pairs) and 40 bohr (CN, three-body)
        cut = (60.0 * Bohr if cutoff is None else float(cutoff)) / Bohr
        cn = (40.0 * Bohr if cn_cutoff is None else float(cn_cutoff)) / Bohr
        self._cutoffs = {"disp2": cut, "disp3": min(cn, cut), "cn": cn, "width2": float(smooth_width) / Bohr}

    def __repr__(self) -> str:
        return f"D3Dispersion({self.functional!r}, three_body={self.three_body})"

    def compute(self, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                per_atom: bool = False) -> dict[str, np.ndarray]:
        """D3 of one structure.

        Shapes:
            numbers [n_atoms]; positions [n_atoms, 3] Å; cell [3, 3] Å (rows); pbc [3] bool ->
            ``energy`` [] eV, ``forces`` [n_atoms, 3] eV/Å, ``virial`` [3, 3] eV (``-dE/dε``, mlip's
            convention) and with ``per_atom`` ``node_energy`` [n_atoms] eV (summing to the energy).
        """
        api = _dftd3()
        pbc = np.asarray(pbc, dtype=bool)
        periodic = bool(pbc.any())
        model = api.DispersionModel(
            np.asarray(numbers, dtype=np.int32), np.asarray(positions, dtype=np.float64) / Bohr,
            np.asarray(cell, dtype=np.float64) / Bohr if periodic else None, pbc if periodic else None,
        )
        model.set_realspace_cutoff(**self._cutoffs)
        res = model.get_dispersion(self._param, grad=True)
        out = {
            "energy": np.asarray(float(res["energy"]) * Hartree),
            "forces": -np.asarray(res["gradient"]) * (Hartree / Bohr),
            # simple-dftd3's "virial" is the strain derivative dE/dε (its ASE calculator divides it
            # by the volume for the stress); mlip's virial is -dE/dε
            "virial": -np.asarray(res["virial"]) * Hartree,
        }
        if per_atom:
            pairs = model.get_pairwise_dispersion(self._param)
            # pair matrices hold each pair's energy split over (i, j) and (j, i): rows sum to the atoms' shares
            per = sum(np.asarray(m).sum(axis=1) for m in pairs.values())
            out["node_energy"] = per * Hartree
        return out

    def add_to(self, out: dict[str, torch.Tensor], batch: GraphBatch, per_atom: bool = False) -> dict[str, torch.Tensor]:
        """Model outputs plus D3, structure by structure, as float64 tensors.

        ``energy`` [n_graphs], ``forces`` [n_atoms, 3], ``virial`` and ``stress`` [n_graphs, 3, 3] (if
        present in ``out``), and ``node_energy`` [n_atoms] when ``per_atom`` (else it is dropped: it
        would no longer sum to the energy). Other keys are kept as they are.
        """
        f64 = torch.float64
        ptr = batch.ptr.tolist()
        pos, numbers = batch.positions.detach().to("cpu", f64).numpy(), batch.numbers.cpu().numpy()
        cell, pbc = batch.cell.detach().to("cpu", f64).numpy(), batch.pbc.cpu().numpy()
        parts = [self.compute(numbers[a:b], pos[a:b], cell[g], pbc[g], per_atom)
                 for g, (a, b) in enumerate(itertools.pairwise(ptr))]
        dev = out["energy"].device
        as_t = lambda key, cat: torch.as_tensor(
            np.concatenate([p[key] for p in parts]) if cat else np.stack([p[key] for p in parts]), dtype=f64, device=dev)
        result = dict(out)
        result["energy"] = out["energy"].detach().to(f64) + as_t("energy", False)
        result.pop("node_energy", None)
        if per_atom and "node_energy" in out:
            result["node_energy"] = out["node_energy"].detach().to(f64) + as_t("node_energy", True)
        if "forces" in out:
            result["forces"] = out["forces"].detach().to(f64) + as_t("forces", True)
        if "virial" in out:
            virial = as_t("virial", False)  # [n_graphs, 3, 3]
            result["virial"] = out["virial"].detach().to(f64) + virial
            volume = torch.linalg.det(batch.cell.detach().to(f64)).abs()[:, None, None]
            result["stress"] = out["stress"].detach().to(f64) - torch.where(volume > 0, virial / volume, torch.nan)
        return result


def resolve_dispersion(dispersion: str | D3Dispersion | None) -> D3Dispersion | None:
    """``None``, a :class:`D3Dispersion`, or a functional name (``"pbe"``) that selects its D3(BJ) parameters."""
    if dispersion is None or isinstance(dispersion, D3Dispersion):
        return dispersion
    if isinstance(dispersion, str):
        if dispersion.lower() in ("", "none", "off"):
            return None
        return D3Dispersion(dispersion)
    raise TypeError(f"dispersion must be a functional name (e.g. 'pbe') or a D3Dispersion, got {type(dispersion).__name__}")
