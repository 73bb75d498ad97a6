"""The GPU check (``python -m benchmarks gpu``) keeps working while no GPU is around: its ``--smoke`` run
takes the same code path on the CPU, with Triton's interpreter at tiny sizes, and must write every
section with passing parity checks and finite, positive figures. It asserts, it never times."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton", reason="the GPU check's smoke run needs triton (the [test] extra installs it)")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "Kernel parity" in res.stdout and "µs per atom" in res.stdout  # the table is printed
    return json.loads(out.read_text())


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_run_writes_every_section(smoke):
    assert {"environment", "kernels", "model", "max_atoms", "md"} <= set(smoke)
    assert not smoke.get("part_errors")
    env = smoke["environment"]
    assert env["smoke"] and env["triton_interpret"] and env["device"].startswith("cpu")
    assert env["torch"] and env["triton"]
    assert set(env["part_seconds"]) == {"parity", "model", "max_atoms", "md", "kernels"}


def test_every_parity_check_ran_and_passed(smoke):
    parity = smoke["kernels"]["parity"]
    assert {r["op"] for r in parity} == {"conv_tp", "conv_tp_spline", "grid_product"}  # every fused op
    assert {r["dtype"] for r in parity} == {"float32", "float64"}
    for r in parity:
        assert r["status"] == "ok" and r["passed"], r
        # forward, backward and double backward, each within the tolerance
        kinds = {key.split()[0] for key in r["errors"]}
        assert kinds == {"output", "grad", "grad2"}, r["errors"]
        assert all(math.isfinite(e) and 0 <= e <= r["tolerance"] for e in r["errors"].values()), r


def test_model_max_atoms_and_md_figures_are_finite_and_positive(smoke):
    model = smoke["model"]
    assert {(r["preset"], r["structure"], r["backend"]) for r in model} == {
        (p, s, b) for p in ("small", "medium") for s in ("Cu", "Si") for b in ("torch", "triton")}
    for r in model:
        assert r["status"] == "ok", r
        assert _positive(r["us_per_atom"]) and _positive(r["n_atoms"]) and _positive(r["n_edges"])
        if r["backend"] == "triton":  # the same weights on both backends: the same forces
            assert r["max_abs_dF"] < 1e-3 and math.isfinite(r["max_abs_dE_per_atom"])
    assert [r["preset"] for r in smoke["max_atoms"]] == ["small", "medium"]
    for r in smoke["max_atoms"]:
        assert r["status"] == "ok" and _positive(r["largest_atoms"]) and _positive(r["largest_edges"]), r
    md = smoke["md"]
    for name in ("ase", "torchsim"):
        if md[name]["status"] == "skipped" and "torch_sim" in md[name].get("reason", ""):
            continue  # TorchSim is optional (the [test] extra installs it)
        assert md[name]["status"] == "ok" and _positive(md[name]["atom_steps_per_s"]), md[name]
    assert md["neighbors"] and all(r["status"] == "ok" and _positive(r["ms"]) and _positive(r["n_edges"])
                                   for r in md["neighbors"])


def test_kernel_timings_cover_triton_torch_and_the_peers(smoke):
    timings = smoke["kernels"]["timings"]
    ran = {(r["impl"], r["pass"]) for r in timings if r["status"] == "ok"}
    for impl in ("triton", "torch", "triton spline", "torch spline"):
        assert {(impl, p) for p in ("fwd", "fwd+bwd", "fwd+bwd+dbl")} <= ran, impl
    assert all(_positive(r["ms"]) for r in timings if r["status"] == "ok")
    # a peer either ran or says why not (not installed, CUDA only); nothing failed
    for r in timings:
        assert r["status"] in ("ok", "skipped"), r
        assert r["status"] == "ok" or r["reason"]
    assert {"e3nn", "cueq", "oeq"} <= {r["impl"] for r in timings}
