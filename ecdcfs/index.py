"""The code index of an LM-coded file: its codes, entropy-decoded once, in order.

Frame offsets of an LM-coded file are only known after decoding the frames before them,
and that decoding (a language-model step per code step) costs more than the audio decode.
So the codes are decoded once, kept in memory and persisted in the cache directory under
the file's content hash; a remount or a second reader starts where the last one stopped.

An index holds *units* of codes in order: a 48 kHz file's frames, or the fixed blocks of
code steps of a 24 kHz file's single frame (one per decode chunk), so a reader waits only
for the units it needs. A 24 kHz file is one arithmetic-coded stream that can only be
decoded from its start: its builder resumes a partial index by decoding again from the
start (the units already indexed are served meanwhile).

The cache directory holds only ``<hash>.codes.npz`` files (and, while one is written,
its ``.tmp`` sibling). It is capped in size: after each save the least recently used
indexes (by modification time: loading an index touches it) are deleted until the
directory fits (:mod:`ecdcfs.cache_dir`, which also empties it). A directory that cannot
be written (read only, full) costs only persistence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from cachetools import LRUCache

from .cache_dir import enforce_cap, index_path
from .container import EcdcError, EncodedFrame
from .settings import DEFAULT_CACHE_DIR_MB, write_atomically

log = logging.getLogger(__name__)

_FORMAT = 2  # 2: units (frames or blocks of steps) instead of frames


class Unit(NamedTuple):
    """One unit of an LM-coded file's codes, as a scan yields it."""

    number: int
    scale: float | None  # a 48 kHz frame's; None for a 24 kHz block
    codes: np.ndarray  # [codebooks, steps]
    next_offset: int  # payload offset of the unit after it


UnitScan = Callable[[int, int], Iterator[Unit]]
"""``(first unit wanted, its payload offset) -> units in order``, from that unit or earlier."""


