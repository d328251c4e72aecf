"""A SOURCE folder as the view sees it, read without ever following a symlink.

Paths are resolved one component at a time with ``O_PATH``/``O_NOFOLLOW`` descriptors, so
no content from outside SOURCE is ever served; what each name of a folder shows as (``x.ecdc``
as ``x.wav``, collisions, hidden entries) is :mod:`ecdcfs.names`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .container import MODELS, EcdcError, read_header
from .names import (
    AUDIO,
    DIR,
    FILE,
    LINK,
    audio_candidates,
    is_ecdc_name,
    kind_of,
    list_names,
    placement,
)

log = logging.getLogger(__name__)

# Headers read (in this many folders at most) to learn which models to load at mount.
WARM_UP_HEADERS, WARM_UP_FOLDERS = 64, 256
# Folders are walked with O_PATH descriptors: like a path lookup, that needs search (x)
# permission only; listing a folder opens it for reading.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class Entry:
    """What a path of the view is: its kind, its source path and the source's lstat."""

    kind: str
    source: str  # absolute source path
    st: os.stat_result


def version(path: str, st: os.stat_result) -> tuple:
    """Which version of the file at ``path`` ``st`` describes: it changes whenever the file
    may have changed (the content hash, :attr:`~ecdcfs.source.ByteSource.identity`, is what
    the decoded units are keyed by)."""
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Folder:
    """Name checks inside one open source folder (``lstat`` relative to its fd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._stats: dict[str, os.stat_result | None] = {}

    def lstat(self, name: str) -> os.stat_result | None:
        if name not in self._stats:
            try:
                self._stats[name] = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                self._stats[name] = None
        return self._stats[name]

    def exists(self, name: str) -> bool:
        st = self.lstat(name)
        return st is not None and kind_of(st.st_mode) is not None

    def is_ecdc(self, name: str) -> bool:
        if not is_ecdc_name(name):
            return False
        st = self.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode)

    def lookup(self, name: str) -> tuple[str, str, os.stat_result] | None:
        """``(kind, source name, lstat)`` of the view's entry ``name``, or None."""
        st = self.lstat(name)
        kind = None if st is None else kind_of(st.st_mode)
        if st is not None and kind is not None:
            if self.is_ecdc(name) and placement(name, self.exists, self.is_ecdc):
                return None  # shown as audio under another name
            return kind, name, st
        for source in audio_candidates(name):
            if self.is_ecdc(source) and placement(source, self.exists, self.is_ecdc) == name:
                source_st = self.lstat(source)
                assert source_st is not None  # is_ecdc: it is a regular file
                return AUDIO, source, source_st
        return None


def split(path: str) -> list[str]:
    """The components of a ``/``-rooted view path (``.`` and ``..`` name nothing)."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise FileNotFoundError(errno.ENOENT, "no such entry", path)
    return parts


@contextmanager
def open_folder(source: str, parts: list[str]) -> Iterator[tuple[Folder, str]]:
    """The folder ``parts`` of ``source`` opened without following symlinks, and its path.

    Folders keep their names in the view, so each component must be a real folder.
    """
    fd = os.open(source, _DIR_FLAGS)
    try:
        for part in parts:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                # A symlink (the kernel resolves those), or a file of the view.
                if exc.errno == errno.ELOOP or Folder(fd).lookup(part) is not None:
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", part) from None
                raise
            os.close(fd)
            fd = next_fd
        yield Folder(fd), os.path.join(source, *parts)
    finally:
        os.close(fd)


@contextmanager
def lookup(source: str, path: str) -> Iterator[tuple[Entry, Folder | None]]:
    """The entry at view path ``path`` and its open source folder (None for the root)."""
    parts = split(path)
    if not parts:
        yield Entry(DIR, source, os.lstat(source)), None
        return
    with open_folder(source, parts[:-1]) as (folder, dirpath):
        found = folder.lookup(parts[-1])
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry", path)
        kind, name, st = found
        yield Entry(kind, os.path.join(dirpath, name), st), folder


def list_folder(source: str, path: str) -> list[tuple[str, str]]:
    """``(name, kind)`` of every entry of the view's folder ``path``, sorted."""
    kinds: dict[str, str] = {}
    with open_folder(source, split(path)) as (folder, _):
        fd = os.open(".", _LIST_FLAGS, dir_fd=folder.fd)
    try:
        with os.scandir(fd) as it:  # scandir reads a duplicate of fd
            for dirent in it:
                try:
                    if dirent.is_symlink():
                        kinds[dirent.name] = LINK
                    elif dirent.is_dir(follow_symlinks=False):
                        kinds[dirent.name] = DIR
                    elif dirent.is_file(follow_symlinks=False):
                        kinds[dirent.name] = FILE
                except OSError:  # vanished meanwhile
                    continue
    finally:
        os.close(fd)
    return [(name, kind) for name, (kind, _) in sorted(list_names(kinds).items())]


def open_noatime(name: str, dir_fd: int | None = None) -> int:
    """Open to read a header without touching the source's atime (where allowed)."""
    try:
        return os.open(name, FILE_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME needs to own the file
        return os.open(name, FILE_FLAGS, dir_fd=dir_fd)


def read_all(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of ``fd`` (fewer if it is shorter now)."""
    chunks, total = [], 0
    while total < size:
        chunk = os.pread(fd, size - total, total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def models_in_use(source: str) -> set[str]:
    """Names of the models of the first .ecdc files under ``source`` (what to load at mount).

    Reads at most :data:`WARM_UP_HEADERS` headers in :data:`WARM_UP_FOLDERS` folders, so a
    huge tree costs no more; unreadable and corrupt files are skipped.
    """
    names: set[str] = set()
    headers = 0
    for folders, (folder, _, files) in enumerate(os.walk(source), 1):
        for name in sorted(filter(is_ecdc_name, files)):
            try:
                with open(open_noatime(os.path.join(folder, name)), "rb") as f:
                    st = os.fstat(f.fileno())
                    if stat.S_ISREG(st.st_mode):
                        names.add(read_header(f, st.st_size).model.name)
            except (EcdcError, OSError) as exc:
                log.debug("warm-up: skipping %s: %s", name, exc)
            headers += 1
            if headers >= WARM_UP_HEADERS or len(names) == len(MODELS):
                return names
        if folders >= WARM_UP_FOLDERS:
            break
    return names
