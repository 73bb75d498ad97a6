"""Test-only potential families: a learnable pair potential with per-element, per-head E0s.

``toy-pair`` is exactly rotation-invariant by construction; ``toy-anisotropic`` adds a term
that depends on the direction of each bond (its ``anisotropy`` sets how much), so its measured
rotation-equivariance error is nonzero. Both follow the PotentialModel contract, so the
training loop treats them like any family. Importing this module registers them.

Run as a script, it is the ``mlip`` command line with these families registered (used by
the subprocess and ``torchrun`` tests): ``python tests/toy_models.py train cfg.yaml``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from mlip.data.graph import GraphBatch
from mlip.models.base import MODELS, PotentialModel, register


@dataclass
class ToyPairConfig:
    r_max: float = 3.0
    elements: list = field(default_factory=list)
    heads: list = field(default_factory=lambda: ["default"])
    e0s: dict | None = None
    avg_num_neighbors: float | None = None
    num_basis: int = 4
    anisotropy: float = 0.0
    shift: float = 0.0
    scale: float = 1.0
    seed: int = 0


class ToyPair(PotentialModel):
    """``E = Σ_i (E0[head, Z_i] + shift) + scale · ½ Σ_edges Σ_k c_k(Z_s, Z_r) exp(-β_k (r - r0)) f_cut(r)``.

    Shapes: edge_vec [n_edges, 3] Å -> node_energy [n_atoms], energy [n_graphs] eV.
    """

    Config = ToyPairConfig
    exactly_equivariant = True

    def __init__(self, config: ToyPairConfig) -> None:
        super().__init__(config)
        if not config.elements:
            raise ValueError("toy-pair needs elements")
        n = len(config.elements)
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(config.elements)] = torch.arange(n)
        self.register_buffer("z_index", table)
        e0 = torch.zeros(len(config.heads), n, dtype=torch.float64)
        if config.e0s:
            per_head = config.e0s if len(config.heads) > 1 else {config.heads[0]: config.e0s}
            for h, tab in per_head.items():
                for z, v in tab.items():
                    if int(z) in config.elements:
                        e0[config.heads.index(h), config.elements.index(int(z))] = float(v)
        self.register_buffer("e0", e0)
        gen = torch.Generator().manual_seed(config.seed)
        self.coeff = torch.nn.Parameter(0.1 * torch.randn(config.num_basis, n, n, generator=gen))
        self.log_beta = torch.nn.Parameter(torch.linspace(0.0, 1.0, config.num_basis))
        self.direction = torch.nn.Parameter(torch.ones(3) * config.anisotropy, requires_grad=config.anisotropy != 0)

    def forward(self, batch: GraphBatch, edge_vec: torch.Tensor) -> dict[str, torch.Tensor]:
        if os.environ.get("MLIP_TOY_STEP_SLEEP"):  # lets a test kill a training process mid-run
            time.sleep(float(os.environ["MLIP_TOY_STEP_SLEEP"]))
        sender, receiver = batch.edge_index
        r = edge_vec.norm(dim=-1)  # [n_edges]
        fcut = 0.5 * (torch.cos(math.pi * r / self.r_max) + 1.0) * (r < self.r_max)
        z = self.z_index[batch.numbers]
        c = 0.5 * (self.coeff + self.coeff.transpose(1, 2))
        basis = torch.exp(-self.log_beta.exp()[:, None] * (r[None, :] - 0.8 * self.r_max))  # [num_basis, n_edges]
        pair = (c[:, z[sender], z[receiver]] * basis).sum(0) * fcut
        if self.config.anisotropy:
            pair = pair + (edge_vec @ self.direction.to(edge_vec.dtype)) ** 2 * fcut * 0.01
        node = torch.zeros_like(batch.positions[:, 0]).index_add(0, receiver, 0.5 * pair)
        node = self.config.scale * node + self.config.shift
        heads = self.config.heads
        head_idx = torch.tensor([heads.index(h) if h in heads else 0 for h in batch.head], device=z.device)
        node = node + self.e0.to(node.dtype)[head_idx[batch.batch], z]
        energy = torch.zeros(batch.n_graphs, dtype=node.dtype, device=node.device).index_add(0, batch.batch, node)
        return {"node_energy": node, "energy": energy}


if "toy-pair" not in MODELS:
    ToyPair = register("toy-pair")(ToyPair)


class ToyAnisotropic(ToyPair):
    """The toy pair potential plus a bond-direction term: not rotation-invariant."""

    exactly_equivariant = False


if "toy-anisotropic" not in MODELS:
    ToyAnisotropic = register("toy-anisotropic")(ToyAnisotropic)


def graph_from_atoms(atoms, r_max: float):  # noqa: ANN001, ANN201 - test helper
    """AtomGraph of ``atoms`` via ASE's neighbour list (labels from info/arrays if present)."""
    import numpy as np
    from ase.neighborlist import neighbor_list

    from mlip.data.graph import AtomGraph

    i, j, shifts = neighbor_list("ijS", atoms, r_max)
    info = atoms.info
    kw = {}
    if "energy" in info:
        kw["energy"] = torch.tensor(float(info["energy"]), dtype=torch.float64)
    if "forces" in atoms.arrays:
        kw["forces"] = torch.tensor(atoms.arrays["forces"], dtype=torch.float64)
    if "stress" in info:
        kw["stress"] = torch.tensor(np.asarray(info["stress"]).reshape(3, 3), dtype=torch.float64)
    return AtomGraph(
        positions=torch.tensor(atoms.positions, dtype=torch.float64),
        numbers=torch.tensor(atoms.numbers, dtype=torch.long),
        cell=torch.tensor(np.asarray(atoms.cell), dtype=torch.float64),
        pbc=torch.tensor(atoms.pbc),
        edge_index=torch.tensor(np.stack([j, i]), dtype=torch.long),
        unit_shifts=torch.tensor(shifts, dtype=torch.long),
        head=str(info.get("head", "default")), **kw,
    )


