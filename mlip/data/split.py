"""The one train/valid/test split, used by ``mlip data split`` and by training's fractions."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["isolated_indices", "split_indices"]


def split_indices(n: int, fractions: Sequence[float], seed: int,
                  keep_in_first: Sequence[int] | np.ndarray = ()) -> list[np.ndarray]:
    """Disjoint, complete, sorted index sets: the first part and held-out parts (valid, test).

    The indices in ``keep_in_first`` (isolated-atom reference frames: they set the E0s and are
    no test data) always go to the first part. The other ``n_rest`` structures are ordered by a
    random permutation drawn from ``seed``; held-out part ``k`` gets ``round(fractions[k] * n_rest)``
    of them and the first part the rest.

    Raises:
        ValueError: the structures outside ``keep_in_first`` cannot fill the other parts.

    >>> [p.tolist() for p in split_indices(5, [0.6, 0.4], seed=0)]
    [[0, 1, 3], [2, 4]]
    >>> [p.tolist() for p in split_indices(6, [0.5, 0.5], seed=0, keep_in_first=[5])]
    [[0, 1, 3, 5], [2, 4]]
    """
    keep = np.unique(np.asarray(keep_in_first, dtype=np.int64))
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), keep)
    held_out = np.array([int(round(f * len(rest))) for f in fractions[1:]], dtype=np.int64)
    if held_out.sum() > len(rest):
        raise ValueError(f"{len(rest)} structures (besides {len(keep)} kept in the first part) cannot fill "
                         f"held-out parts of {held_out.tolist()}")
    order = rest[np.random.default_rng(seed).permutation(len(rest))]
    # held-out parts take the front of the permutation in order and the first part the rest, so a
    # validation set depends only on the seed and its own size, not on the test fraction
    bounds = np.concatenate([[0], np.cumsum(held_out)])
    parts = [np.sort(np.concatenate([order[bounds[-1]:], keep]))]
    parts += [np.sort(order[bounds[k]:bounds[k + 1]]) for k in range(len(held_out))]
    return parts


def isolated_indices(source: Sequence, n_atoms: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Indices of the isolated-atom reference frames of ``source``, sorted.

    Only single-atom structures can be isolated atoms, so with per-structure atom counts
    ``n_atoms`` (e.g. an HDF5 index) only those are read. Items may be
    :class:`~mlip.data.graph.AtomGraph` (``isolated`` flag) or ``ase.Atoms`` (flag set by the
    readers; :func:`~mlip.data.formats.labels.is_isolated_atom`).
    """
    from mlip.data.formats.labels import is_isolated_atom

    counts = np.asarray(n_atoms if n_atoms is not None else [len(_atoms_of(source[i])) for i in range(len(source))])
    out = []
    for i in np.flatnonzero(counts == 1).tolist():
        item = source[i]
        flag = bool(item.isolated) if hasattr(item, "isolated") else is_isolated_atom(item)
        if flag:
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def _atoms_of(item) -> Sequence:  # noqa: ANN001 - an AtomGraph or ase.Atoms
    return item.numbers
