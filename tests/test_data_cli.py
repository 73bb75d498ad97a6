"""``mlip data inspect | convert | split`` under click's CliRunner."""
from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from click.testing import CliRunner
from mlip.cli.data import data
from mlip.data.split import split_indices
from mlip.cli.main import main

from mlip.data.formats import read, write_hdf5
from mlip.data.stats import summarize

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "emt_crystals.xyz"


def emt_frames(n: int, seed: int = 0) -> list[Atoms]:
    """Small rattled Cu/Au crystals with EMT labels (a calculator, as ASE writes them), one
    isolated atom; every frame has a distinct energy (used as its identity below)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n - 1):
        a = bulk("Cu" if i % 2 else "Au", "fcc", a=3.8).repeat((2 + i % 3, 1, 1))
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.calc = EMT()
        results = {"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress()}
        a.calc = SinglePointCalculator(a, **results)
        a.info["config_type"] = "bulk"
        frames.append(a)
    atom = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    atom.calc = EMT()
    atom.calc = SinglePointCalculator(atom, energy=atom.get_potential_energy(), forces=np.zeros((1, 3)))
    atom.info["config_type"] = "IsolatedAtom"
    frames.append(atom)
    return frames


def run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_help_has_examples():
    for command in ("inspect", "convert", "split"):
        result = run(["data", command, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output and f"mlip data {command} " in result.output
    group_help = run(["data", "--help"]).output
    assert "inspect" in group_help and "Example" in group_help


def test_inspect_bundled_data():
    result = run(["data", "inspect", str(BUNDLED)])
    assert result.exit_code == 0, result.output
    frames = read(BUNDLED)
    s = summarize(frames)
    assert f"structures                 {len(frames)}" in result.output
    for symbol in ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"):
        assert f"    {symbol} " in result.output
    assert "IsolatedAtom: 7" in result.output
    assert f"{s['forces_rms']:.6g}" in result.output
    # JSON output agrees with summarize(); --e0s adds the isolated-atom table
    out = json.loads(run(["data", "inspect", str(BUNDLED), "--json", "--e0s"]).output)
    assert out["n_structures"] == s["n_structures"] == len(frames)
    assert out["labels"] == s["labels"] and out["labels"]["stress"] == len(frames) - 7
    assert out["forces_rms"] == pytest.approx(s["forces_rms"])
    assert set(out["e0s_isolated_atoms"]) == {"13", "28", "29", "46", "47", "78", "79"}


def test_inspect_with_key_options(tmp_path):
    frames = emt_frames(5)
    for a in frames:
        a.info["REF_energy"] = a.calc.results["energy"]
        a.arrays["REF_forces"] = a.calc.results["forces"]
        a.info["total_charge"] = 0.0
        a.calc = None
    path = tmp_path / "ref.xyz"
    ase.io.write(path, frames, format="extxyz")
    plain = json.loads(run(["data", "inspect", str(path), "--json"]).output)
    assert plain["labels"]["energy"] == 0 and plain["labels"]["forces"] == 0
    keyed = json.loads(run(["data", "inspect", str(path), "--json", "--energy-key", "REF_energy",
                            "--forces-key", "REF_forces", "--charge-key", "total_charge"]).output)
    assert keyed["labels"]["energy"] == keyed["labels"]["forces"] == keyed["labels"]["charge"] == 5


def test_bad_input_is_one_clean_error_line(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\nProperties=species:S:1:pos:R:3\nCu 0 0 0\n")
    result = CliRunner().invoke(main, ["data", "inspect", str(bad)])
    assert result.exit_code != 0
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert str(bad) in result.output and "frame 0" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ValueError)
    # a user key that occurs nowhere: names the key
    good = tmp_path / "good.xyz"
    ase.io.write(good, emt_frames(3), format="extxyz")
    result = CliRunner().invoke(main, ["data", "inspect", str(good), "--energy-key", "REF_energy"])
    assert result.exit_code != 0 and "REF_energy" in result.output and result.output.startswith("Error: ")
    # convert needs an HDF5 output
    result = CliRunner().invoke(main, ["data", "convert", str(good), str(tmp_path / "out.xyz")])
    assert result.exit_code != 0 and "must be an HDF5 file" in result.output
    # required labels
    result = CliRunner().invoke(main, ["data", "convert", str(good), str(tmp_path / "o.h5"), "--require", "charge"])
    assert result.exit_code != 0 and "charge" in result.output and not (tmp_path / "o.h5").exists()


def test_convert_round_trip(tmp_path):
    frames = emt_frames(7)
    xyz, h5 = tmp_path / "in.xyz", tmp_path / "out.h5"
    ase.io.write(xyz, frames, format="extxyz")
    result = run(["data", "convert", str(xyz), str(h5), "--chunk-size", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 7 structures" in result.output
    src, out = read(xyz), read(h5)
    assert len(out) == 7
    for a, b in zip(out, src):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell[:], b.cell[:])
        assert a.info["energy"] == b.info["energy"]
        np.testing.assert_array_equal(a.arrays["forces"], b.arrays["forces"])
        assert ("stress" in a.info) == ("stress" in b.info)
        if "stress" in b.info:
            np.testing.assert_array_equal(a.info["stress"], b.info["stress"])
        assert a.info["config_type"] == b.info["config_type"]
    assert out[-1].info["isolated_atom"]


def _ids(path: Path) -> list[float]:
    return [a.info["energy"] for a in read(path)]


@pytest.mark.parametrize("fmt", ["xyz", "h5"])
def test_split_disjoint_complete_reproducible(tmp_path, fmt):
    frames = emt_frames(20)
    src = tmp_path / f"all.{fmt}"
    if fmt == "xyz":
        ase.io.write(src, frames, format="extxyz")
    else:
        write_hdf5(read(_write_xyz(tmp_path, frames)), src)
    energies = _ids(src)
    assert len(set(energies)) == 20

    def do(seed: int, out: str) -> dict[str, list[float]]:
        result = run(["data", "split", str(src), "--fractions", "0.7,0.2,0.1", "--seed", str(seed),
                      "--out-dir", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        return {name: _ids(tmp_path / out / f"{name}.{fmt}") for name in ("train", "valid", "test")}

    a = do(0, "a")
    assert [len(a[k]) for k in ("train", "valid", "test")] == [14, 4, 2]
    together = a["train"] + a["valid"] + a["test"]
    assert sorted(together) == sorted(energies)  # complete and disjoint
    for part in a.values():  # each part keeps the input order
        assert part == [e for e in energies if e in set(part)]
    assert do(0, "b") == a  # same seed, same split
    c = do(1, "c")
    assert c != a and sorted(c["train"] + c["valid"] + c["test"]) == sorted(energies)
    if fmt == "xyz":
        # labels survive the extxyz round trip under canonical names
        by_energy = {x.info["energy"]: x for x in read(src)}
        for x in read(tmp_path / "a" / "train.xyz"):
            ref = by_energy[x.info["energy"]]
            np.testing.assert_allclose(x.arrays["forces"], ref.arrays["forces"], atol=1e-8)
            assert ("stress" in x.info) == ("stress" in ref.info)
            assert x.info["config_type"] == ref.info["config_type"]


def _write_xyz(tmp_path: Path, frames: list[Atoms]) -> Path:
    path = tmp_path / "tmp_src.xyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def test_split_options(tmp_path):
    frames = emt_frames(6)
    src = _write_xyz(tmp_path, frames)
    result = run(["data", "split", str(src), "--fractions", "0.5,0.5", "--out-dir", str(tmp_path / "two"),
                  "--format", "hdf5"])
    assert result.exit_code == 0, result.output
    # the isolated atom (last frame) stays in train; the fraction splits the five other frames
    train_part, valid_part = read(tmp_path / "two" / "train.h5"), read(tmp_path / "two" / "valid.h5")
    assert (len(train_part), len(valid_part)) == (4, 2)
    assert [a.info["isolated_atom"] for a in train_part].count(True) == 1
    assert not any(a.info["isolated_atom"] for a in valid_part)
    assert not (tmp_path / "two" / "test.h5").exists()
    for bad in ("0.5,0.6", "1", "a,b", "0.5,0.25,0.25,0"):
        result = CliRunner().invoke(data, ["split", str(src), "--fractions", bad, "--out-dir", str(tmp_path / "x")])
        assert result.exit_code == 2 and "--fractions" in result.output


def test_split_indices_sizes_add_up():
    for n in (0, 1, 7, 10, 101):
        parts = split_indices(n, [0.8, 0.1, 0.1], seed=3)
        assert sum(len(p) for p in parts) == n
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert all(abs(len(p) - f * n) < 1 for p, f in zip(parts, [0.8, 0.1, 0.1]))
