"""Neighbour lists behind one signature: our own O(N) cell list in torch, or ASE / vesin / matscipy.

Every backend returns the same edges in the same order: ``edge_index = (sender, receiver)`` and
integer ``unit_shifts`` with ``edge_vec = pos[sender] - pos[receiver] + unit_shifts @ cell`` and
``|edge_vec| < r_max`` (strict, like ASE). This is ASE's ``primitive_neighbor_list('ijS')`` with
``i = receiver`` and ``j = sender``: an atom is never its own neighbour with a zero shift, but its
periodic images are kept. Edges are sorted by receiver, then sender, then shift (lexicographic).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BACKENDS", "available_backends", "batch_neighbor_list", "neighbor_list"]

#: relative slack on the bin width, so that rounding in the wrapped fractional coordinates can
#: never push a pair within ``r_max`` two bins apart (the exact distance test comes afterwards).
_BIN_SLACK = 1e-6
#: periodic cells whose perpendicular height is below this (Å) are treated as singular.
_MIN_HEIGHT = 1e-8
#: refuse more periodic images than this per structure (a degenerate cell, not a physical one).
_MAX_OFFSETS = 1_000_000


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
def _check_inputs(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, r_max: float) -> None:
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [n_atoms, 3], got {tuple(positions.shape)}")
    if tuple(cell.shape) != (3, 3):
        raise ValueError(f"cell must have shape [3, 3], got {tuple(cell.shape)}")
    if tuple(pbc.shape) != (3,):
        raise ValueError(f"pbc must have shape [3], got {tuple(pbc.shape)}")
    if not (isinstance(r_max, (int, float)) and math.isfinite(r_max) and r_max > 0):
        raise ValueError(f"r_max must be a finite positive number, got {r_max!r}")
    if positions.numel() and not bool(torch.isfinite(positions).all()):
        raise ValueError("positions contain NaN or inf")
    if not bool(torch.isfinite(cell[pbc.to(device=cell.device, dtype=torch.bool)]).all()):
        raise ValueError("cell vectors along periodic directions contain NaN or inf")


def _sort_edges(
    receiver: torch.Tensor, sender: torch.Tensor, shifts: torch.Tensor, n_atoms: int
) -> torch.Tensor:
    """Permutation that orders edges by (receiver, sender, shift_x, shift_y, shift_z).

    Shapes: receiver, sender [n_edges]; shifts [n_edges, 3]; returns [n_edges].
    """
    if receiver.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=receiver.device)
    r0 = receiver.min()
    smin = shifts.min(dim=0).values
    span = (shifts.max(dim=0).values - smin + 1).tolist()
    r_span = int(receiver.max() - r0) + 1
    if float(r_span) * n_atoms * span[0] * span[1] * span[2] < 2.0**62:
        s = shifts - smin
        key = ((receiver - r0) * n_atoms + sender) * span[0] + s[:, 0]
        key = (key * span[1] + s[:, 1]) * span[2] + s[:, 2]
        return torch.sort(key).indices  # keys are unique: the order is deterministic
    # rare fallback (huge shift ranges): successive stable sorts, least significant key first
    perm = torch.arange(receiver.numel(), device=receiver.device)
    for col in (shifts[:, 2], shifts[:, 1], shifts[:, 0], sender, receiver):
        perm = perm[torch.sort(col[perm], stable=True).indices]
    return perm


def _finish(
    receiver: torch.Tensor, sender: torch.Tensor, shifts: torch.Tensor, n_atoms: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    receiver = receiver.to(device=device, dtype=torch.long)
    sender = sender.to(device=device, dtype=torch.long)
    shifts = shifts.to(device=device, dtype=torch.long).reshape(-1, 3)
    perm = _sort_edges(receiver, sender, shifts, n_atoms)
    return torch.stack([sender[perm], receiver[perm]]), shifts[perm]


def _working_cell(cell: torch.Tensor, pbc: list[bool]) -> torch.Tensor:
    """The periodic cell vectors completed to a basis by unit vectors orthogonal to them.

    Only the periodic rows of ``cell`` matter to the neighbour list; a non-periodic row may be zero
    or anything else. Replacing it by a unit normal makes the fractional coordinate along that
    direction a plain distance in Å, so the same binning code serves every pbc combination.

    Shapes: cell [3, 3] float64; returns [3, 3] float64.
    """
    per = [k for k in range(3) if pbc[k]]
    non = [k for k in range(3) if not pbc[k]]
    w = cell.clone()
    dev = cell.device
    eye = torch.eye(3, dtype=cell.dtype, device=dev)
    if len(per) == 3:
        vol = torch.linalg.det(w).abs()
        if not float(vol) > 0:
            raise ValueError("cell is singular (zero volume) although pbc is True in all directions")
    elif len(per) == 2:
        n = torch.linalg.cross(w[per[0]], w[per[1]])
        area = torch.linalg.norm(n)
        if not float(area) > 0:
            raise ValueError(f"periodic cell vectors {per} are parallel or zero (zero area)")
        w[non[0]] = n / area
    elif len(per) == 1:
        a = w[per[0]]
        length = torch.linalg.norm(a)
        if not float(length) > 0:
            raise ValueError(f"periodic cell vector {per[0]} has zero length")
        a_hat = a / length
        e = eye[int(torch.argmin(a_hat.abs()))]  # the axis least aligned with a: well conditioned
        v1 = e - (e @ a_hat) * a_hat
        v1 = v1 / torch.linalg.norm(v1)
        w[non[0]] = v1
        w[non[1]] = torch.linalg.cross(a_hat, v1)
    else:
        w = eye.clone()
    return w


def _heights(w: torch.Tensor) -> torch.Tensor:
    """Perpendicular heights of a cell: distance between opposite faces, ``|det| / |b x c|`` etc.

    Shapes: w [3, 3]; returns [3] (Å).
    """
    vol = torch.linalg.det(w).abs()
    cross = torch.linalg.cross(w[[1, 2, 0]], w[[2, 0, 1]])  # [3, 3]: b x c, c x a, a x b
    return vol / torch.linalg.norm(cross, dim=1)


# --------------------------------------------------------------------------------------------
# torch cell list
# --------------------------------------------------------------------------------------------
@dataclass
class _Bins:
    """A cell list: atoms wrapped into the cell and sorted into bins (see :func:`_torch_neighbor_list`).

    Shapes:
        w [3, 3] working cell (Å); pos [n, 3] positions as given; pos_w [n, 3] wrapped (Å), in bin
        order (candidate gathers stay local), and pos_w_t [3, n] the same transposed;
        img_atom [n, 3] integer image each atom was wrapped from; bin3 [n, 3] bin of each atom;
        order [n] atoms sorted by bin; counts, starts [n_bins]; offsets [n_offsets, 3] bin offsets.
    """

    w: torch.Tensor
    pos: torch.Tensor
    pos_w: torch.Tensor
    pos_w_t: torch.Tensor
    img_atom: torch.Tensor
    nb: list[int]
    bin3: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    offsets: torch.Tensor


def _wrap(pos: torch.Tensor, cell64: torch.Tensor, pbc_list: list[bool]
          ) -> tuple[torch.Tensor, list[float], torch.Tensor, torch.Tensor]:
    """Working cell, its heights (Å), fractional positions wrapped into [0, 1) along periodic
    directions ``[n, 3]`` and the image each atom was wrapped from ``[n, 3]``."""
    w = _working_cell(cell64, pbc_list)
    h_list = _heights(w).tolist()  # 1 along non-periodic directions by construction
    for k in range(3):
        if pbc_list[k] and not h_list[k] > _MIN_HEIGHT:
            raise ValueError(f"cell is (nearly) singular: height {h_list[k]:.3g} Å along periodic direction {k}")
    frac = torch.linalg.solve(w.T, pos.T).T  # [n, 3]; pos = frac @ w
    periodic = torch.tensor(pbc_list, device=pos.device)
    img_atom = torch.where(periodic, torch.floor(frac), torch.zeros_like(frac))  # [n, 3]
    return w, h_list, frac - img_atom, img_atom


def _bin_layout(frac_w: torch.Tensor, h_list: list[float], pbc_list: list[bool], r_max: float,
                bins_per_cutoff: int) -> tuple[list[int], list[int], list[float], list[float]]:
    """Bins per direction, reach ``m`` (bins), bin width (fractional units) and origin.

    Bins are ``r_bin / bins_per_cutoff`` wide (perpendicular to the faces), so a pair within
    ``r_max`` is at most ``m = ceil(r_bin / width)`` bins apart. Finer bins test fewer far-away
    candidates at the price of more (receiver, bin) groups; 2 per cutoff was fastest for fcc Cu.
    """
    r_bin = r_max * (1.0 + _BIN_SLACK)
    lo = frac_w.min(dim=0).values.tolist()
    hi = frac_w.max(dim=0).values.tolist()
    nb, m, width, origin = [], [], [], []
    for k in range(3):
        if pbc_list[k]:
            nb_k = max(1, int(h_list[k] * bins_per_cutoff / r_bin))
            nb.append(nb_k)
            width.append(1.0 / nb_k)
            origin.append(0.0)
            m.append(math.ceil(r_bin * nb_k / h_list[k]))
        else:
            span = (hi[k] - lo[k]) * h_list[k]  # Å
            nb.append(int(span * bins_per_cutoff / r_bin) + 1)
            width.append(r_bin / (bins_per_cutoff * h_list[k]))
            origin.append(lo[k])
            m.append(bins_per_cutoff)
    # Very sparse systems (two atoms in a huge box, a molecule spread over microns) would get
    # far more bins than atoms; coarser bins stay correct (the reach m is recomputed).
    max_bins = max(8 * frac_w.shape[0], 64)
    while nb[0] * nb[1] * nb[2] > max_bins:
        k = int(np.argmax(nb))
        nb[k] = (nb[k] + 1) // 2
        if pbc_list[k]:
            width[k] = 1.0 / nb[k]
        else:
            width[k] = max(width[k], (hi[k] - lo[k]) / nb[k] * (1.0 + _BIN_SLACK))
        m[k] = math.ceil(r_bin / (width[k] * h_list[k]))
    n_offsets = (2 * m[0] + 1) * (2 * m[1] + 1) * (2 * m[2] + 1)
    if n_offsets > _MAX_OFFSETS:
        raise ValueError(f"r_max={r_max} Å needs {n_offsets} periodic images for cell heights {h_list} Å; "
                         "the cell is (nearly) degenerate")
    return nb, m, width, origin


def _bin_atoms(pos: torch.Tensor, cell64: torch.Tensor, pbc_list: list[bool], r_max: float,
               bins_per_cutoff: int) -> _Bins:
    """Wrap the atoms into the cell and sort them into bins."""
    device = pos.device
    w, h_list, frac_w, img_atom = _wrap(pos, cell64, pbc_list)
    nb, m, width, origin = _bin_layout(frac_w, h_list, pbc_list, r_max, bins_per_cutoff)
    nb_t = torch.tensor(nb, device=device)
    width_t = torch.tensor(width, dtype=torch.float64, device=device)
    origin_t = torch.tensor(origin, dtype=torch.float64, device=device)
    bin3 = torch.floor((frac_w - origin_t) / width_t).long()
    bin3 = torch.minimum(bin3.clamp_min(0), nb_t - 1)  # [n, 3]
    bin_id = (bin3[:, 0] * nb[1] + bin3[:, 1]) * nb[2] + bin3[:, 2]  # [n]
    order = torch.argsort(bin_id, stable=True)  # atoms grouped by bin
    counts = torch.bincount(bin_id, minlength=nb[0] * nb[1] * nb[2])  # [n_bins]
    grids = [torch.arange(-m[k], m[k] + 1, device=device) for k in range(3)]
    pos_w = (pos - img_atom @ w)[order]
    return _Bins(w=w, pos=pos, pos_w=pos_w, pos_w_t=pos_w.T.contiguous(), img_atom=img_atom.long(), nb=nb,
                 bin3=bin3[order],
                 order=order, counts=counts, starts=torch.cumsum(counts, 0) - counts,
                 offsets=torch.cartesian_prod(*grids).reshape(-1, 3))


def _torch_neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    r_max: float,
    max_pairs_per_chunk: int | None = None,
    bins_per_cutoff: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-list neighbour search, vectorised in torch (no Python loop over atoms).

    Atoms are wrapped into the cell along periodic directions and binned in fractional
    coordinates, with bins ``r_max / bins_per_cutoff`` wide or wider measured perpendicular to the
    cell faces, so any pair within ``r_max`` sits in bins at most ``m`` apart along each direction
    (``m = ceil(r_max / bin width)``). A direction whose height is below ``r_max`` has a single bin
    and ``m = ceil(r_max / height)`` images on each side. Candidate pairs are generated
    bin-against-neighbouring-bin in chunks of receivers (memory stays bounded), first screened on
    the wrapped positions, then kept if the exact distance, recomputed from the positions as
    given, is below ``r_max``. Host syncs are limited to a few scalars (bin counts, chunk sizes).
    """
    device = positions.device
    if max_pairs_per_chunk is None:  # ~100 bytes of temporaries per candidate pair
        max_pairs_per_chunk = (1 << 24) if device.type == "cuda" else (1 << 21)
    n = int(positions.shape[0])
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    pbc_list = [bool(p) for p in pbc.tolist()]
    cell64 = cell.to(device=device, dtype=torch.float64)
    bins = _bin_atoms(positions.to(torch.float64), cell64, pbc_list, r_max, bins_per_cutoff)
    periodic = torch.tensor(pbc_list, device=device)
    out_r, out_s, out_S = [], [], []
    # Receivers are taken in bin order, in chunks bounding the (receiver, offset) tables.
    rec_chunk = max(1, (1 << 20) // bins.offsets.shape[0])
    for r_start in range(0, n, rec_chunk):
        for r, s_, S in _chunk_pairs(bins, cell64, periodic, r_start, min(n, r_start + rec_chunk), r_max,
                                     max_pairs_per_chunk):
            out_r.append(r)
            out_s.append(s_)
            out_S.append(S)
    if not out_r:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    return _finish(torch.cat(out_r), torch.cat(out_s), torch.cat(out_S), n, device)


def _chunk_pairs(bins: _Bins, cell64: torch.Tensor, periodic: torch.Tensor, r_start: int, r_end: int,
                 r_max: float, max_pairs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Edges ``(receiver, sender, unit shift)`` of the receivers ``r_start:r_end`` (in bin order),
    candidates taken from the neighbouring bins in sub-chunks of at most ``max_pairs`` pairs."""
    nb, n_offsets = bins.nb, bins.offsets.shape[0]
    nb_t = torch.tensor(nb, device=cell64.device)
    ext = bins.bin3[r_start:r_end, None, :] + bins.offsets[None, :, :]  # [c, n_off, 3] extended bins
    img = torch.div(ext, nb_t, rounding_mode="floor")  # [c, n_off, 3] image of the neighbour bin
    wrapped = ext - img * nb_t
    valid = ((img == 0) | periodic).all(dim=-1)  # no images along non-periodic directions
    nbin = (wrapped[..., 0] * nb[1] + wrapped[..., 1]) * nb[2] + wrapped[..., 2]
    nbin = torch.where(valid, nbin, torch.zeros_like(nbin))
    cnt = torch.where(valid, bins.counts[nbin], torch.zeros_like(nbin))  # [c, n_off] candidates
    first_slot = bins.starts[nbin]  # [c, n_off]
    # vector from the receiver to the neighbour bin's image origin: edge = pos_w[j] + base
    base = img.to(torch.float64) @ bins.w - bins.pos_w[r_start:r_end, None, :]  # [c, n_off, 3]
    cum = torch.cumsum(cnt.sum(dim=1), 0)  # [c]
    total = int(cum[-1])
    if total == 0:
        return
    cuts = [0, r_end - r_start]
    if total > max_pairs:  # split further so that no sub-chunk exceeds the candidate-pair budget
        marks = torch.arange(max_pairs, total, max_pairs, device=cell64.device)
        inner = sorted({int(x) + 1 for x in torch.searchsorted(cum, marks).tolist()})
        cuts = [0] + [x for x in inner if x < r_end - r_start] + [r_end - r_start]
    r_coarse2 = (r_max * (1.0 + _BIN_SLACK)) ** 2  # coarse test on wrapped positions (superset)
    for a, b in itertools.pairwise(cuts):
        g_cnt = cnt[a:b].reshape(-1)  # [groups]
        n_pairs = int(g_cnt.sum()) if b > a else 0
        if n_pairs == 0:
            continue
        group = torch.repeat_interleave(torch.arange(g_cnt.numel(), device=cell64.device), g_cnt, output_size=n_pairs)
        # slot in `order` of each candidate: its bin's first slot + its rank inside the group
        slot_base = first_slot[a:b].reshape(-1) - (torch.cumsum(g_cnt, 0) - g_cnt)  # [groups]
        slot = slot_base.index_select(0, group) + torch.arange(n_pairs, device=cell64.device)
        # coarse test on wrapped positions; [3, pairs] layout and index_select are much
        # faster on CPU than row gathers of [pairs, 3] and boolean-mask indexing
        base_t = base[a:b].reshape(-1, 3).T.contiguous()  # [3, groups]
        vec_t = bins.pos_w_t.index_select(1, slot) + base_t.index_select(1, group)  # [3, pairs]
        near = torch.nonzero((vec_t * vec_t).sum(dim=0) < r_coarse2).squeeze(1)
        group, slot = group.index_select(0, near), slot.index_select(0, near)
        receiver = bins.order.index_select(0, r_start + a + torch.div(group, n_offsets, rounding_mode="floor"))
        sender = bins.order.index_select(0, slot)
        shift = (img[a:b].reshape(-1, 3).index_select(0, group) - bins.img_atom.index_select(0, sender)
                 + bins.img_atom.index_select(0, receiver))  # [pairs, 3]
        yield _exact_edges(bins.pos, cell64, receiver, sender, shift, r_max)


def _exact_edges(pos: torch.Tensor, cell64: torch.Tensor, receiver: torch.Tensor, sender: torch.Tensor,
                 shift: torch.Tensor, r_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the candidates within ``r_max``, from the positions as given, exactly as ASE computes it."""
    vec = pos.index_select(0, sender) - pos.index_select(0, receiver) + shift.to(torch.float64) @ cell64
    dist = torch.sqrt(vec[:, 0] * vec[:, 0] + vec[:, 1] * vec[:, 1] + vec[:, 2] * vec[:, 2])
    # strict cutoff after the sqrt like ASE; drop each atom's zero-shift self pair
    keep = torch.nonzero((dist < r_max) & ~((sender == receiver) & (shift == 0).all(dim=1))).squeeze(1)
    return receiver.index_select(0, keep), sender.index_select(0, keep), shift.index_select(0, keep)


# --------------------------------------------------------------------------------------------
# external backends
# --------------------------------------------------------------------------------------------
def _to_numpy(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        positions.detach().to("cpu", torch.float64).numpy(),
        cell.detach().to("cpu", torch.float64).numpy(),
        pbc.detach().to("cpu", torch.bool).numpy().astype(bool),
    )


def _boxed(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, r_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and a cell that external codes accept for any pbc: non-periodic rows of ``cell``
    are replaced by orthogonal vectors spanning the atoms (plus a margin) and atoms are translated
    into that box. The edge set ``(i, j, S)`` is invariant under both changes (no shifts are ever
    taken along non-periodic directions, and a common translation changes no ``D``)."""
    pos, cel, pb = _to_numpy(positions, cell, pbc)
    if pb.all() or len(pos) == 0:
        return pos, cel
    w = _working_cell(torch.from_numpy(cel), pb.tolist()).numpy()
    frac = np.linalg.solve(w.T, pos.T).T
    box = w.copy()
    shift = np.zeros(3)
    for k in range(3):
        if not pb[k]:
            lo, hi = frac[:, k].min(), frac[:, k].max()
            box[k] = w[k] * (hi - lo + 2.0 * r_max + 1.0)
            shift -= (lo - r_max - 0.5) * w[k]
    return pos + shift, box


def _ase_neighbor_list(positions, cell, pbc, r_max):
    from ase.neighborlist import primitive_neighbor_list

    pos, cel, pb = _to_numpy(positions, cell, pbc)
    i, j, S = primitive_neighbor_list("ijS", pb, cel, pos, float(r_max), self_interaction=False)
    t = torch.from_numpy
    return _finish(t(i), t(j), t(np.asarray(S)), len(pos), positions.device)


def _vesin_neighbor_list(positions, cell, pbc, r_max):
    try:
        import vesin
    except ImportError as err:
        raise ImportError(
            "neighbor_list(backend='vesin') needs the optional package vesin: pip install vesin"
        ) from err
    pos, box = _boxed(positions, cell, pbc, r_max)
    pb = pbc.detach().cpu().numpy().astype(bool)
    nl = vesin.NeighborList(cutoff=float(r_max), full_list=True)
    i, j, S = nl.compute(points=pos, box=box, periodic=[bool(p) for p in pb], quantities="ijS")
    return _finish_strict(i, j, S, pos, box, r_max, positions.device)  # vesin keeps d <= r_max


def _matscipy_neighbor_list(positions, cell, pbc, r_max):
    try:
        from matscipy.neighbours import neighbour_list
    except ImportError as err:
        raise ImportError(
            "neighbor_list(backend='matscipy') needs the optional package matscipy: pip install matscipy"
        ) from err
    pos, box = _boxed(positions, cell, pbc, r_max)
    pb = pbc.detach().cpu().numpy().astype(bool)
    i, j, S = neighbour_list("ijS", positions=pos, cell=box, pbc=pb, cutoff=float(r_max))
    return _finish_strict(i, j, S, pos, box, r_max, positions.device)


def _finish_strict(i, j, S, pos, box, r_max, device):
    """Numpy pairs ``i, j`` with integer shifts ``S`` -> :func:`_finish`, keeping only pairs
    strictly closer than ``r_max`` (ASE's convention; some libraries include ``d == r_max``)."""
    d = pos[j] - pos[i] + S @ box
    keep = np.sqrt((d * d).sum(1)) < r_max
    t = torch.from_numpy
    return _finish(t(i[keep].astype(np.int64)), t(j[keep].astype(np.int64)), t(S[keep].astype(np.int64)),
                   len(pos), device)


#: backend name -> implementation ``(positions, cell, pbc, r_max) -> (edge_index, unit_shifts)``
BACKENDS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "torch": _torch_neighbor_list,
    "ase": _ase_neighbor_list,
    "vesin": _vesin_neighbor_list,
    "matscipy": _matscipy_neighbor_list,
}


def _auto_backend(device: torch.device) -> str:
    # On the CPU vesin is faster than our torch cell list, whose cost is per-op overhead
    # (benchmarks/neighbors.py, docs/benchmarks.md); on a GPU the torch list avoids copies.
    if device.type == "cpu":
        try:
            import vesin  # noqa: F401
        except ImportError:
            return "torch"
        return "vesin"
    return "torch"


def available_backends() -> list[str]:
    """Names of the backends usable in this environment (optional packages importable)."""
    out = ["torch", "ase"]
    for name, module in (("vesin", "vesin"), ("matscipy", "matscipy.neighbours")):
        try:
            __import__(module)
            out.append(name)
        except ImportError:
            pass
    return out


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    r_max: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs closer than ``r_max``, periodic images included.

    For receiver ``i``, sender ``j`` and integer shift ``S`` the edge vector is
    ``pos[j] - pos[i] + S @ cell`` and ``|edge_vec| < r_max`` (strict). Pairs ``i == j`` with
    ``S == 0`` are excluded; an atom's own periodic images are kept. Positions need not be
    wrapped into the cell: shifts refer to the positions as given. Cell rows along non-periodic
    directions are ignored (they may be zero), and shifts along them are always 0.

    Edges are sorted by receiver, then sender, then shift, identically for every backend.

    Args:
        positions: Cartesian positions (Å), any float dtype, any device.
        cell: lattice vectors as rows (Å).
        pbc: periodicity along each cell vector.
        r_max: cutoff radius (Å).
        backend: ``"auto"`` (vesin for CPU tensors when installed, else torch), ``"torch"`` (our
            cell list, runs on the inputs' device), ``"ase"``, or ``"vesin"`` / ``"matscipy"``
            (CPU; results are moved to the inputs' device).

    Returns:
        ``(edge_index, unit_shifts)``: ``edge_index[0]`` are senders, ``edge_index[1]``
        receivers (long); ``unit_shifts`` are integer (long) cell shifts of the sender.

    Shapes:
        positions [n_atoms, 3]; cell [3, 3]; pbc [3] bool;
        edge_index [2, n_edges]; unit_shifts [n_edges, 3].

    Raises:
        ValueError: bad shapes, NaN/inf positions, a singular cell along periodic directions.
        ImportError: an optional backend that is not installed.
    """
    if backend == "auto":
        backend = _auto_backend(positions.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown neighbour-list backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'")
    pbc = torch.as_tensor(pbc, dtype=torch.bool)
    cell = torch.as_tensor(cell)
    _check_inputs(positions, cell, pbc, float(r_max))
    # rows along non-periodic directions are never used; keep them finite (0 * inf = NaN)
    rows_ok = pbc.to(cell.device)[:, None] | torch.isfinite(cell).all(dim=1, keepdim=True)
    cell = torch.where(rows_ok, cell, torch.zeros_like(cell))
    _working_cell(cell.double(), pbc.tolist())  # same clear error for a degenerate cell on every backend
    return BACKENDS[backend](positions, cell, pbc.to(positions.device), float(r_max))


def batch_neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    r_max: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`neighbor_list` for every structure of a batch, with global atom indices.

    Structures are processed one after the other; edges come out grouped by structure (in
    structure order) and, inside a structure, in :func:`neighbor_list` order.

    Args:
        positions: positions of all atoms (Å).
        cell: one cell per structure (Å, rows are lattice vectors).
        pbc: periodicity per structure.
        batch: structure index of every atom (need not be sorted).
        r_max: cutoff radius (Å).
        backend: as in :func:`neighbor_list`.

    Returns:
        ``(edge_index, unit_shifts)`` with indices into ``positions``; shifts refer to the cell
        of the structure the edge belongs to.

    Shapes:
        positions [n_atoms, 3]; cell [n_graphs, 3, 3]; pbc [n_graphs, 3]; batch [n_atoms];
        edge_index [2, n_edges]; unit_shifts [n_edges, 3].
    """
    if cell.ndim != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"cell must have shape [n_graphs, 3, 3], got {tuple(cell.shape)}")
    n_graphs = int(cell.shape[0])
    pbc = torch.as_tensor(pbc, dtype=torch.bool)
    if tuple(pbc.shape) != (n_graphs, 3):
        raise ValueError(f"pbc must have shape [{n_graphs}, 3], got {tuple(pbc.shape)}")
    if batch.shape != positions.shape[:1]:
        raise ValueError(f"batch must have shape [{positions.shape[0]}], got {tuple(batch.shape)}")
    device = positions.device
    batch = batch.to(device)
    if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= n_graphs):
        raise ValueError(f"batch indices must lie in [0, {n_graphs})")
    order = torch.argsort(batch, stable=True)
    counts = torch.bincount(batch, minlength=n_graphs).tolist()
    edges, shifts = [], []
    start = 0
    for g in range(n_graphs):
        idx = order[start : start + counts[g]]  # global indices of this structure's atoms
        start += counts[g]
        if idx.numel() == 0:
            continue
        ei, sh = neighbor_list(positions[idx], cell[g], pbc[g], r_max, backend=backend)
        edges.append(idx[ei])
        shifts.append(sh)
    if not edges:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(
            0, 3, dtype=torch.long, device=device
        )
    return torch.cat(edges, dim=1), torch.cat(shifts)
