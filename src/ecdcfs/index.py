"""The code index of an LM-coded file: every frame's codes, entropy-decoded once, in order.

Frame offsets of an LM-coded file are only known after decoding the frames before them,
and that decoding (a language-model step per code step) costs more than the audio decode.
So the codes are decoded once, kept in memory and persisted in the cache directory under
the file's content hash; a remount or a second reader starts where the last one stopped.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
from cachetools import LRUCache

log = logging.getLogger(__name__)

_FORMAT = 1


class CodeIndex:
    """Codes, scales and byte offsets of the first ``len(self)`` frames of one file."""

    def __init__(self, frame_count: int) -> None:
        self.frame_count = frame_count
        self.lock = threading.Lock()  # held while extending: frames decode strictly in order
        self.scales: list[float | None] = []
        self.codes: list[np.ndarray] = []
        self.next_offset = 0  # payload offset of frame len(self)
        self.saved_frames = 0

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def complete(self) -> bool:
        return len(self) >= self.frame_count

    def append(self, scale: float | None, codes: np.ndarray, next_offset: int) -> None:
        self.scales.append(scale)
        self.codes.append(codes.astype(np.uint16))
        self.next_offset = next_offset

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename): readers never see half an index."""
        lengths = np.array([c.shape[1] for c in self.codes], dtype=np.int64)
        flat = np.concatenate([c.reshape(-1) for c in self.codes]) if self.codes else np.zeros(0)
        scales = np.array([np.nan if s is None else s for s in self.scales], dtype=np.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(
                tmp,
                format=_FORMAT,
                frame_count=self.frame_count,
                next_offset=self.next_offset,
                lengths=lengths,
                scales=scales,
                codes=flat.astype(np.uint16),
            )
        os.replace(tmp.name, path)
        self.saved_frames = len(self)

    @classmethod
    def load(cls, path: Path, frame_count: int, num_codebooks: int) -> CodeIndex:
        """Load a persisted index; raise ValueError if it does not fit the file."""
        with np.load(path) as data:
            if int(data["format"]) != _FORMAT or int(data["frame_count"]) != frame_count:
                raise ValueError("index does not match the file")
            index = cls(frame_count)
            sizes = data["lengths"] * num_codebooks
            starts = np.cumsum(sizes) - sizes
            flat = data["codes"]
            for scale, start, size in zip(data["scales"], starts, sizes, strict=True):
                index.scales.append(None if np.isnan(scale) else float(scale))
                codes = flat[start : start + size]
                if codes.size != size:
                    raise ValueError("index is truncated")
                index.codes.append(codes.reshape(num_codebooks, -1))
            index.next_offset = int(data["next_offset"])
        index.saved_frames = len(index)
        return index


class IndexStore:
    """Code indexes by content hash: a few in memory, all persisted under ``directory``."""

    def __init__(self, directory: Path | None, in_memory: int = 16) -> None:
        self.directory = directory
        self._indexes: LRUCache = LRUCache(maxsize=in_memory)
        self._lock = threading.Lock()

    def _path(self, identity: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{identity}.codes.npz"

    def get(self, identity: str, frame_count: int, num_codebooks: int) -> CodeIndex:
        with self._lock:
            index = self._indexes.get(identity)
            if index is None:
                index = self._load(identity, frame_count, num_codebooks) or CodeIndex(frame_count)
                self._indexes[identity] = index
            return index

    def _load(self, identity: str, frame_count: int, num_codebooks: int) -> CodeIndex | None:
        path = self._path(identity)
        if path is None or not path.exists():
            return None
        try:
            index = CodeIndex.load(path, frame_count, num_codebooks)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable index %s: %s", path, exc)
            return None
        log.info("loaded index %s (%d/%d frames)", path.name, len(index), frame_count)
        return index

    def persist(self, identity: str, index: CodeIndex) -> None:
        """Save the index if it grew; a cache directory that fails only costs persistence."""
        path = self._path(identity)
        if path is None or len(index) <= index.saved_frames:
            return
        try:
            with index.lock:
                index.save(path)
        except OSError as exc:
            log.warning("cannot persist index to %s: %s", path, exc)
            self.directory = None