class CodeIndex:
    """Codes, scales and byte offsets of the first ``len(self)`` units of one file.

    One builder thread appends units in order; readers wait for the unit they need.
    """

    def __init__(self, unit_count: int) -> None:
        self.unit_count = unit_count
        self._changed = threading.Condition()
        self.scales: list[float | None] = []
        self.codes: list[np.ndarray] = []
        self.next_offset = 0  # payload offset of unit len(self)
        self.saved_units = 0
        self.error: EcdcError | None = None  # why units from len(self) on cannot be had

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def complete(self) -> bool:
        return len(self) >= self.unit_count

    def append(self, scale: float | None, codes: np.ndarray, next_offset: int) -> None:
        with self._changed:
            self.scales.append(scale)
            self.codes.append(codes.astype(np.uint16))
            self.next_offset = next_offset
            self._changed.notify_all()

    def fail(self, error: EcdcError) -> None:
        with self._changed:
            self.error = error
            self._changed.notify_all()

    def has(self, unit: int) -> bool:
        return unit < len(self)

    def wait(self, unit: int, timeout: float | None = None) -> bool:
        """Wait until ``unit`` is indexed, indexing has failed (see :attr:`error`) or
        ``timeout`` seconds have passed (None: no limit); whether ``unit`` is indexed."""
        with self._changed:
            self._changed.wait_for(lambda: self.has(unit) or self.error is not None, timeout)
            return self.has(unit)

    def get(self, unit: int) -> EncodedFrame:
        """Codes and scale of ``unit``, waiting for the builder to reach it."""
        with self._changed:  # a re-entrant lock: wait() takes it again
            if not self.wait(unit):
                raise self.error  # type: ignore[misc]
            return EncodedFrame(self.codes[unit], self.scales[unit])

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename): readers never see half an index."""
        with self._changed:
            codes, scales, next_offset = list(self.codes), list(self.scales), self.next_offset
        arrays: dict[str, Any] = {
            "format": _FORMAT,
            "unit_count": self.unit_count,
            "next_offset": next_offset,
            "lengths": np.array([c.shape[1] for c in codes], dtype=np.int64),
            "scales": np.array([np.nan if s is None else s for s in scales], dtype=np.float64),
            "codes": np.concatenate([c.reshape(-1) for c in codes] or [np.zeros(0, np.uint16)]),
        }
        write_atomically(path, lambda f: np.savez(f, **arrays))
        self.saved_units = len(codes)

    @classmethod
    def load(
        cls, path: Path, unit_count: int, num_codebooks: int, unit_steps: Callable[[int], int]
    ) -> CodeIndex:
        """Load a persisted index; raise ValueError if it does not fit the file.

        ``unit_steps(unit)`` is the number of code steps unit ``unit`` must hold.
        """
        with np.load(path) as data:
            if int(data["format"]) != _FORMAT or int(data["unit_count"]) != unit_count:
                raise ValueError("index does not match the file")
            index = cls(unit_count)
            lengths = data["lengths"]
            if len(lengths) > unit_count or any(
                int(n) != unit_steps(unit) for unit, n in enumerate(lengths)
            ):
                raise ValueError("index units do not match the file")
            sizes = lengths * num_codebooks
            starts = np.cumsum(sizes) - sizes
            flat = data["codes"]
            for scale, start, size in zip(data["scales"], starts, sizes, strict=True):
                index.scales.append(None if np.isnan(scale) else float(scale))
                codes = flat[start : start + size]
                if codes.size != size:
                    raise ValueError("index is truncated")
                index.codes.append(codes.reshape(num_codebooks, -1))
            index.next_offset = int(data["next_offset"])
        index.saved_units = len(index)
        return index


class IndexStore:
    """Code indexes by content hash: a few in memory, all persisted under ``directory``.

    The directory is kept under ``max_bytes`` (None: no cap), least recently used first.
    """

    def __init__(
        self,
        directory: Path | None,
        in_memory: int = 16,
        max_bytes: int | None = DEFAULT_CACHE_DIR_MB << 20,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._indexes: LRUCache = LRUCache(maxsize=in_memory)
        self._building: dict[str, CodeIndex] = {}  # builds running (kept if evicted above)
        self._lock = threading.Lock()
        self._builders = threading.Semaphore(1)  # indexing is CPU-bound: one file at a time
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()
        self._persist_lock = threading.Lock()

    def _path(self, identity: str) -> Path | None:
        return None if self.directory is None else index_path(self.directory, identity)

    def get(
        self, identity: str, unit_count: int, num_codebooks: int, unit_steps: Callable[[int], int]
    ) -> CodeIndex:
        """The index of ``identity``: in memory, persisted, or new (``unit_steps``: see load)."""
        with self._lock:
            index = self._indexes.get(identity)
            if index is None:
                index = self._building.get(identity)
            if index is None:
                index = self._load(identity, unit_count, num_codebooks, unit_steps)
            if index is None:
                index = CodeIndex(unit_count)
            self._indexes[identity] = index
            return index

    def _load(
        self, identity: str, unit_count: int, num_codebooks: int, unit_steps: Callable[[int], int]
    ) -> CodeIndex | None:
        path = self._path(identity)
        if path is None or not path.exists():
            return None
        try:
            index = CodeIndex.load(path, unit_count, num_codebooks, unit_steps)
        except Exception as exc:  # OSError, a bad zip, wrong arrays...: it is only a cache
            log.warning("ignoring unreadable index %s: %s", path, exc)
            return None
        with contextlib.suppress(OSError):  # most recently used: evicted last
            os.utime(path)
        log.info("loaded index %s (%d/%d units)", path.name, len(index), unit_count)
        return index

    def build(
        self, identity: str, index: CodeIndex, scan: UnitScan, label: str, unit: str = "frames"
    ) -> None:
        """Complete ``index`` in the background (once), one file at a time."""
        with self._lock:
            if identity in self._building or index.complete or index.error is not None:
                return
            if self._closing.is_set():
                return
            self._building[identity] = index
            thread = threading.Thread(
                target=self._build,
                args=(identity, index, scan, label, unit),
                name=f"ecdcfs-index-{label}",
                daemon=True,
            )
            self._threads.add(thread)
        thread.start()

    def close(self, timeout: float = 30) -> None:
        """Stop the builds at their next unit and wait (up to ``timeout`` seconds each) for
        them to persist what they have: what was indexed is there for the next start."""
        self._closing.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def _build(
        self, identity: str, index: CodeIndex, scan: UnitScan, label: str, unit: str
    ) -> None:
        with self._builders:
            try:
                self._scan_into(identity, index, scan, label, unit)
            except EcdcError as exc:
                log.error("%s: %s %d: %s", label, unit, len(index), exc)
                index.fail(exc)
            except Exception as exc:  # a bug or a torch failure: fail this file only
                log.exception("%s: indexing failed at %s %d", label, unit, len(index))
                index.fail(EcdcError(f"indexing failed: {exc}"))
            self.persist(identity, index)
        with self._lock:
            del self._building[identity]
            self._threads.discard(threading.current_thread())

    def _scan_into(
        self, identity: str, index: CodeIndex, scan: UnitScan, label: str, unit: str
    ) -> None:
        """Append the units ``scan`` yields past the end of ``index``, logging progress."""
        total = index.unit_count
        reported = 100 * len(index) // max(1, total) // 10 * 10
        if self._closing.is_set():
            return
        for number, scale, codes, next_offset in scan(len(index), index.next_offset):
            if number < len(index):  # a stream resumed from its start: already indexed
                continue
            if number > len(index):
                raise RuntimeError(f"scan skipped from {unit} {len(index)} to {number}")
            index.append(scale, codes, next_offset)
            if index.complete or self._closing.is_set():  # persisted now (see close)
                return
            percent = 100 * len(index) // total
            if total >= 10 and percent >= reported + 10:
                reported = percent - percent % 10
                log.info("indexing %s: %d%% (%d/%d %s)", label, percent, len(index), total, unit)
                self.persist(identity, index)
        if not index.complete:
            raise RuntimeError(f"scan ended at {unit} {len(index)} of {total}")

    def persist(self, identity: str, index: CodeIndex) -> None:
        """Save the index if it grew; a cache directory that fails only costs persistence."""
        path = self._path(identity)
        if path is None or len(index) <= index.saved_units:
            return
        with self._persist_lock:
            try:
                index.save(path)
                if self.max_bytes is not None:
                    enforce_cap(path.parent, self.max_bytes, keep=path)
            except OSError as exc:
                log.warning("cannot persist index to %s: %s; continuing without", path, exc)
                self.directory = None
