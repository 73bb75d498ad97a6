"""Whole-model check of an accelerated kernel backend against the pure-PyTorch reference, on load and
on the first run on each ``(device, dtype)``.

Accelerated tensor-product paths in other libraries have shipped silently different energies.
:func:`check_backend` evaluates energy and forces of a small built-in periodic structure twice,
once with the model's backend and once with ``kernel="torch"`` (same weights), and raises
:class:`BackendMismatchError` beyond the dtype's tolerance. It is wired into the model's life
cycle twice: :func:`check_loaded` runs it when :func:`mlip.models.base.load_model` (hence
``mlip.load`` and ``MLIPCalculator``) restores a model whose backend runs where it was loaded, and
:func:`ensure_checked` runs it on the first forward on each ``(device, dtype)`` (a model moved to
a GPU or cast after loading), so no accelerated path computes an energy before it was compared.
It builds models, so it lives here; the op-level check that needs only the kernels is
:func:`mlip.kernels.op_check.check_ops`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mlip.data.graph import collate
from mlip.data.transforms import atoms_to_graph
from mlip.kernels import BackendUnavailableError, KernelBackend, select_backend
from mlip.kernels.op_check import BackendMismatchError
from mlip.models.base import build_model
from mlip.models.outputs import predict

__all__ = ["TOLERANCES", "BackendCheck", "BackendMismatchError", "builtin_structure", "check_backend",
           "check_loaded", "ensure_checked"]

#: (energy rtol, energy atol per atom eV, forces rtol, forces atol eV/Å) per dtype. float32: a few
#: hundred ulps of sums over ~20 neighbours and several layers; float64: well above round-off.
TOLERANCES: dict[torch.dtype, tuple[float, float, float, float]] = {
    torch.float64: (1e-10, 1e-9, 1e-8, 1e-8),
    torch.float32: (1e-5, 1e-4, 1e-4, 1e-4),
}


@dataclass
class BackendCheck:
    """Outcome of :func:`check_backend` (errors are absolute: eV and eV/Å)."""

    backend: str
    dtype: torch.dtype
    device: str
    n_atoms: int
    n_edges: int
    energy_error: float
    energy_tolerance: float
    forces_error: float
    forces_tolerance: float

    @property
    def ok(self) -> bool:
        return self.energy_error <= self.energy_tolerance and self.forces_error <= self.forces_tolerance


def builtin_structure(elements: list[int], r_max: float, seed: int = 0):
    """A small rattled periodic structure using up to four of ``elements``, ~20 neighbours per atom.

    Four atoms on an fcc basis in a cube of side ``0.9 r_max``, rattled by 5% of the side.

    Returns:
        ``ase.Atoms`` (periodic, with charge 0 and spin multiplicity 1 in ``info``).
    """
    from ase import Atoms

    if not elements:
        raise ValueError("check_backend: the model lists no elements")
    a = 0.9 * float(r_max)
    basis = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]) * a
    rng = np.random.default_rng(seed)
    pos = basis + rng.uniform(-0.05, 0.05, size=basis.shape) * a
    numbers = [int(elements[i % len(elements)]) for i in range(4)]
    atoms = Atoms(numbers=numbers, positions=pos, cell=np.eye(3) * a, pbc=True)
    atoms.info["charge"] = 0.0
    atoms.info["spin"] = 1.0
    atoms.info["source"] = "mlip.models.backend_check built-in structure"
    return atoms


def _rebuild(model: torch.nn.Module, kernel: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The same model (weights, train/eval mode) rebuilt with ``kernel`` on ``device`` in ``dtype``."""
    twin = build_model(model.family, dataclasses.replace(model.config, kernel=kernel))
    twin.load_state_dict(model.state_dict(), strict=True)
    twin.__dict__[_CHECKING] = True  # a throw-away twin: its forward must not start a check of its own
    return twin.to(device=device, dtype=dtype).train(model.training)


#: attributes kept in the model's ``__dict__`` (not in its state_dict): the ``(device, dtype)``
#: pairs already checked, and a flag set while a check evaluates the model (re-entrancy guard)
_CHECKED = "_mlip_backend_checked"
_CHECKING = "_mlip_backend_checking"


