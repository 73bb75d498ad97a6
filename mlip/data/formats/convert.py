"""Convert many input files to mlip HDF5: one file, or shards that train as one data set.

The frames of all inputs form one stream (files in the given order, frames in file order, bad
frames left out with ``skip_bad``). Parsing, labelling and checking run in ``workers`` processes
(spawned, each opening its own file handles) while the main process reads the files and writes
HDF5, so the output does not depend on the number of workers.

Sharded output (``shard_size``): shard ``k`` holds frames ``k*N .. (k+1)*N-1`` of the stream. Each
shard is written to a temporary file and renamed when complete; ``progress.json`` then records
it and where the stream continues, and ``manifest.json``, written last, marks the folder
complete. A killed conversion therefore leaves complete shards and no manifest (readers refuse
the folder), and rerunning the same command continues after the last recorded shard.
"""
from __future__ import annotations

import collections
import glob
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ase import Atoms

from mlip.atomic import atomic_path
from mlip.data.formats import expand_paths, records
from mlip.data.formats.hdf5 import MANIFEST, PROGRESS, HDF5Reader, check_present, write_hdf5
from mlip.data.formats.labels import (
    DataError,
    KeyTracker,
    LabelKeys,
    Record,
    check_not_empty,
    check_required,
    checked_records,
    error,
    load_record,
)

#: frames sent to a worker at once (enough to hide the inter-process overhead)
BATCH = 32
#: bad-frame messages kept in the summary and the manifest
MAX_BAD_MESSAGES = 1000


@dataclass
class Summary:
    """What a conversion did."""

    outputs: list[str]
    n_structures: int
    n_bad: int = 0
    #: the first :data:`MAX_BAD_MESSAGES` bad-frame errors (file, frame, id, key, reason)
    bad: list[str] = field(default_factory=list)
    #: structures found already converted by an earlier, interrupted run of the same command
    resumed: int = 0


