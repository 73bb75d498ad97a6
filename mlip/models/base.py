"""The contract every potential family implements, the ``MODELS`` registry, and save/load.

A family is a ``torch.nn.Module`` subclass of :class:`PotentialModel` built from one
config dataclass. Models map a batch plus edge vectors to per-atom energies; forces,
stress and virial are derived in :mod:`mlip.models.outputs` only, so every family
shares that code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch

from mlip.atomic import atomic_path
from mlip.data.graph import GraphBatch
from mlip.nn.readout import bond_count
from mlip.nn.repulsion import zbl_atom_energy

#: family name -> model class (each class has a ``Config`` dataclass attribute)
MODELS: dict[str, type["PotentialModel"]] = {}


def register(name: str) -> Callable[[type["PotentialModel"]], type["PotentialModel"]]:
    """Class decorator: ``@register("equivariant")`` adds a family to :data:`MODELS`."""

    def deco(cls: type["PotentialModel"]) -> type["PotentialModel"]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model family {name!r} registered twice")
        cls.family = name
        MODELS[name] = cls
        return cls

    return deco


class PotentialModel(torch.nn.Module):
    """Base class of all potential families.

    Subclasses define ``Config`` (a dataclass with at least ``r_max`` and ``elements``)
    and ``forward(batch, edge_vec) -> {"node_energy": [n_atoms], "energy": [n_graphs]}``
    in eV, where ``edge_vec`` is ``[n_edges, 3]`` in Å (see ``GraphBatch.edge_vectors``).
    Energies include the per-element reference energies E0.
    """

    family: str = ""
    Config: type = object

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def r_max(self) -> float:
        return float(self.config.r_max)

    @property
    def elements(self) -> list[int]:
        return list(self.config.elements)

    def check_batch(self, batch: GraphBatch) -> None:
        """Raise a clear error for elements outside ``config.elements``."""
        known = torch.tensor(self.elements, device=batch.numbers.device)
        unknown = batch.numbers[~torch.isin(batch.numbers, known)]
        if unknown.numel():
            from ase.data import chemical_symbols

            names = sorted({chemical_symbols[int(z)] for z in unknown.unique()})
            allowed = [chemical_symbols[z] for z in self.elements]
            raise ValueError(f"model was not trained on element(s) {names}; it knows {allowed}")

    def finish_node_energy(self, learned: torch.Tensor, element: torch.Tensor, atom_head: torch.Tensor,
                           batch: GraphBatch, r: torch.Tensor, envelope: torch.Tensor) -> torch.Tensor:
        """Each atom's energy (eV) from the network's per-atom output: the family's ``atomic_energies``
        (scale, the shift weighted by the smooth bond count, E0) plus, with ``config.pair_repulsion``,
        the atom's share of the ZBL pair energies (:mod:`mlip.nn.repulsion`).

        Shapes: learned, element, atom_head [n_atoms]; r, envelope [n_edges] (the model's cutoff
        envelope) -> [n_atoms].
        """
        sender, receiver = batch.edge_index[0], batch.edge_index[1]
        z_sender, z_receiver = batch.numbers[sender], batch.numbers[receiver]
        coordination = bond_count(r, envelope, z_sender, z_receiver, receiver, batch.n_atoms)
        node_energy = self.atomic_energies(learned, element, atom_head, coordination)
        if self.config.pair_repulsion:
            node_energy = node_energy + zbl_atom_energy(r, z_sender, z_receiver, receiver, batch.n_atoms)
        return node_energy

    def forward(self, batch: GraphBatch, edge_vec: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass (model or training config, nested dataclasses included) or mapping as a plain dict."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass, rejecting unknown keys with the nearest valid name."""
    import difflib

    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise KeyError(f"unknown model config key {key!r}{hint}")
    return cls(**data)


def build_model(family: str, config: dict[str, Any] | Any) -> PotentialModel:
    """Build a model of ``family`` from a config dict or dataclass."""
    cls = model_class(family)
    cfg = config_from_dict(cls.Config, dict(config)) if isinstance(config, dict) else config
    return cls(cfg)


def model_class(family: str) -> type[PotentialModel]:
    """The class registered for ``family`` (the built-in families are imported on first use).

    Raises:
        KeyError: an unknown family, naming the nearest known one.
    """
    if family not in MODELS:
        _import_families()
    if family not in MODELS:
        import difflib

        near = difflib.get_close_matches(str(family), sorted(MODELS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise KeyError(f"unknown model family {family!r}{hint} (known: {sorted(MODELS)})")
    return MODELS[family]


def config_fields(family: str) -> list[str]:
    """The field names of ``family``'s ``Config`` dataclass."""
    return [f.name for f in dataclasses.fields(model_class(family).Config)]


def _import_families() -> None:
    """Import the family modules so their ``@register`` runs."""
    import importlib

    for mod in ("mlip.models.equivariant", "mlip.models.frame_averaged", "mlip.models.learned_equivariance"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draw a model's initial weights from ``torch.manual_seed(seed)`` without touching the global
    RNG state (``torch.random.fork_rng``); ``None``: use the global RNG as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        yield


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``:
    a killed process never leaves a truncated file at ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_model(model: PotentialModel, path: str | os.PathLike) -> None:
    """Write one file holding family, config, weights, cutoff, elements and mlip version."""
    from mlip import __version__

    payload = {
        "family": model.family,
        "config": config_to_dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "r_max": model.r_max,
        "elements": model.elements,
        "mlip_version": __version__,
    }
    atomic_torch_save(payload, path)


def load_torch_file(
    path: str | os.PathLike,
    what: str,
    required: tuple[str, ...],
    map_location: str | torch.device = "cpu",
    missing: str | None = None,
) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of an mlip file (``what``: "model file", "training
    checkpoint"), with errors naming the file: ``FileNotFoundError(missing)`` if absent,
    ``ValueError`` if unreadable or lacking a ``required`` key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing or f"no {what} at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: not a readable mlip {what} ({err})") from err
    for key in required:
        if key not in payload:
            raise ValueError(f"{path}: {what} lacks {key!r}")
    return payload


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> PotentialModel:
    """Restore a model written by :func:`save_model` (``weights_only=True``, ``strict=True``).

    A model whose kernel backend is accelerated where it would run (``map_location``) is first
    compared with the torch reference (:func:`mlip.models.backend_check.check_loaded`); a mismatch
    raises :class:`~mlip.models.backend_check.BackendMismatchError`.
    """
    payload = load_torch_file(path, "model file", ("family", "config", "state_dict"), map_location,
                              missing=f"no model file at {path}")
    config = dict(payload["config"])
    # files written before these options keep what they were trained with (the constant shift, no gates)
    for key in ("shift_by_coordination", "edge_gates"):
        if key in config_fields(payload["family"]):
            config.setdefault(key, False)
    model = build_model(payload["family"], config)
    floats = [v for v in payload["state_dict"].values() if v.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    # cast before loading: loading float64 weights into float32 parameters would round them
    model = model.to(dtype=dtype)
    model.load_state_dict(payload["state_dict"], strict=True)
    model = model.eval()
    # an accelerated kernel backend that would run on map_location is compared with the torch
    # reference now, and a mismatch refuses the model; kernel "torch"/CPU returns at once
    # (imported here: backend_check builds models through this module)
    from mlip.models.backend_check import check_loaded

    check_loaded(model, map_location if isinstance(map_location, (str, torch.device)) else None)
    return model
