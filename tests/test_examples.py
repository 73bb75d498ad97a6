"""The MD and relaxation examples run as they are (small settings) and report sensible results."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlip.models.base import save_model

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: float = 600) -> str:
    # one thread: these structures are tiny (speed only; results do not depend on it)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def model_file(trained_model, tmp_path_factory):
    """The conftest's small equivariant model (fitted to the bundled data), saved to a file."""
    path = tmp_path_factory.mktemp("model") / "cu.pt"
    save_model(trained_model, path)
    return path


def test_relax_crystals_example(model_file, tmp_path):
    out = _run([str(REPO / "examples/relax_crystals.py"), "--model", str(model_file), "--device", "cpu",
                "--fmax", "0.05", "--out", str(tmp_path / "relax")], cwd=tmp_path)
    assert "pymatgen Cu" in out and "ASE Cu8" in out
    assert "same results" in out
    assert (tmp_path / "relax" / "relaxed.extxyz").is_file()
    # the lattice constant moved from the 3.9 Å start towards copper's
    a_new = float(re.search(r"a = 3\.900 -> ([0-9.]+) Å", out).group(1))
    assert 3.3 < a_new < 3.85


def test_md_ase_example(model_file, tmp_path):
    out = _run([str(REPO / "examples/md_ase.py"), "--model", str(model_file), "--device", "cpu", "--steps", "40",
                "--size", "2", "--out", str(tmp_path / "md")], cwd=tmp_path)
    drift = float(re.search(r"NVE: .*max \|E_tot - E_tot\(0\)\| = ([0-9.e+-]+) eV/atom", out).group(1))
    assert drift < 1e-3
    assert (tmp_path / "md" / "nve.extxyz").is_file() and (tmp_path / "md" / "nve.log.csv").is_file()


def test_md_ase_example_trains_a_model_when_none_is_given(tmp_path):
    out = _run([str(REPO / "examples/md_ase.py"), "--device", "cpu", "--steps", "10", "--size", "1",
                "--train-seconds", "2", "--out", str(tmp_path / "md")], cwd=tmp_path)
    assert "training the quickstart model" in out
    assert (tmp_path / "md" / "model" / "model.pt").is_file()
    assert "run_md: 10 steps" in out


def test_properties_example(model_file, tmp_path):
    out = _run([str(REPO / "examples/properties.py"), "--model", str(model_file), "--device", "cpu",
                "--supercell", "2", "--out", str(tmp_path / "props")], cwd=tmp_path)
    b_eos = float(re.search(r"EOS: .* B = ([0-9.]+) GPa", out).group(1))
    c11, c12, c44 = (float(x) for x in re.search(
        r"C11 = ([0-9.-]+), C12 = ([0-9.-]+), C44 = ([0-9.-]+) GPa", out).groups())
    # one potential, two routes to the bulk modulus: the E(V) fit and (C11 + 2 C12)/3 from stresses
    assert b_eos > 0 and (c11 + 2 * c12) / 3 == pytest.approx(b_eos, rel=0.02)
    assert c11 > c12  # a mechanically stable cubic crystal (Born: C11 > |C12|, C44 > 0)
    assert c44 > 0
    gamma = [float(x) for x in re.search(r"Γ frequencies \[([^\]]+)\]", out).group(1).split()]
    assert len(gamma) == 3 and max(abs(f) for f in gamma) < 0.1  # acoustic modes at zero
    assert (tmp_path / "props" / "phonons.png").is_file()