def check_backend(
    model: torch.nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    raise_on_mismatch: bool = True,
) -> BackendCheck | None:
    """Compare energy and forces of ``model``'s kernel backend with the torch reference.

    Args:
        model: a :class:`~mlip.models.base.PotentialModel` whose config has a ``kernel`` field.
        dtype: floating dtype of the comparison (default: the model's parameter dtype).
        device: where to run (default: the model's parameter device).
        raise_on_mismatch: raise :class:`BackendMismatchError` instead of returning a failed check.

    Returns:
        ``None`` when the model has no ``kernel`` field or its backend resolves to the reference
        (nothing to check); else a :class:`BackendCheck`.

    Raises:
        BackendMismatchError: energy or forces differ beyond :data:`TOLERANCES` of ``dtype``.
        BackendUnavailableError: the model names a backend that cannot run on ``device`` in ``dtype``.
        TypeError: ``dtype`` has no tolerance (the Triton kernels support float32 and float64).
    """
    kernel = getattr(getattr(model, "config", None), "kernel", None)
    p = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
    if kernel is None:
        return None
    backend = _select(model, kernel, device, dtype)
    if backend.is_reference:
        return None
    if dtype not in TOLERANCES:
        raise TypeError(f"check_backend: no tolerance for {dtype}; kernels support {sorted(map(str, TOLERANCES))}")
    heads = getattr(model.config, "heads", None)
    atoms = builtin_structure(list(model.elements), model.r_max)
    if heads:
        atoms.info["head"] = heads[0]
    batch = collate([atoms_to_graph(atoms, model.r_max)]).to(device=device, dtype=dtype)

    same = p is None or (p.device == device and p.dtype == dtype)
    model_dev = model if same else _rebuild(model, kernel, device, dtype)  # never cast the caller's model
    twin = _rebuild(model, "torch", device, dtype)
    was_checking = model.__dict__.get(_CHECKING, False)
    model.__dict__[_CHECKING] = True  # the model's forward (ensure_checked) must not re-enter this check
    try:
        fast = predict(model_dev, batch, forces=True)
        ref = predict(twin, batch, forces=True)
    finally:
        model.__dict__[_CHECKING] = was_checking
    e_rtol, e_atol, f_rtol, f_atol = TOLERANCES[dtype]
    e_ref = ref["energy"].detach()
    f_ref = ref["forces"].detach()
    e_err = float((fast["energy"].detach() - e_ref).abs().max())
    f_err = float((fast["forces"].detach() - f_ref).abs().max())
    e_tol = e_rtol * float(e_ref.abs().max()) + e_atol * batch.n_atoms
    f_tol = f_rtol * float(f_ref.abs().max()) + f_atol
    check = BackendCheck(backend.name, dtype, str(device), batch.n_atoms, batch.n_edges, e_err, e_tol, f_err, f_tol)
    if check.ok:
        model.__dict__.setdefault(_CHECKED, set()).add((_device_key(device), dtype))
    elif raise_on_mismatch:
        raise BackendMismatchError(
            f"kernel backend {backend.name!r} ({dtype}, {device}) disagrees with the torch reference on the built-in "
            f"{batch.n_atoms}-atom structure: |dE| = {e_err:.3e} eV (tolerance {e_tol:.1e}), "
            f"max |dF| = {f_err:.3e} eV/Å (tolerance {f_tol:.1e}). Refusing to run; use kernel='torch' "
            "and report this (GPU, driver, triton version)."
        )
    return check


def ensure_checked(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> BackendCheck | None:
    """:func:`check_backend` once per ``(device, dtype)`` of ``model``; a no-op afterwards.

    Called by the forward of a model whose resolved backend is not the reference
    (``EquivariantModel.kernel_backend``), so a model built, moved to a GPU or cast after loading is
    checked before its first result; after that it costs one set lookup per forward. Re-entrant: the evaluations inside the check do not start
    another check. Skipped while ``torch.compile`` traces (the eager first call has checked).

    Returns:
        The :class:`BackendCheck` when a check ran, else ``None`` (already checked, or nothing to check).

    Raises:
        BackendMismatchError: as :func:`check_backend`; the pair is then not marked as checked,
            so every later forward refuses again.
    """
    key = (_device_key(device), dtype)
    if key in model.__dict__.get(_CHECKED, ()) or model.__dict__.get(_CHECKING, False):
        return None
    if torch.compiler.is_compiling():
        return None
    return check_backend(model, dtype=dtype, device=device)


def _device_key(device: torch.device | str) -> str:
    """``"cuda"`` and ``"cuda:0"`` (the current device) are the same key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def check_loaded(model: torch.nn.Module, device: torch.device | str | None = None) -> BackendCheck | None:
    """The load-time check: :func:`ensure_checked` on ``device`` in the model's dtype.

    Args:
        model: a freshly loaded model (left where it is: the check evaluates a twin on ``device``).
        device: where the model is meant to run, e.g. ``load_model``'s ``map_location``
            (default: where its parameters are).

    Runs only when the model's ``kernel`` resolves to an accelerated backend
    (:func:`mlip.kernels.select_backend`). A ``kernel`` named explicitly that cannot run on
    ``device`` in the model's dtype (``triton`` loaded onto a CPU, or in float16) is refused here,
    with the reason, rather than at the first forward; ``auto`` falls back to the reference.

    Returns:
        The :class:`BackendCheck`, or ``None`` when nothing was checked.

    Raises:
        BackendUnavailableError: the explicitly named backend cannot run on ``device`` in the model's dtype.
        BackendMismatchError: the accelerated backend disagrees with the torch reference.
    """
    kernel = getattr(getattr(model, "config", None), "kernel", None)
    p = next(iter(model.parameters()), None)
    if kernel is None or p is None:
        return None
    device = torch.device(device) if device is not None else p.device
    try:
        backend = _select(model, kernel, device, p.dtype)
    except BackendUnavailableError as err:
        raise BackendUnavailableError(
            f"loading a model onto {device} in {p.dtype}: {err} (or load it onto a device where it runs, "
            "e.g. map_location='cuda')"
        ) from err
    if backend.is_reference:
        return None
    return ensure_checked(model, device, p.dtype)


def _select(model: torch.nn.Module, kernel: str, device: torch.device, dtype: torch.dtype) -> KernelBackend:
    """The backend ``model``'s ``kernel`` field resolves to on ``device`` in ``dtype`` (the model's own
    choice, :func:`mlip.kernels.select_backend`, for where the check runs, which may not be where it is)."""
    return select_backend(kernel, device, dtype, getattr(model.config, "lmax", None))
