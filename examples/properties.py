"""Materials properties of fcc copper from an mlip model: equation of state, elastic constants, phonons.

Runs ``mlip.properties.eos``, ``elastic_constants`` and ``phonons`` (phonopy: ``pip install
'mlip[phonons]'``) with the model in a float64 ``MLIPCalculator`` (finite differences of forces and
stresses need it), prints V0, E0, the bulk modulus, C11/C12/C44 and the frequencies at Γ, and saves the
phonon band structure and DOS as a PNG. The same functions take any ASE calculator (EMT, DFT, ...).

    python examples/properties.py                                  # trains a small model first
    python examples/properties.py --model runs/quickstart/model.pt --supercell 4

Without ``--model`` it uses ``runs/quickstart/model.pt`` (relative to the current folder) if present
(``mlip train configs/quickstart.yaml``), else trains the quickstart model for ``--train-seconds``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _model import get_model  # examples/_model.py
from ase.build import bulk

import mlip
from mlip.calculator import MLIPCalculator
from mlip.properties import elastic_constants, eos, phonons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: see above)")
    parser.add_argument("--element", default="Cu", help="an fcc element the model knows")
    parser.add_argument("--supercell", type=int, default=3, help="phonon supercell: n x n x n primitive cells")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/examples/properties", help="output folder")
    parser.add_argument("--train-seconds", type=float, default=90.0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = mlip.load(get_model(args.model, out, args.train_seconds))
    calc = MLIPCalculator(model, device=args.device, dtype="float64")

    t0 = time.perf_counter()
    cubic = bulk(args.element, "fcc", cubic=True)  # ASE's experimental lattice constant to start from
    a0 = eos(cubic, calc)["v0"] ** (1 / 3)  # a wide scan finds the minimum ...
    fit = eos(bulk(args.element, "fcc", a=a0, cubic=True), calc, strain=0.01)  # ... a narrow one the curvature there
    print(f"EOS: V0 = {fit['v0']:.3f} Å³ (a0 = {a0:.4f} Å), E0 = {fit['e0']:.4f} eV, "
          f"B = {fit['bulk_modulus']:.1f} GPa")

    cij = elastic_constants(bulk(args.element, "fcc", a=a0, cubic=True), calc)
    print(f"elastic constants: C11 = {cij['C11']:.1f}, C12 = {cij['C12']:.1f}, C44 = {cij['C44']:.1f} GPa; "
          f"B = {cij['bulk_modulus']:.1f} GPa, G = {cij['shear_modulus']:.1f} GPa (Hill)")

    relaxed = cij["atoms"]
    primitive = bulk(args.element, "fcc", a=float(np.mean(relaxed.cell.lengths())))
    n = args.supercell
    ph = phonons(primitive, calc, supercell=(n, n, n), plot=out / "phonons.png")
    top = ph["band"]["frequencies"].max()
    print(f"phonons: Γ frequencies {np.array2string(ph['gamma_thz'], precision=3)} THz, highest "
          f"{top:.2f} THz; plot {out / 'phonons.png'}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
