"""``mlip md``: molecular dynamics of one structure with an mlip model (ASE integrators)."""
from __future__ import annotations

import click


class _Greedy(click.Option):
    """A repeatable option that also takes several values after one flag: ``--committee a.pt b.pt``
    (click options take a fixed number of values; the extra ones are taken from the parser's
    remaining arguments up to the next option)."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            opt = getattr(parser, "_long_opt", {}).get(name)
            if opt is None:  # another click parser: plain repeated --committee A --committee B still works
                continue
            store = opt.process

            def process(value, state, store=store):
                store(value, state)
                while state.rargs and not state.rargs[0].startswith("-"):
                    store(state.rargs.pop(0), state)

            opt.process = process


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
@click.option("--max-memory-gb", type=float, default=None,
              help="Memory budget of one force call, GiB (default: 80 % of the free memory); above it the "
                   "edge work is chunked (same results).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--dispersion", default=None, metavar="FUNCTIONAL",
              help="Add D3(BJ) dispersion with this functional's parameters, e.g. pbe (needs mlip[d3]).")
@click.option("--committee", "committee", cls=_Greedy, multiple=True, metavar="MODEL...",
              type=click.Path(exists=True, dir_okay=False),
              help="More models of a committee with MODEL: the mean drives MD, the spread is logged.")
@click.option("--max-force-std", type=float, default=None,
              help="With --committee: stop cleanly when the largest per-atom force spread exceeds this, eV/Å.")
def md(model: str, structure: str, ensemble: str, thermostat: str, temperature: float, steps: int,
       timestep: float, pressure: float, friction: float, tdamp: float, pdamp: float, out: str, log: str | None,
       log_every: int, traj_every: int, index: int, max_temperature: float | None, max_force: float, seed: int,
       skin: float, device: str, dtype: str, progress: bool, dispersion: str | None, committee: tuple[str, ...],
       max_force_std: float | None, max_memory_gb: float | None) -> None:
    """Run MD of STRUCTURE (any file ASE reads: extxyz, CIF, POSCAR, ...) with MODEL.

    Logs step, time, temperature, potential/kinetic/total energy, the conserved quantity and its
    drift per atom every --log-every steps. Stops with a clear message, keeping the trajectory
    written so far, if the temperature or a force leaves the bounds (the simulation blew up).
    MODEL may be a model.pt or an exported model.pt2. With --committee the run also logs the
    members' energy and force spread, and --max-force-std ends it cleanly (exit code 0, trajectory
    kept) at the first step where the force spread exceeds the bound: a structure to label.

    Example:

        mlip md runs/quickstart/model.pt data/emt_crystals.xyz --ensemble nvt --temperature 600 \\
            --steps 2000 --timestep 2 --out runs/md/cu.extxyz

        mlip md m1.pt cu.cif --committee m2.pt m3.pt --max-force-std 0.2 --dispersion pbe
    """
    from ase.io import read

    from mlip.md.dynamics import MDBlowUpError, run_md

    try:
        atoms = read(structure, index=index)
    except Exception as err:
        raise click.ClickException(f"{structure}: cannot read a structure ({err})") from err
    if max_force_std is not None and not committee:
        raise click.UsageError("--max-force-std needs --committee (two or more models)")
    models = [model, *committee] if committee else model
    try:
        result = run_md(
            atoms, models, ensemble=ensemble.lower(), thermostat=thermostat, temperature=temperature, steps=steps,
            timestep=timestep, out=out, log=log, log_every=log_every, traj_every=traj_every, friction=friction,
            tdamp=tdamp, pressure=pressure, pdamp=pdamp, max_temperature=max_temperature, max_force=max_force,
            seed=seed, progress=progress, device=device, dtype=dtype, skin=skin, dispersion=dispersion,
            max_force_std=max_force_std, max_memory_gb=max_memory_gb,
        )
    except MDBlowUpError as err:
        raise click.ClickException(str(err)) from err
    except (ValueError, FileNotFoundError, ImportError, MemoryError) as err:
        raise click.ClickException(str(err)) from err
    if result.stop_reason is not None:
        click.echo(result.stop_reason)
    last = result.rows[-1] if result.rows else None
    if last is not None:
        click.echo(
            f"done: {result.steps} steps, T={last['temperature_K']:.1f} K, Epot={last['epot_eV']:.6f} eV, "
            f"max |drift|={result.max_abs_drift:.2e} eV/atom"
        )
    click.echo(f"trajectory: {result.trajectory}; log: {result.log}")
