"""Shared pieces of the speed benchmarks: test structures, environment record, and worker processes
that let two codes living in different virtual environments be timed call by call, interleaved.

Every timed code runs in its own subprocess (``python -m benchmarks.speed --worker``), started with
one torch thread. The driver sends it one JSON command per line on stdin and reads one JSON answer
per line on stdout, so the driver can alternate single calls of mlip and of a peer (A B A B ...):
a change in machine load then hits both alike. Each answer carries the wall-clock and the *process
CPU time* of the call (``time.process_time``), which does not count time spent waiting for a core
on a shared machine, and the worker's peak resident memory so far (``ru_maxrss``).

This module needs only the standard library, numpy and ASE, so the MACE virtual environment (which
has no mlip) can import it too.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: the Python of the venv with mace-torch (it pins its own e3nn): $MACE_PYTHON, else ``venv-mace`` beside the checkout
MACE_PYTHON = os.environ.get("MACE_PYTHON") or str(ROOT.parent / "venv-mace" / "bin" / "python")
KT_300K = 300.0 * 8.617333262e-5  # eV


# ------------------------------------------------------------------------------------- structures
def molecule27():
    """A 27-atom organic cluster (9 C, 4 O, 14 H, atoms at least 1.1 Å apart in a 4.5 Å sphere).

    Deterministic (seeded); no cell and no periodicity.
    """
    import ase

    rng = np.random.default_rng(0)
    symbols = ["C"] * 9 + ["O"] * 4 + ["H"] * 14
    pos: list[np.ndarray] = []
    while len(pos) < len(symbols):
        p = rng.uniform(-4.5, 4.5, size=3)
        if np.linalg.norm(p) < 4.5 and all(np.linalg.norm(p - q) > 1.1 for q in pos):
            pos.append(p)
    return ase.Atoms(symbols, positions=np.array(pos))


def crystal(element: str, n_atoms: int):
    """A rattled (0.05 Å, seeded) supercell: diamond Si or fcc Cu, cubic (``8 k^3`` / ``4 k^3`` atoms)
    or else of the primitive cell (``2 m^3`` / ``m^3`` atoms, e.g. Cu-1000 = 10x10x10 primitive cells).

    Raises:
        ValueError: ``n_atoms`` is neither a cubic nor a primitive supercell.
    """
    from ase.build import bulk

    lattice = {"Si": ("diamond", 5.43, 8, 2), "Cu": ("fcc", 3.61, 4, 1)}
    if element not in lattice:
        raise ValueError(f"crystal: element must be one of {sorted(lattice)}, got {element!r}")
    kind, a, per_cubic, per_primitive = lattice[element]
    for cubic, per_cell in ((True, per_cubic), (False, per_primitive)):
        k = round((n_atoms / per_cell) ** (1 / 3))
        if per_cell * k**3 == n_atoms:
            atoms = bulk(element, kind, a=a, cubic=cubic).repeat(k)
            atoms.rattle(0.05, seed=1)
            return atoms
    sizes = ", ".join(str(per_cubic * j**3) for j in range(2, 15))
    raise ValueError(f"{element} crystal: {n_atoms} atoms is not {per_cubic} k^3 (try {sizes}) "
                     f"nor {per_primitive} m^3")


def make_structure(name: str):
    """Build a structure from its name: ``molecule-27``, ``Si-<n>`` (diamond) or ``Cu-<n>`` (fcc)."""
    if name == "molecule-27":
        return molecule27()
    element, _, n = name.partition("-")
    if not n.isdigit():
        raise ValueError(f"unknown structure {name!r}: use molecule-27, Si-<8k^3> or Cu-<4k^3>")
    return crystal(element, int(n))


def with_velocities(atoms, temperature_eV: float = KT_300K):
    """Give ``atoms`` seeded Maxwell-Boltzmann momenta at ``kT`` (eV), zero total momentum."""
    rng = np.random.default_rng(0)
    masses = atoms.get_masses()[:, None]
    p = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * temperature_eV)
    atoms.set_momenta(p - p.sum(0) / len(atoms) * 1.0)
    return atoms


def ase_edges(atoms, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ASE's neighbour list: receivers ``i``, senders ``j``, integer shifts ``S`` (``pos[j]-pos[i]+S@cell``)."""
    from ase.neighborlist import neighbor_list

    return neighbor_list("ijS", atoms, r_max)


# ------------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    """How this process was started, as a user would type it (``python -m benchmarks.x ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        prog = "python -m " + spec.name.removesuffix(".__main__")
    else:
        prog = "python " + sys.argv[0]
    return " ".join([prog] + sys.argv[1:])


def environment() -> dict[str, Any]:
    """Date, host, CPU, cores, load average, python and (if importable) torch version."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "command": command_line(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def describe(env: dict[str, Any]) -> str:
    """One line for a table caption."""
    la = env.get("load_average", [float("nan")] * 3)
    return (f"{env['cpu']}, {env['cores']} cores, torch {env.get('torch', '?')}, {env['date']}, "
            f"load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} (1/5/15 min)")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; cells are printed with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -------------------------------------------------------------------------------------- workers
def serve(handler) -> None:
    """Worker loop: read JSON commands from stdin, answer one JSON line each on the real stdout.

    ``handler(command: dict) -> dict`` does the work; stdout is redirected to stderr while it runs
    so that library prints cannot corrupt the answers. An exception is sent back as ``{"error": ...}``.
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("cmd") == "quit":
            break
        try:
            answer = handler(command)
        except Exception as exc:  # noqa: BLE001 (sent to the driver, which raises with the worker's message)
            import traceback

            answer = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")


def timed(fn, n: int = 1) -> dict[str, float]:
    """Run ``fn()`` ``n`` times; wall-clock and process CPU seconds of the whole, and peak RSS."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "rss_mb": peak_rss_mb()}


class Worker:
    """Driver side of one worker subprocess (``python -m <module> --worker``).

    Args:
        spec: what to build (``{"kind": "mlip" | "mace" | "e3nn", ...}``), sent as the first command.
        python: interpreter of the worker (the MACE venv for ``kind="mace"``).
        threads: torch intra-op threads in the worker (also OMP/MKL/OpenBLAS thread variables).
        module: the benchmark module whose ``--worker`` mode serves the commands (its handler
            knows the spec kinds and tasks).
    """

    def __init__(self, spec: dict[str, Any], python: str | None = None, threads: int = 1,
                 module: str = "benchmarks.speed") -> None:
        self.spec = spec
        env = dict(os.environ)
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
        env["PYTHONWARNINGS"] = "ignore"
        self.proc = subprocess.Popen(
            [python or sys.executable, "-m", module, "--worker"], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        # the setup answer is read on first use of ``info``: workers started together build in parallel
        self._send({"cmd": "setup", "spec": spec, "threads": threads})
        self._info: dict[str, Any] | None = None

    @property
    def info(self) -> dict[str, Any]:
        """The setup answer: ``params`` (parameter count), ``torch`` version, ``rss_mb`` after building."""
        if self._info is None:
            self._info = self._receive({"cmd": "setup"})
        return self._info

    def _send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        self.info  # noqa: B018 (the setup answer comes first)
        self._send(command)
        return self._receive(command)

    def _receive(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec} died (exit code {self.proc.wait()}); see its stderr above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker {self.spec} failed on {command}: {answer['error']}\n{answer['traceback']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def write_json(path: str | Path, obj: Any) -> None:
    """Write a benchmark's results as JSON (indent 1), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