def write_emt_data(path, n: int = 16, seed: int = 0, isolated: bool = True, head: str | None = None) -> list:  # noqa: ANN001
    """Small labelled Cu/Ag crystals (EMT energy, forces, stress) plus isolated atoms, as extxyz."""
    import numpy as np
    from ase import Atoms
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io import write

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 + 0.1 * rng.random(), cubic=True)
        if k % 2:
            atoms = atoms.repeat((2, 1, 1))
        atoms.numbers[rng.random(len(atoms)) < 0.4] = 47
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        frames.append(atoms)
    if isolated:
        frames += [Atoms(sym, positions=[[0, 0, 0]], cell=[10, 10, 10], pbc=False) for sym in ("Cu", "Ag")]
    out = []
    for atoms in frames:
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        s = atoms.get_stress(voigt=False) if atoms.pbc.all() else None
        atoms.calc = None
        atoms.info["energy"] = e
        atoms.arrays["forces"] = f
        if s is not None:
            atoms.info["stress"] = s
        if head is not None:
            atoms.info["head"] = head
        out.append(atoms)
    write(path, out, format="extxyz")
    return out


# --------------------------------------------------------------------------------------------
# test-morse: a smooth Morse pair potential for the calculator, MD and relaxation tests (any
# smooth conservative model is valid for those physics checks)
# --------------------------------------------------------------------------------------------
@dataclass
class MorseConfig:
    r_max: float = 4.0
    elements: list = field(default_factory=lambda: [29])
    depth: float = 0.34  # eV (Girifalco-Weizer copper)
    alpha: float = 1.36  # 1/Å
    r0: float = 2.87  # Å
    use_charge_spin: bool = False
    heads: list = field(default_factory=lambda: ["default"])


class MorsePair(PotentialModel):
    """``E = Σ_i E0(Z_i) + ½ Σ_edges D_ij [(1 - e^{-α_ij (r - r0_ij)})² - 1] (1 - (r/r_max)²)³``.

    The cutoff factor has zero value, slope and curvature at ``r_max``: a smooth, conservative
    potential. With ``use_charge_spin`` the energy gains ``0.3 Q² + 0.1 (S - 1)`` per structure.
    Shapes: edge_vec [n_edges, 3] Å -> node_energy [n_atoms], energy [n_graphs] eV.
    """

    Config = MorseConfig

    def __init__(self, config: MorseConfig) -> None:
        super().__init__(config)
        n = len(config.elements)
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(config.elements)] = torch.arange(n)
        self.register_buffer("z_index", table)
        self.log_depth = torch.nn.Parameter(torch.full((n, n), math.log(config.depth), dtype=torch.float64))
        self.log_alpha = torch.nn.Parameter(torch.full((n, n), math.log(config.alpha), dtype=torch.float64))
        self.r0 = torch.nn.Parameter(torch.full((n, n), config.r0, dtype=torch.float64))
        self.e0 = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, batch: GraphBatch, edge_vec: torch.Tensor) -> dict[str, torch.Tensor]:
        sender, receiver = batch.edge_index
        r = edge_vec.norm(dim=-1)  # [n_edges]
        x = (r / self.r_max).clamp(max=1.0)
        fcut = (1.0 - x * x) ** 3
        z = self.z_index[batch.numbers]
        zs, zr = z[sender], z[receiver]
        sym = lambda p: 0.5 * (p + p.T)
        depth, alpha, r0 = sym(self.log_depth).exp(), sym(self.log_alpha).exp(), sym(self.r0)
        morse = depth[zs, zr] * ((1.0 - torch.exp(-alpha[zs, zr] * (r - r0[zs, zr]))) ** 2 - 1.0)
        pair = morse * fcut  # [n_edges]
        node = torch.zeros_like(batch.positions[:, 0]).index_add(0, receiver, 0.5 * pair) + self.e0[z]
        energy = torch.zeros(batch.n_graphs, dtype=node.dtype, device=node.device).index_add(0, batch.batch, node)
        if self.config.use_charge_spin:
            if not bool(torch.isfinite(batch.charge).all() & torch.isfinite(batch.spin).all()):
                raise ValueError("test-morse with use_charge_spin needs charge and spin")
            energy = energy + 0.3 * batch.charge**2 + 0.1 * (batch.spin - 1.0)
        return {"node_energy": node, "energy": energy}


