"""Molecular dynamics with ASE integrators and an mlip calculator: NVE, NVT, NPT.

:func:`run_md` wraps ASE's ``VelocityVerlet`` (NVE), ``NoseHooverChainNVT`` or ``Langevin`` (NVT)
and ``MTKNPT`` (NPT, Martyna-Tobias-Klein with Nose-Hoover chains), writes the trajectory as
extxyz or ASE ``.traj`` as it goes, logs temperature, energies and the drift of the conserved
quantity to a CSV, and stops with :class:`MDBlowUpError` (keeping the trajectory written so far)
when the temperature or a force leaves physical bounds.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units

from mlip.calculator.ase import MLIPCalculator
from mlip.calculator.committee import Committee
from mlip.models.base import PotentialModel
from mlip.units import GPA

__all__ = ["COMMITTEE_COLUMNS", "ENSEMBLES", "LOG_COLUMNS", "THERMOSTATS", "MDBlowUpError", "MDResult", "run_md"]

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("nose-hoover", "langevin")
#: columns of the CSV log: step, time (fs), T (K), potential/kinetic/total energy (eV),
#: conserved quantity (eV; total energy in NVE, including thermostat/barostat terms for
#: Nose-Hoover and MTK, plain total energy for Langevin), its drift per atom since step 0 (eV/atom),
#: volume (Å³, 0 without a cell), largest force (eV/Å)
LOG_COLUMNS = (
    "step", "time_fs", "temperature_K", "epot_eV", "ekin_eV", "etot_eV", "conserved_eV",
    "drift_eV_per_atom", "volume_A3", "max_force_eV_A",
)
#: extra columns with a committee: the members' energy spread (eV) and largest per-atom force spread (eV/Å)
COMMITTEE_COLUMNS = ("energy_std_eV", "max_force_std_eV_A")


class MDBlowUpError(RuntimeError):
    """The simulation left physical bounds; ``result`` holds what was done (trajectory kept)."""

    def __init__(self, message: str, result: MDResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class MDResult:
    """Outcome of :func:`run_md`.

    Attributes:
        atoms: the final structure (with the calculator attached).
        steps: MD steps completed.
        trajectory: path of the trajectory file; log: path of the CSV log.
        rows: the logged rows (dicts keyed by :data:`LOG_COLUMNS`).
        max_abs_drift: largest ``|drift_eV_per_atom|`` over the logged rows (eV/atom).
        stop_reason: why the run ended before ``steps`` without blowing up (the committee's force
            spread exceeded ``max_force_std``), else ``None``.
    """

    atoms: Atoms
    steps: int
    trajectory: str | None
    log: str | None
    rows: list[dict[str, float]] = field(default_factory=list)
    max_abs_drift: float = 0.0
    stop_reason: str | None = None


class _TrajectoryWriter:
    """Appends frames to extxyz (flushed after each frame) or ASE ``.traj``; closes cleanly."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.suffix = Path(path).suffix.lower()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if self.suffix == ".traj":
            from ase.io.trajectory import Trajectory

            self._traj = Trajectory(path, "w")
            self._fh = None
        elif self.suffix in (".xyz", ".extxyz"):
            self._traj = None
            self._fh = open(path, "w")  # noqa: SIM115 - appended to frame by frame, closed by close()
        else:
            raise ValueError(f"trajectory {path}: use .extxyz, .xyz or .traj")

    def write(self, atoms: Atoms) -> None:
        if self._traj is not None:
            self._traj.write(atoms)
        else:
            from ase.io import write

            write(self._fh, atoms, format="extxyz")
            self._fh.flush()

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()
        if self._fh is not None:
            self._fh.close()


def _make_dynamics(
    atoms: Atoms, ensemble: str, thermostat: str, temperature: float, timestep: float, friction: float,
    tdamp: float, pressure: float, pdamp: float, seed: int,
) -> Any:
    dt = timestep * units.fs
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt":
        if thermostat == "langevin":
            from ase.constraints import FixCom
            from ase.md.langevin import Langevin

            # ASE >= 3.28: keep the centre of mass fixed by a constraint, not by fixcm (which
            # samples a slightly wrong distribution for small systems)
            if not any(isinstance(c, FixCom) for c in atoms.constraints):
                atoms.set_constraint([*atoms.constraints, FixCom()])
            return Langevin(atoms, timestep=dt, temperature_K=temperature, friction=friction / units.fs,
                            fixcm=False, rng=np.random.default_rng(seed))
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature, tdamp=tdamp * units.fs)
    from ase.md.nose_hoover_chain import MTKNPT

    return MTKNPT(atoms, timestep=dt, temperature_K=temperature, pressure_au=pressure * GPA,
                  tdamp=tdamp * units.fs, pdamp=pdamp * units.fs)


