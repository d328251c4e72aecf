"""Each model's decoder graph, built from its checkpoint once and kept in the cache dir.

Building a graph (:mod:`ecdcfs.graph`) means reading the checkpoint and writing ~30 MB
of ONNX: measured on 2 cores for the 48 kHz model, ~1.3-1.5 s with a 302 MiB peak of RSS,
against 0.04 s and 192 MiB to load a cached one. So graphs are cached in
``<cache dir>/graphs/<model>-<sha256 of the checkpoint, 16 hex>-g<GRAPH_FORMAT>.npz``:
new weights or a new graph format mean a new file, and saving one deletes that model's
others. A cached file is verified without torch: its members' CRC-32s as it is read,
its checkpoint's hash, and ONNX Runtime loading and running it; one that fails is rebuilt
with one warning. A cache dir that cannot be written keeps the graph in memory for the
process (one warning); without a cache dir, graphs are built in memory at every start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .cache_dir import DIGESTS_FILE, GRAPH_SUFFIX, graph_dir
from .checkpoint import CHECKPOINTS, fetch, load_state_dict
from .container import MODELS, ModelSpec
from .graph import GRAPH_FORMAT, DecoderGraph, GraphUnusable, build_graph
from .settings import write_atomically

log = logging.getLogger(__name__)
T = TypeVar("T")


def file_digest(path: Path) -> str:
    """The sha256 of a file, in hex (~0.1 s for a 72 MB checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class GraphStore:
    """The decoder graphs of one engine: cached in ``cache_dir`` (None: in memory only),
    built at most once per model at a time, a model's load never waiting for another's."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self._unsaved: dict[tuple[str, str], DecoderGraph] = {}  # by (model, checkpoint sha)
        self._locks = {name: threading.Lock() for name in MODELS}

    def load(self, spec: ModelSpec, use: Callable[[DecoderGraph], T]) -> T:
        """``use(graph)`` of model ``spec``'s graph: the cached one, else (or if ``use``
        raises GraphUnusable for it) one built now from the checkpoint, fetched first.

        Raises ModelUnavailable if the checkpoint cannot be had or is not this model's.
        """
        with self._locks[spec.name]:
            checkpoint = fetch(CHECKPOINTS[spec.name], spec.name)
            sha = self.checkpoint_digest(checkpoint)
            path = self.path(spec, sha)
            if path is not None and path.exists():
                try:
                    graph = DecoderGraph.load(path)
                    if graph.checkpoint_sha != sha:
                        raise GraphUnusable("it is from another checkpoint")
                    value = use(graph)
                except GraphUnusable as exc:
                    log.warning(
                        "cached decoder graph %s is unusable (%s): rebuilding it", path, exc
                    )
                    with contextlib.suppress(OSError):
                        path.unlink()
                else:
                    log.info("loaded the decoder graph %s", path)
                    return value
            return use(self._build(spec, checkpoint, sha, path))

    def path(self, spec: ModelSpec, sha: str) -> Path | None:
        """Where model ``spec``'s graph from the checkpoint ``sha`` is cached (None: nowhere)."""
        if self.cache_dir is None:
            return None
        name = f"{spec.name}-{sha[:16]}-g{GRAPH_FORMAT}{GRAPH_SUFFIX}"
        return graph_dir(self.cache_dir) / name

    def _build(
        self, spec: ModelSpec, checkpoint: Path, sha: str, path: Path | None
    ) -> DecoderGraph:
        kept = self._unsaved.get((spec.name, sha))
        if kept is not None:
            return kept
        log.info(
            "building the decoder graph of %s from %s (once per checkpoint)", spec.name, checkpoint
        )
        graph = build_graph(spec, load_state_dict(CHECKPOINTS[spec.name], spec.name))
        graph = dataclasses.replace(graph, checkpoint_sha=sha)
        if path is None:
            log.info("no cache dir: the decoder graph of %s stays in memory", spec.name)
        else:
            try:
                write_atomically(path, graph.save)
            except OSError as exc:  # read-only, full: only costs the next start a build
                log.warning(
                    "cannot save the decoder graph of %s in %s (%s): keeping it in memory "
                    "(rebuilt at every start)",
                    spec.name,
                    path.parent,
                    exc,
                )
            else:
                log.info("saved the decoder graph %s", path)
                self._drop_stale(path)
                return graph
        self._unsaved[spec.name, sha] = graph
        return graph

    @staticmethod
    def _drop_stale(path: Path) -> None:
        """Delete ``path``'s siblings of the same model (another checkpoint or format)."""
        model = path.name.split("-", 1)[0]
        for stale in path.parent.glob(f"{model}-*{GRAPH_SUFFIX}"):
            if stale != path:
                try:
                    stale.unlink()
                except OSError as exc:
                    log.warning("cannot delete the stale decoder graph %s: %s", stale, exc)

    def checkpoint_digest(self, checkpoint: Path) -> str:
        """The sha256 of ``checkpoint``, remembered in the cache dir by the file's size, mtime
        and inode, so a start does not hash 72 MB again (~0.05-0.1 s)."""
        st = os.stat(checkpoint)
        fingerprint = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = None if self.cache_dir is None else graph_dir(self.cache_dir) / DIGESTS_FILE
        digests = _read_digests(known)
        entry = digests.get(str(checkpoint), {})
        if entry.get("fingerprint") == fingerprint and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        sha = file_digest(checkpoint)
        if known is not None:
            digests[str(checkpoint)] = {"fingerprint": fingerprint, "sha256": sha}
            with contextlib.suppress(OSError):  # only costs the next start a hash
                write_atomically(known, lambda f: f.write(json.dumps(digests).encode()))
        return sha


def _read_digests(path: Path | None) -> dict[str, dict]:
    """The remembered checkpoint digests; {} if there are none or the file is damaged."""
    if path is None:
        return {}
    try:
        digests = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(digests, dict):
        return {}
    return {key: value for key, value in digests.items() if isinstance(value, dict)}