if "test-morse" not in MODELS:
    MorsePair = register("test-morse")(MorsePair)
else:  # imported again under another module name (e.g. as a script): use the registered class
    MorsePair = MODELS["test-morse"]


def morse_model(**kw: object) -> PotentialModel:
    """A ``test-morse`` model (float64 weights); keyword arguments override :class:`MorseConfig`."""
    return MorsePair(MorseConfig(**kw))


def morse_pair_energy(r: float, config: MorseConfig | None = None) -> float:
    """One pair's energy (eV) at distance ``r`` (Å) in plain float64 math, independent of mlip's code."""
    c = config or MorseConfig()
    if r >= c.r_max:
        return 0.0
    return c.depth * ((1.0 - math.exp(-c.alpha * (r - c.r0))) ** 2 - 1.0) * (1.0 - (r / c.r_max) ** 2) ** 3


def rattled_cu(repeat: tuple[int, int, int] = (2, 2, 2), a: float = 3.61, rattle: float = 0.05, seed: int = 0,
               triclinic: bool = False):
    """Cubic fcc Cu, repeated, optionally sheared (triclinic), atoms rattled by ``rattle`` Å."""
    import numpy as np
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
    if triclinic:
        cell = np.asarray(atoms.cell) @ np.array([[1.0, 0.05, 0.02], [0.0, 0.97, -0.04], [0.03, 0.0, 1.02]])
        atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


def calc64(model: PotentialModel | None = None, **kw: object):
    """A float64 CPU :class:`~mlip.calculator.MLIPCalculator` (default model: ``morse_model()``)."""
    from mlip.calculator import MLIPCalculator

    return MLIPCalculator(model if model is not None else morse_model(), device="cpu", dtype="float64", **kw)


def fit_small_equivariant(data_path, steps: int = 40) -> tuple[PotentialModel, list[float]]:
    """A small equivariant model fitted for a few seconds to the small Cu crystals of ``data_path``.

    ``steps`` full-batch Adam steps on energy-per-atom and force errors: far from converged, but a
    smooth potential with EMT-like forces, which is what energy-conservation and example tests need.
    Returns the model (float64, eval mode) and the force RMSE per step.
    """
    from mlip.data.formats import read as read_data
    from mlip.data.graph import collate
    from mlip.data.transforms import atoms_to_graph
    from mlip.models.base import build_model
    from mlip.models.outputs import predict

    with torch.random.fork_rng():
        torch.manual_seed(0)
        frames = [a for a in read_data(data_path) if set(a.get_chemical_symbols()) == {"Cu"} and a.pbc.all()
                  and len(a) <= 8]
        assert len(frames) >= 8, f"{data_path} should hold small Cu crystals"
        r_max = 4.0
        batch = collate([atoms_to_graph(a, r_max) for a in frames])
        n_per = torch.bincount(batch.batch).to(torch.float64)
        config = {
            "elements": [29], "r_max": r_max, "num_channels": 8, "lmax": 1, "num_layers": 1, "correlation": 2,
            "avg_num_neighbors": batch.n_edges / batch.n_atoms, "scale": float(batch.forces.pow(2).mean().sqrt()),
            "e0s": {29: float((batch.energy / n_per).mean())},
        }
        model = build_model("equivariant", config).double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        force_rmse = []
        for _ in range(steps):
            out = predict(model, batch, create_graph=True)
            loss_e = (((out["energy"] - batch.energy) / n_per) ** 2).mean()
            loss_f = ((out["forces"] - batch.forces) ** 2).mean()
            opt.zero_grad()
            (10.0 * loss_e + loss_f).backward()
            opt.step()
            force_rmse.append(float(loss_f.detach().sqrt()))
    return model.eval(), force_rmse


if __name__ == "__main__":
    from mlip.cli.main import main

    main()
