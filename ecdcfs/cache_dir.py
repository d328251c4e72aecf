"""The cache dir's layout, in one place: what ecdcfs keeps there and how it goes.

    <cache dir>/<content hash>.codes.npz           LM-coded files' code indexes (capped, LRU)
    <cache dir>/graphs/<model>-<sha>-g<N>.npz       decoder graphs, one a model
    <cache dir>/graphs/checkpoints.json             each checkpoint's sha256 by fingerprint

and ``<name>.<random>.tmp`` beside any of them while it is being written
(:func:`~ecdcfs.settings.write_atomically`). Standard library only (``--clear-cache``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .settings import TEMP_SUFFIX

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".codes.npz"  # of a code index, named by its file's content hash
GRAPH_SUFFIX = ".npz"  # of a decoder graph in graph_dir()
DIGESTS_FILE = "checkpoints.json"  # in graph_dir(): each checkpoint's sha256 by fingerprint


def index_path(cache_dir: Path, identity: str) -> Path:
    """Where the code index of the file whose content hash is ``identity`` persists."""
    return cache_dir / f"{identity}{INDEX_SUFFIX}"


def graph_dir(cache_dir: Path) -> Path:
    """Where each model's decoder graph (and the checkpoints' digests) persist."""
    return cache_dir / "graphs"


def cache_files(directory: Path, suffix: str = INDEX_SUFFIX) -> Iterator[os.DirEntry]:
    """The files of ``directory`` that ecdcfs wrote: ``*<suffix>`` (indexes by default)
    and their temp files."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        name = entry.name
        ours = name.endswith(suffix) or (suffix + "." in name and name.endswith(TEMP_SUFFIX))
        if ours and entry.is_file(follow_symlinks=False):
            yield entry


def enforce_cap(directory: Path, max_bytes: int, keep: Path | None = None) -> int:
    """Delete the least recently used indexes until ``directory`` holds ``max_bytes``.

    ``keep`` (the index just written) goes last. Returns the number of files deleted.
    """
    files = []
    for entry in cache_files(directory):
        with contextlib.suppress(OSError):  # vanished meanwhile
            st = entry.stat(follow_symlinks=False)
            files.append((entry.path == str(keep), st.st_mtime_ns, st.st_size, entry.path))
    total = sum(size for _, _, size, _ in files)
    deleted = 0
    for _, _, size, path in sorted(files):  # oldest first, ``keep`` last
        if total <= max_bytes:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete %s from the cache: %s", path, exc)
            continue
        total -= size
        deleted += 1
    if deleted:
        log.info("cache %s: deleted %d least recently used indexes", directory, deleted)
    return deleted


def clear_files(directory: Path, suffix: str = INDEX_SUFFIX) -> tuple[int, int]:
    """Delete every index (or ``*<suffix>`` file) and temp file ecdcfs wrote in
    ``directory``: (files, bytes). Other files in the directory are left alone.
    """
    count = total = 0
    for entry in cache_files(directory, suffix):
        with contextlib.suppress(FileNotFoundError):
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
            count, total = count + 1, total + size
    return count, total


def clear(cache_dir: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """Delete the code indexes and the decoder graphs (with their digests) in ``cache_dir``:
    ((indexes, bytes), (graphs, bytes)). Nothing else there is touched."""
    indexes = clear_files(cache_dir)
    graphs = clear_files(graph_dir(cache_dir), suffix=GRAPH_SUFFIX)
    (graph_dir(cache_dir) / DIGESTS_FILE).unlink(missing_ok=True)
    return indexes, graphs
