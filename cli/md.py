"""``mlip md``: molecular dynamics of one structure with an mlip model (ASE integrators)."""
from __future__ import annotations

import click


@click.command("md")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@click.option("--ensemble", type=click.Choice(["nve", "nvt", "npt"], case_sensitive=False), default="nve",
              show_default=True, help="NVE: velocity Verlet; NVT: Nose-Hoover chain or Langevin; NPT: MTK.")
@click.option("--thermostat", type=click.Choice(["nose-hoover", "langevin"]), default="nose-hoover",
              show_default=True, help="Thermostat for --ensemble nvt.")
@click.option("--temperature", type=float, default=300.0, show_default=True,
              help="Target (NVT/NPT) or initial (NVE) temperature, K.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Number of MD steps.")
@click.option("--timestep", type=float, default=1.0, show_default=True, help="Time step, fs.")
@click.option("--pressure", type=float, default=0.0, show_default=True, help="NPT pressure, GPa.")
@click.option("--friction", type=float, default=0.01, show_default=True, help="Langevin friction, 1/fs.")
@click.option("--tdamp", type=float, default=100.0, show_default=True, help="Thermostat time constant, fs.")
@click.option("--pdamp", type=float, default=1000.0, show_default=True, help="Barostat time constant, fs.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default="md.extxyz", show_default=True,
              help="Trajectory: .extxyz/.xyz or ASE .traj. The CSV log goes next to it (<out>.log.csv).")
@click.option("--log", "log", type=click.Path(dir_okay=False), default=None, help="CSV log path.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Log every N steps.")
@click.option("--traj-every", type=int, default=10, show_default=True, help="Write a frame every N steps.")
@click.option("--index", type=int, default=-1, show_default=True, help="Frame of STRUCTURE to start from.")
@click.option("--max-temperature", type=float, default=None,
              help="Stop above this temperature, K [default: max(10 T, 5000)].")
@click.option("--max-force", type=float, default=100.0, show_default=True, help="Stop above this force, eV/Å.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for velocities and Langevin noise.")
@click.option("--skin", type=float, default=0.5, show_default=True, help="Neighbour-list skin, Å.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def md(model: str, structure: str, ensemble: str, thermostat: str, temperature: float, steps: int,
       timestep: float, pressure: float, friction: float, tdamp: float, pdamp: float, out: str, log: str | None,
       log_every: int, traj_every: int, index: int, max_temperature: float | None, max_force: float, seed: int,
       skin: float, device: str, dtype: str, progress: bool) -> None:
    """Run MD of STRUCTURE (any file ASE reads: extxyz, CIF, POSCAR, ...) with MODEL.

    Logs step, time, temperature, potential/kinetic/total energy, the conserved quantity and its
    drift per atom every --log-every steps. Stops with a clear message, keeping the trajectory
    written so far, if the temperature or a force leaves the bounds (the simulation blew up).

    Example:

        mlip md runs/quickstart/model.pt data/emt_crystals.xyz --ensemble nvt --temperature 600 \\
            --steps 2000 --timestep 2 --out runs/md/cu.extxyz
    """
    from ase.io import read

    from mlip.md.dynamics import MDBlowUpError, run_md

    try:
        atoms = read(structure, index=index)
    except Exception as err:
        raise click.ClickException(f"{structure}: cannot read a structure ({err})") from err
    try:
        result = run_md(
            atoms, model, ensemble=ensemble.lower(), thermostat=thermostat, temperature=temperature, steps=steps,
            timestep=timestep, out=out, log=log, log_every=log_every, traj_every=traj_every, friction=friction,
            tdamp=tdamp, pressure=pressure, pdamp=pdamp, max_temperature=max_temperature, max_force=max_force,
            seed=seed, progress=progress, device=device, dtype=dtype, skin=skin,
        )
    except MDBlowUpError as err:
        raise click.ClickException(str(err)) from err
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    last = result.rows[-1] if result.rows else None
    if last is not None:
        click.echo(
            f"done: {result.steps} steps, T={last['temperature_K']:.1f} K, Epot={last['epot_eV']:.6f} eV, "
            f"max |drift|={result.max_abs_drift:.2e} eV/atom"
        )
    click.echo(f"trajectory: {result.trajectory}; log: {result.log}")