def _check_options(
    atoms: Atoms, ensemble: str, thermostat: str, steps: int, timestep: float, log_every: int, traj_every: int
) -> None:
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose from {ENSEMBLES}")
    if thermostat not in THERMOSTATS:
        raise ValueError(f"unknown thermostat {thermostat!r}; choose from {THERMOSTATS}")
    if steps < 0 or timestep <= 0 or log_every < 1 or traj_every < 1:
        raise ValueError("steps >= 0, timestep > 0, log_every >= 1 and traj_every >= 1 are required")
    if ensemble == "npt" and not bool(np.all(atoms.pbc)):
        raise ValueError("NPT needs a cell periodic in all three directions")


def _draw_velocities(atoms: Atoms, temperature: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at ``temperature`` (K), no centre-of-mass motion (nor rotation of a molecule)."""
    from ase.md import velocitydistribution as vd

    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
        vd.thermalize_momenta(atoms, temperature, rng=rng)
    else:  # pragma: no cover - older ASE
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)
    if not np.any(atoms.pbc):
        with np.errstate(divide="ignore", invalid="ignore"):  # a linear molecule has a zero moment
            vd.ZeroRotation(atoms)


@dataclass
class _Sample:
    """What one MD step is judged and logged by (eV, K, Å³, eV/Å)."""

    step: int
    epot: float
    ekin: float
    temperature: float
    conserved: float
    volume: float
    max_force: float
    finite: bool
    energy_std: float = math.nan
    max_force_std: float = math.nan


def _observe(atoms: Atoms, dyn: Any) -> _Sample:
    """The present step of ``dyn``; the conserved quantity includes thermostat/barostat terms where
    the integrator defines them (Nose-Hoover, MTK), else it is the total energy."""
    epot = float(atoms.get_potential_energy())
    forces = atoms.get_forces()
    ekin = float(atoms.get_kinetic_energy())
    n_atoms = len(atoms)
    conserved = float(dyn.get_conserved_energy()) if hasattr(dyn, "get_conserved_energy") else epot + ekin
    results = atoms.calc.results if atoms.calc is not None else {}
    spread = {}
    if "forces_std" in results:  # a committee (read after get_forces: same step)
        spread = {"energy_std": float(results["energy_std"]),
                  "max_force_std": float(np.max(results["forces_std"])) if n_atoms else 0.0}
    return _Sample(
        step=int(dyn.nsteps), epot=epot, ekin=ekin, conserved=conserved,
        temperature=float(atoms.get_temperature()) if n_atoms else 0.0,
        volume=float(abs(np.linalg.det(np.asarray(atoms.cell)))),
        max_force=float(np.sqrt((forces**2).sum(axis=1).max())) if n_atoms else 0.0,
        finite=bool(math.isfinite(epot) and np.all(np.isfinite(forces))), **spread,
    )


def _blow_up_reason(sample: _Sample, max_temperature: float, max_force: float) -> str | None:
    """Why the run must stop at this step, or ``None``."""
    if not sample.finite:
        return "the energy or forces are not finite"
    if sample.temperature > max_temperature:
        return f"temperature {sample.temperature:.1f} K exceeds the limit {max_temperature:.1f} K"
    if sample.max_force > max_force:
        return f"the largest force {sample.max_force:.3g} eV/Å exceeds the limit {max_force:.3g} eV/Å"
    return None


def _spread_reason(sample: _Sample, max_force_std: float | None) -> str | None:
    """Why a committee run stops cleanly at this step (the force spread is too large), or ``None``."""
    if max_force_std is not None and sample.max_force_std > max_force_std:
        return (f"the committee's force spread {sample.max_force_std:.3g} eV/Å exceeds --max-force-std "
                f"{max_force_std:.3g} eV/Å (the model is uncertain here: label this structure)")
    return None


class _Recorder:
    """The outputs of one run: trajectory frames, CSV rows (kept in ``rows`` too) and a progress bar.

    Steps ``0, every, 2 every, ...`` are written, and any step passed with ``last=True`` (the final
    one, or the one that blew up). ``close()`` closes the files, which keep what was written.
    """

    def __init__(
        self, atoms: Atoms, out: str | None, log: str | None, log_every: int, traj_every: int,
        timestep: float, progress: bool, steps: int, ensemble: str, committee: bool = False,
    ) -> None:
        self.atoms, self.out, self.log = atoms, out, log
        self.log_every, self.traj_every, self.timestep = log_every, traj_every, timestep
        self.committee = committee
        self.rows: list[dict[str, float]] = []
        self.steps_done = 0
        self._conserved0: float | None = None
        self._writer = _TrajectoryWriter(out) if out is not None else None
        self._log_fh = self._log_csv = None
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(log, "w", newline="")  # noqa: SIM115 - closed by close()
            columns = list(LOG_COLUMNS) + (list(COMMITTEE_COLUMNS) if committee else [])
            self._log_csv = csv.DictWriter(self._log_fh, fieldnames=columns)
            self._log_csv.writeheader()
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, desc=f"MD {ensemble}", unit="step", dynamic_ncols=True)

    def record(self, s: _Sample, last: bool) -> None:
        self.steps_done = s.step
        if self._conserved0 is None:
            self._conserved0 = s.conserved
        if s.step % self.log_every == 0 or last:
            self._log_row(s)
        if self._writer is not None and (s.step % self.traj_every == 0 or last):
            self._writer.write(self.atoms)

    def _log_row(self, s: _Sample) -> None:
        drift = (s.conserved - self._conserved0) / max(len(self.atoms), 1)
        row = {
            "step": s.step, "time_fs": s.step * self.timestep, "temperature_K": s.temperature,
            "epot_eV": s.epot, "ekin_eV": s.ekin, "etot_eV": s.epot + s.ekin, "conserved_eV": s.conserved,
            "drift_eV_per_atom": drift, "volume_A3": s.volume, "max_force_eV_A": s.max_force,
        }
        if self.committee:
            row.update(energy_std_eV=s.energy_std, max_force_std_eV_A=s.max_force_std)
        self.rows.append(row)
        if self._log_csv is not None:
            self._log_csv.writerow(row)
            self._log_fh.flush()  # a run that dies keeps its log
        if self._bar is not None:
            spread = {"Fstd": f"{s.max_force_std:.2g}"} if self.committee else {}
            self._bar.set_postfix(T=f"{s.temperature:.0f}K", Epot=f"{s.epot:.3f}", drift=f"{drift:.1e}", **spread)

    def advance(self, step: int) -> None:
        if self._bar is not None and step > 0:
            self._bar.update(1)

    def result(self, stop_reason: str | None = None) -> MDResult:
        drift = max((abs(r["drift_eV_per_atom"]) for r in self.rows), default=0.0)
        return MDResult(atoms=self.atoms, steps=self.steps_done, trajectory=self.out, log=self.log,
                        rows=self.rows, max_abs_drift=drift, stop_reason=stop_reason)

    def close(self) -> None:
        for closable in (self._bar, self._writer, self._log_fh):
            if closable is not None:
                closable.close()


def run_md(
    atoms: Atoms,
    model: PotentialModel | str | list[PotentialModel | str] | None = None,
    *,
    calculator: MLIPCalculator | None = None,
    ensemble: str = "nve",
    thermostat: str = "nose-hoover",
    temperature: float = 300.0,
    steps: int = 1000,
    timestep: float = 1.0,
    out: str | None = "md.extxyz",
    log: str | None = None,
    log_every: int = 10,
    traj_every: int = 10,
    friction: float = 0.01,
    tdamp: float = 100.0,
    pressure: float = 0.0,
    pdamp: float = 1000.0,
    init_velocities: bool = True,
    max_temperature: float | None = None,
    max_force: float = 100.0,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    skin: float = 0.5,
    dispersion: str | None = None,
    max_force_std: float | None = None,
    max_memory_gb: float | None = None,
) -> MDResult:
    """Run MD on ``atoms`` (modified in place) and write trajectory and log as it goes.

    Args:
        atoms: starting structure. Velocities: kept if it already has momenta, otherwise drawn
            from Maxwell-Boltzmann at ``temperature`` (when ``init_velocities``), with the centre
            of mass at rest.
        model: model or model path (``.pt`` or exported ``.pt2``), or a list of them: a committee,
            whose mean drives the dynamics and whose spread is logged (ignored when ``calculator`` is given).
        calculator: an existing :class:`~mlip.calculator.MLIPCalculator`.
        ensemble: ``"nve"``, ``"nvt"`` or ``"npt"``.
        thermostat: for NVT, ``"nose-hoover"`` (chain of 3) or ``"langevin"``.
        temperature: target (NVT/NPT) or initial (NVE) temperature, K.
        steps: MD steps; timestep: fs.
        out: trajectory path (``.extxyz``/``.xyz`` or ``.traj``), ``None`` for none; a frame is
            written every ``traj_every`` steps (and at step 0).
        log: CSV log path (default: ``out`` with ``.log.csv``; none if both are ``None``); a row every
            ``log_every`` steps with :data:`LOG_COLUMNS`.
        friction: Langevin friction, 1/fs. tdamp, pdamp: Nose-Hoover/MTK time constants, fs.
        pressure: NPT external pressure, GPa.
        max_temperature: stop above this temperature, K (default ``max(10 T, 5000)``).
        max_force: stop when any force exceeds this, eV/Å (also on NaN/inf energy or forces).
        seed: random seed for the initial velocities and the Langevin noise.
        progress: show a tqdm progress bar.
        device, dtype, skin, dispersion: passed to the calculator built from ``model`` (``dispersion``:
            a functional name whose D3(BJ) correction is added, e.g. ``"pbe"``).
        max_memory_gb: the calculator's memory budget for one force call (GiB; ``None``: 80 % of the
            free memory); above it the edge work is chunked (:mod:`mlip.calculator.memory`).
        max_force_std: with a committee, stop cleanly (no error; ``MDResult.stop_reason`` says why,
            the trajectory ends with that step) when the largest per-atom force spread exceeds this, eV/Å.

    Returns:
        :class:`MDResult`.

    Raises:
        MDBlowUpError: the run left the bounds; the message says at which step and why, and
            the trajectory and log up to that step are kept.
    """
    ensemble = ensemble.lower()
    _check_options(atoms, ensemble, thermostat, steps, timestep, log_every, traj_every)
    if calculator is None:
        if model is None:
            raise ValueError("run_md() needs a model or a calculator")
        calculator = MLIPCalculator(model, device=device, dtype=dtype, skin=skin, dispersion=dispersion,
                                    max_memory_gb=max_memory_gb)
    committee = isinstance(calculator.model, Committee)
    if max_force_std is not None and not committee:
        raise ValueError("max_force_std needs a committee: pass several models (mlip md ... --committee m2.pt m3.pt)")
    atoms.calc = calculator
    if max_temperature is None:
        max_temperature = max(10.0 * temperature, 5000.0)
    if init_velocities and temperature > 0 and not np.any(atoms.get_momenta()):
        _draw_velocities(atoms, temperature, seed)
    dyn = _make_dynamics(atoms, ensemble, thermostat, temperature, timestep, friction, tdamp, pressure, pdamp, seed)
    if log is None and out is not None:
        log = str(Path(out).with_suffix("")) + ".log.csv"
    recorder = _Recorder(atoms, out, log, log_every, traj_every, timestep, progress, steps, ensemble, committee)
    stop_reason = None
    try:
        for _ in dyn.irun(steps):
            sample = _observe(atoms, dyn)
            reason = _blow_up_reason(sample, max_temperature, max_force)
            spread = _spread_reason(sample, max_force_std)
            recorder.record(sample, last=reason is not None or spread is not None or sample.step == steps)
            if reason is not None:
                where = f"; trajectory so far kept in {out}" if out is not None else ""
                raise MDBlowUpError(
                    f"MD stopped at step {sample.step} ({sample.step * timestep:g} fs): {reason}. The "
                    f"simulation blew up (try a smaller timestep, a lower temperature, or check the model){where}",
                    recorder.result(),
                )
            if spread is not None:
                where = f"; trajectory so far kept in {out}" if out is not None else ""
                stop_reason = f"MD stopped at step {sample.step} ({sample.step * timestep:g} fs): {spread}{where}"
                break
            recorder.advance(sample.step)
    finally:
        recorder.close()
    return recorder.result(stop_reason)