class BadFrames:
    """Collects bad frames when skipping them; without ``skip`` the first one is raised."""

    def __init__(self, skip: bool, n: int = 0, messages: Sequence[str] = ()) -> None:
        self.skip, self.n, self.messages = skip, n, list(messages)

    def __call__(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.n += 1
        if len(self.messages) < MAX_BAD_MESSAGES:
            self.messages.append(str(err))


def convert(inputs: str | Sequence[str], output: str, *, keys: LabelKeys | None = None,
            required: Sequence[str] = (), shard_size: int | None = None, workers: int = 1,
            skip_bad: bool = False, chunk_size: int = 1024,
            progress: Callable[[int], None] | None = None) -> Summary:
    """Convert ``inputs`` (files, folders, globs; any format mlip reads) to mlip HDF5.

    Args:
        inputs: what :func:`~mlip.data.formats.expand_paths` accepts.
        output: an ``.h5`` file, or with ``shard_size`` a folder of shards.
        keys, required: as in :func:`~mlip.data.formats.read`.
        shard_size: structures per shard; ``None`` writes one file.
        workers: processes that parse and check frames (1: in this process).
        skip_bad: skip bad frames and count them (else the first one raises).
        chunk_size: structures per HDF5 write.
        progress: called with the number of structures each time some are written or found done.

    Raises:
        DataError: a bad frame (without ``skip_bad``), an unreadable file, an output folder that
            holds something else. Nothing that looks complete is left behind.
    """
    files = expand_paths(inputs)
    for path in files:
        if os.path.abspath(path) == os.path.abspath(output):
            raise DataError(f"{output}: input and output are the same file")
    required = check_required(required)
    if shard_size is None:
        _remove_stale_tmp(os.path.dirname(os.path.abspath(output)), os.path.basename(output))
        bad = BadFrames(skip_bad)
        frames = _counted((a for a, _ in _stream(files, keys, required, workers, bad, None)), progress)
        n = write_hdf5(frames, output, chunk_size=chunk_size, validate=False)
        return Summary([output], n, bad.n, bad.messages)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return _convert_shards(files, output, keys, required, shard_size, workers, skip_bad, chunk_size, progress)


def _counted(frames: Iterable[Atoms], progress: Callable[[int], None] | None) -> Iterator[Atoms]:
    for atoms in frames:
        yield atoms
        if progress is not None:
            progress(1)


# ----------------------------------------------------------------------------- the frame stream
def _stream(files: Sequence[str], keys: LabelKeys | None, required: Sequence[str], workers: int,
            on_bad: Callable[[DataError], None], start: tuple[int, int] | None
            ) -> Iterator[tuple[Atoms, tuple[int, int]]]:
    """Canonical frames of all ``files`` in order, each with the stream position after it
    (``(file index, frame index + 1)``); ``start`` resumes at such a position."""
    with _Workers(workers) as pool:
        for i, path in enumerate(files):
            if start is not None and i < start[0]:
                continue
            first = start[1] if start is not None and i == start[0] else 0
            for atoms, index in _file_frames(pool, path, keys, required, on_bad, first):
                yield atoms, (i, index + 1)


def _file_frames(pool: _Workers, path: str, keys: LabelKeys | None, required: Sequence[str],
                 on_bad: Callable[[DataError], None], first: int) -> Iterator[tuple[Atoms, int]]:
    """``(atoms, frame index)`` of one file from frame ``first`` on; bad frames go to ``on_bad``."""
    found = records(path, keys)
    if found is None:  # HDF5: already parsed and cheap to read, so read here
        yield from _hdf5_frames(path, required, on_bad, first)
        return
    recs, parse, keys = found
    tracker, n_frames = KeyTracker(keys), 0
    wanted = (r for r in checked_records(path, recs) if r.index >= first)
    tasks = ((path, parse, keys, required, batch) for batch in _batched(wanted, BATCH))
    for items, seen, present, n in pool.map(_work, tasks):
        tracker.merge(seen, present, n)
        n_frames += n
        for index, atoms in items:
            if isinstance(atoms, DataError):
                on_bad(atoms)
            else:
                yield atoms, index
    if first == 0:  # whole-file checks only when this run saw the whole file
        check_not_empty(path, n_frames)
        tracker.check(path)


def _hdf5_frames(path: str, required: Sequence[str], on_bad: Callable[[DataError], None],
                 first: int) -> Iterator[tuple[Atoms, int]]:
    reader = HDF5Reader(path)
    try:
        if len(reader) == 0:
            raise error(path, 0, None, "file is empty (no frames found)")
        for i in range(first, len(reader)):
            try:
                atoms = reader[i]
                check_present(atoms, required, path, i)
            except DataError as err:
                on_bad(err)
                continue
            yield atoms, i
    finally:
        reader.close()


def _work(path: str, parse: Any, keys: LabelKeys, required: Sequence[str], batch: list[Record]
          ) -> tuple[list[tuple[int, Atoms | DataError]], set[str], set[str], int]:
    """Parse, label and check a batch of records (in a worker process); errors are returned."""
    tracker = KeyTracker(keys)
    items = [(r.index, load_record(path, r, parse, keys, required, True, tracker)) for r in batch]
    return items, tracker.seen, tracker.present, len(batch)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


class _Workers:
    """An ordered, bounded map over spawned worker processes (in-process for ``n <= 1``).

    ``multiprocessing.Pool.imap`` would read its whole input ahead (the whole file); here at most
    ``2 n`` batches are in flight.
    """

    def __init__(self, n: int) -> None:
        self.n = max(int(n), 1)
        self.pool = None

    def __enter__(self) -> _Workers:
        if self.n > 1:
            # spawn: workers start clean (no inherited HDF5 or thread state from this process)
            self.pool = multiprocessing.get_context("spawn").Pool(self.n)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator[Any]:
        if self.pool is None:
            for task in tasks:
                yield fn(*task)
            return
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(self.pool.apply_async(fn, task))
            if len(pending) >= 2 * self.n:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- shards
def _signature(files: Sequence[str], keys: LabelKeys | None, required: Sequence[str], shard_size: int) -> dict:
    """What the shards depend on: a rerun continues only if this is unchanged."""
    stats = [os.stat(p) for p in files]
    return {"inputs": [[os.path.abspath(p), s.st_size, s.st_mtime_ns] for p, s in zip(files, stats)],
            "keys": asdict(keys or LabelKeys()), "required": list(required), "shard_size": shard_size}


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.h5"


def _remove_stale_tmp(folder: str, name: str) -> None:
    """Remove the temporary files a killed write of ``name`` left (``atomic_path`` names them)."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        os.unlink(tmp)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_json(path: str, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)


def _prepare(folder: str, signature: dict) -> dict | None:
    """The progress of an earlier run of the same conversion, ``{}`` for a fresh start, or
    ``None`` when the folder already holds this conversion, finished."""
    os.makedirs(folder, exist_ok=True)
    manifest, progress = os.path.join(folder, MANIFEST), os.path.join(folder, PROGRESS)
    if os.path.exists(manifest):
        if _read_json(manifest).get("signature") == signature:
            return None
        raise DataError(f"{folder}: holds a finished conversion of other inputs or options; "
                        "remove it or choose another output folder")
    state = _read_json(progress) if os.path.exists(progress) else {}
    if state:
        # a kill between a shard's write and the progress update leaves that one shard unrecorded
        unrecorded = os.path.join(folder, _shard_name(len(state["shards"])))
        if os.path.exists(unrecorded):
            os.unlink(unrecorded)
    if state and state.get("signature") != signature:
        # inputs or options changed since the interrupted run: its shards are worthless
        for shard in state["shards"]:
            path = os.path.join(folder, shard["file"])
            if os.path.exists(path):
                os.unlink(path)
        os.unlink(progress)
        state = {}
    ours = {PROGRESS} | {s["file"] for s in state.get("shards", [])}
    others = [n for n in os.listdir(folder) if not n.startswith(".") and n not in ours]
    if others:
        raise DataError(f"{folder}: the output folder holds other files ({sorted(others)[:5]}); "
                        "choose an empty or new folder")
    for name in os.listdir(folder):
        if name.startswith(".shard-") and name.endswith(".tmp"):
            os.unlink(os.path.join(folder, name))  # a shard being written when the run was killed
    return state


def _convert_shards(files: list[str], folder: str, keys: LabelKeys | None, required: Sequence[str],
                    shard_size: int, workers: int, skip_bad: bool, chunk_size: int,
                    progress: Callable[[int], None] | None) -> Summary:
    signature = _signature(files, keys, required, shard_size)
    state = _prepare(folder, signature)
    if state is None:
        done = _read_json(os.path.join(folder, MANIFEST))
        paths = [os.path.join(folder, s["file"]) for s in done["shards"]]
        return Summary(paths, done["n_structures"], done["n_bad"], done["bad"], resumed=done["n_structures"])
    if not state:
        # recorded before any shard exists, so that every shard in the folder is known to be ours
        state = {"signature": signature, "shards": [], "n_bad": 0, "bad": []}
        _write_json(os.path.join(folder, PROGRESS), state)
    shards = list(state["shards"])
    bad = BadFrames(skip_bad, state["n_bad"], state["bad"])
    resumed = sum(s["n_structures"] for s in shards)
    if progress is not None and resumed:
        progress(resumed)
    start = tuple(state["next"]) if "next" in state else None
    stream = _stream(files, keys, required, workers, bad, start)
    position = [start]
    for k in itertools.count(len(shards)):
        head = next(stream, None)
        if head is None:
            break
        frames = _counted(_take(itertools.chain([head], stream), shard_size, position), progress)
        n = write_hdf5(frames, os.path.join(folder, _shard_name(k)), chunk_size=chunk_size, validate=False)
        shards.append({"file": _shard_name(k), "n_structures": n})
        _write_json(os.path.join(folder, PROGRESS), {
            "signature": signature, "shards": shards, "next": list(position[0]),
            "n_bad": bad.n, "bad": bad.messages})
    total = sum(s["n_structures"] for s in shards)
    if total == 0:
        os.unlink(os.path.join(folder, PROGRESS))
        raise DataError(f"{files}: no structures to write")
    _write_json(os.path.join(folder, MANIFEST), {
        "format": "mlip-hdf5-shards", "version": 1, "signature": signature, "shards": shards,
        "n_structures": total, "n_bad": bad.n, "bad": bad.messages})
    os.unlink(os.path.join(folder, PROGRESS))
    return Summary([os.path.join(folder, s["file"]) for s in shards], total, bad.n, bad.messages, resumed)


def _take(stream: Iterator[tuple[Atoms, tuple[int, int]]], n: int, position: list) -> Iterator[Atoms]:
    """The first ``n`` frames of ``stream`` (pulling no more), recording the last one's position."""
    for atoms, pos in itertools.islice(stream, n):
        position[0] = pos
        yield atoms
