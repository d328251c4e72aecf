"""The read-only view of a SOURCE folder that ecdcfs mounts (no FUSE here: records and
handle objects; :mod:`ecdcfs.fs` speaks FUSE).

Reading the folder without following symlinks, and what each name shows as, is
:mod:`ecdcfs.folders` (and :mod:`ecdcfs.names`): no content from outside SOURCE is ever
served.

Attributes never decode and never load a model: an audio file's size comes from its
header alone (:func:`~ecdcfs.audiofile.wav_layout`), cached by the source's identity
(path, device, inode, size, mtime and ctime). Modes lose their write bits; times, owner
and link count come from the source. A corrupt or unreadable ``.ecdc`` still lists and
stats (size 0); opening it fails (:class:`~ecdcfs.container.EcdcError` or ``OSError``)
with one log line naming the file and the reason.

Reasons (:meth:`SourceTree.error`): why an audio file cannot be read, as far as is known
without decoding: its header's fault, the failure of an open or a read of that version of
the file, or the failure to load the model it needs (as long as its checkpoint has not
changed since: then the next read tries again).

Opening ``x.wav`` snapshots the source (:class:`~ecdcfs.audiofile.AudioFile`, shared by
every handle open on the same version of the file) and gives the handle its own
:class:`~ecdcfs.audiofile.Reader`. The decoding :class:`~ecdcfs.audiofile.Engine` is
created on the first audio open, so nothing decodes (and torch is not imported) before
the mount daemon has forked.

Versions: the header is validated before the file is read whole (a huge file that is not
an ECDC costs no memory), and a snapshot is taken only if the file did not change while
it was read (else it is read again, and opening fails if it keeps changing), so a
snapshot is never half old, half new. An open handle keeps reading its version, even if
the source is replaced, rewritten or deleted meanwhile.

The kernel's page cache (``Handle.bypass_page_cache``): audio handles bypass it, so a read
of a few header or tag bytes reaches ecdcfs as just those bytes (no page rounding, no
kernel read-ahead) and decodes nothing. Other files use it, except a handle opened while a
handle of another version of the same path is open: the kernel keeps one page cache per
path, and cached pages must never mix two versions.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cachetools import LRUCache

from .audiofile import SCANNER_READ_BYTES, AudioFile, Reader, wav_layout
from .container import EcdcError, ModelSpec, read_header
from .decoder import ModelUnavailable
from .engine import Engine
from .folders import (
    FILE_FLAGS,
    Entry,
    Folder,
    list_folder,
    lookup,
    models_in_use,
    open_noatime,
    read_all,
    version,
)
from .logs import LogOnce
from .names import AUDIO, DIR, FILE, LINK
from .scheduler import STATS_KEYS

log = logging.getLogger(__name__)

WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# Times a file that changes while it is being snapshotted is read again before giving up.
_SNAPSHOT_ATTEMPTS = 3

WARM_UP_QUIET_SECONDS = 1.0


class FileInfo(NamedTuple):
    """What ``stat`` shows for a path of the view (times in nanoseconds)."""

    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blocks: int  # of 512 bytes


@dataclass(frozen=True)
class _HeaderFacts:
    """What an .ecdc's header says, read without decoding: the WAV size (0 if the header is
    unusable), the model it needs, or why the header is unusable."""

    size: int
    model: ModelSpec | None = None
    use_lm: bool = False
    error: str | None = None


def _reason(exc: BaseException) -> str:
    """An error as a user reads it (an OSError without its errno number and file name)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class AudioHandle:
    """An open ``x.wav``: the shared AudioFile plus this handle's own Reader."""

    def __init__(self, audio: AudioFile, path: str, source: str, st: os.stat_result) -> None:
        self.audio = audio
        self.reader: Reader = audio.reader(SCANNER_READ_BYTES)
        self.path = path  # the view's path (the kernel's page cache is per path)
        self.st = st  # the source's stat when opened (the version the snapshot holds)
        self.version = version(source, st)
        self.bypass_page_cache = False

    def close(self) -> None:
        self.reader.close()


class FileHandle:
    """An open passthrough file: a read-only descriptor of the source file."""

    def __init__(self, fd: int, path: str, source: str, st: os.stat_result) -> None:
        self.fd = fd
        self.path = path
        self.version = version(source, st)
        self.bypass_page_cache = False

    def close(self) -> None:
        os.close(self.fd)


Handle = AudioHandle | FileHandle


class SourceTree:
    """The view of ``source`` (see the module doc). Paths are ``/``-rooted view paths.

    Thread-safe: FUSE calls every method from many threads at once.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        engine_factory: Callable[[], Engine] = Engine,
        header_cache_size: int = 16384,
        audio_cache_size: int = 32,
        riff_info: bool = False,
    ) -> None:
        self.source = os.path.realpath(os.fspath(source))
        self.riff_info = riff_info  # WAVs with LIST/INFO tags too (see ecdcfs.wav)
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._header_facts: LRUCache = LRUCache(maxsize=header_cache_size)
        # Why a version of a file failed to open or read, for error().
        self._errors: LRUCache = LRUCache(maxsize=header_cache_size)
        self._audio: LRUCache = LRUCache(maxsize=audio_cache_size)
        self._open: set[Handle] = set()
        self._closed = False
        self._bytes_served = 0
        self.log_once = LogOnce(log)
        self._last_activity = time.monotonic()  # of the last lookup or read: see warm_up

    # ----- shared machinery ---------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The decoding engine, created on first use (after the daemon has forked)."""
        with self._lock:
            if self._closed:
                raise EcdcError("the file system is shutting down")
            if self._engine is None:
                self._engine = self._engine_factory()
            return self._engine

    def warm_up(self, quiet_seconds: float = WARM_UP_QUIET_SECONDS) -> None:
        """Load the models the source's files use (in the daemon, in the background).

        Waits until the mount has been quiet for ``quiet_seconds``: importing torch (or
        onnxruntime) holds Python's GIL, which would stall a listing running meanwhile. A read
        that needs a model before then loads it itself.
        """
        while (idle := time.monotonic() - self._last_activity) < quiet_seconds:
            time.sleep(quiet_seconds - idle)
        try:
            self.engine.warm_up(self.models_in_use())
        except EcdcError:  # unmounted meanwhile
            pass
        except Exception:  # the first read that needs the model reports it again
            log.exception("loading the models in the background failed")

    def models_in_use(self) -> set[str]:
        """Names of the models of the first .ecdc files under the source (see
        :func:`~ecdcfs.folders.models_in_use`)."""
        return models_in_use(self.source)

    def close(self) -> None:
        """Close every handle and the engine (at unmount)."""
        with self._lock:
            self._closed = True
            handles, self._open = list(self._open), set()
            engine, self._engine = self._engine, None
            self._audio.clear()
        for handle in handles:
            try:
                handle.close()
            except Exception:  # best effort at shutdown
                log.debug("closing a handle failed", exc_info=True)
        if engine is not None:
            engine.close()

    # ----- metadata -----------------------------------------------------------------

    def resolve(self, path: str) -> Entry:
        """The view's entry at ``path``; FileNotFoundError if there is none."""
        with lookup(self.source, path) as (entry, _):
            return entry

    def getattr(self, path: str, handle: Handle | None = None) -> FileInfo:
        """What ``stat`` shows for ``path``; never decodes.

        With the handle of an open file, the attributes are those of the version it reads,
        even if the source has been replaced or deleted since. (The kernel passes the handle
        when a read needs the size; its ``fstat`` asks by path, so once the source is
        deleted and the cached attributes expire, ``fstat`` fails with ENOENT while reads
        go on.)
        """
        self._last_activity = time.monotonic()
        if isinstance(handle, AudioHandle):
            return _attributes(AUDIO, handle.st, handle.audio.size)
        if isinstance(handle, FileHandle):
            return _attributes(FILE, os.fstat(handle.fd))
        with lookup(self.source, path) as (entry, folder):
            size = self._facts(entry, folder).size if entry.kind == AUDIO else None
            return _attributes(entry.kind, entry.st, size)

    def _facts(self, entry: Entry, folder: Folder | None) -> _HeaderFacts:
        """What the header of the .ecdc ``entry`` says (cached per version of the file)."""
        assert folder is not None  # only the root has none, and it is a folder
        key = version(entry.source, entry.st)
        with self._lock:
            facts = self._header_facts.get(key)
        if facts is None:
            try:
                fd = open_noatime(os.path.basename(entry.source), folder.fd)
                with open(fd, "rb") as f:
                    header = read_header(f, os.fstat(f.fileno()).st_size)
                size = wav_layout(header, self.riff_info).size
                facts = _HeaderFacts(size, header.model, header.use_lm)
            except (EcdcError, OSError) as exc:
                log.debug("cannot read the header of %s: %s", entry.source, exc)
                facts = _HeaderFacts(0, error=_reason(exc))
            with self._lock:
                self._header_facts[key] = facts
        return facts

    def error(self, path: str) -> str | None:
        """Why the audio file ``path`` cannot be read; None if no reason is known (it has
        read fine, or not been read yet, or is no audio file). Never decodes or loads."""
        with lookup(self.source, path) as (entry, folder):
            if entry.kind != AUDIO:
                return None
            facts = self._facts(entry, folder)
        if facts.error is not None:
            return facts.error
        with self._lock:
            reason = self._errors.get(version(entry.source, entry.st))
            engine = self._engine
        if reason is None and engine is not None and facts.model is not None:
            reason = engine.failure(facts.model, facts.use_lm)
        return reason

    def _failed(self, version: tuple, verb: str, name: str, exc: BaseException) -> None:
        """Log (once) and remember why ``version`` of the file ``name`` failed to ``verb``."""
        reason = _reason(exc)
        with self._lock:
            self._errors[version] = reason
        self.log_once(logging.ERROR, (name, reason), "cannot %s %s: %s", verb, name, reason)

    def readdir(self, path: str) -> list[tuple[str, int]]:
        """``(name, file type bits)`` of every entry of the view's folder ``path``."""
        self._last_activity = time.monotonic()
        types = {DIR: stat.S_IFDIR, FILE: stat.S_IFREG, LINK: stat.S_IFLNK, AUDIO: stat.S_IFREG}
        return [(name, types[kind]) for name, kind in list_folder(self.source, path)]

    def readlink(self, path: str) -> str:
        with lookup(self.source, path) as (entry, folder):
            if entry.kind != LINK:
                raise OSError(errno.EINVAL, "not a symlink", path)
            assert folder is not None  # only the root has none, and it is a folder
            return os.readlink(os.path.basename(entry.source), dir_fd=folder.fd)

    def statfs(self) -> os.statvfs_result:
        """The source file system's figures: ``df`` shows the disk the library is on, its
        size and free space (not a full disk, which monitors alert on)."""
        return os.statvfs(self.source)

    # ----- open files ---------------------------------------------------------------

    def open(self, path: str, flags: int = os.O_RDONLY) -> Handle:
        """A handle for reading ``path``; OSError(EROFS) for any write access."""
        self._last_activity = time.monotonic()
        if flags & _WRITE_FLAGS:
            raise OSError(errno.EROFS, "read-only file system", path)
        with lookup(self.source, path) as (entry, folder):
            if entry.kind == DIR:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            if entry.kind == LINK:  # the kernel follows symlinks itself
                raise OSError(errno.ELOOP, "is a symlink", path)
            assert folder is not None  # only the root has none, and it is a folder
            fd = os.open(os.path.basename(entry.source), FILE_FLAGS, dir_fd=folder.fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "changed while opening", path)
            audio = None
            if entry.kind == AUDIO:
                audio, st = self._audio_file(entry.source, fd, st)
        except BaseException:
            os.close(fd)
            raise
        handle: AudioHandle | FileHandle
        if audio is None:
            handle = FileHandle(fd, path, entry.source, st)
        else:
            os.close(fd)
            handle = AudioHandle(audio, path, entry.source, st)
        with self._lock:
            # Audio bypasses the kernel's page cache: a read asks for exactly the bytes the
            # reader asked for, not whole pages or a read-ahead window, so reading the header
            # or the last bytes never decodes. Other files bypass it while another version of
            # the same path is open: the kernel caches pages per path, and they must not mix.
            handle.bypass_page_cache = isinstance(handle, AudioHandle) or any(
                other.path == path and other.version != handle.version for other in self._open
            )
            self._open.add(handle)
        return handle

    def _audio_file(
        self, source: str, fd: int, st: os.stat_result
    ) -> tuple[AudioFile, os.stat_result]:
        """The AudioFile of this version of ``source`` (shared by its open handles).

        Returns it with the stat of the version it holds (the file may have changed
        since ``st`` was taken; then it is read again).
        """
        for _ in range(_SNAPSHOT_ATTEMPTS):
            key = version(source, st)
            with self._lock:
                audio = self._audio.get(key)
            if audio is not None:
                return audio, st
            try:
                data = self._snapshot(fd, st)
                if data is None:  # changed while being read: take the new version
                    st = os.fstat(fd)
                    continue
                audio = self.engine.open(Path(source), data, self.riff_info)
            except ModelUnavailable:
                raise  # error() asks the engine (see Engine.failure), which logs it once
            except EcdcError as exc:
                self._failed(key, "open", source, exc)
                raise
            except OSError as exc:
                self._failed(key, "read", source, exc)
                raise
            with self._lock:
                return self._audio.setdefault(key, audio), st
        error = EcdcError(f"it kept changing while being read ({_SNAPSHOT_ATTEMPTS} attempts)")
        self._failed(version(source, st), "open", source, error)
        raise error

    @staticmethod
    def _snapshot(fd: int, st: os.stat_result) -> bytes | None:
        """The bytes of the version ``st`` describes; None if the file changed meanwhile.

        Bytes are read through our O_NOFOLLOW descriptor, never through a symlink, and
        the header is validated first, before anything large is read or the engine (its
        threads, later torch) is woken for a bad file.
        """
        with open(fd, "rb", closefd=False) as f:
            header = read_header(f, st.st_size)
        data = read_all(fd, min(st.st_size, header.payload_bound))
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ):
            return None
        return data

    def read(self, handle: Handle, size: int, offset: int) -> bytes:
        self._last_activity = time.monotonic()
        self._check_open(handle)
        if isinstance(handle, FileHandle):
            return os.pread(handle.fd, size, offset)
        audio = handle.audio
        pcm_start = len(audio.wav.header)
        if offset < pcm_start:
            # A read of the header ends where the PCM begins (a short read, which direct_io
            # hands on as it is): a buffered reader that refills from a chunk header, the
            # data chunk's included, reads no audio (and decodes nothing) until it asks.
            size = min(size, pcm_start - offset)
        try:
            data = handle.reader.read(offset, size)
            with self._lock:
                self._bytes_served += len(data)
            return data
        except ModelUnavailable:
            raise  # the engine logs it once and remembers it (see error())
        except EcdcError as exc:
            self._failed(handle.version, "decode", audio.name, exc)
            raise
        except Exception as exc:  # a bug: report it once per file, fail the read
            error = EcdcError(f"unexpected error: {exc!r}")
            self.log_once(
                logging.ERROR,
                (audio.name, repr(exc)),
                "unexpected error reading %s",
                audio.name,
                exc_info=True,
            )
            with self._lock:
                self._errors[handle.version] = str(error)
            raise error from exc

    def release(self, handle: Handle) -> None:
        with self._lock:
            if handle not in self._open:
                return
            self._open.discard(handle)
        handle.close()

    def _check_open(self, handle: Handle) -> None:
        """OSError(EBADF) unless ``handle`` is open."""
        with self._lock:
            if handle not in self._open:
                raise OSError(errno.EBADF, "bad file handle")

    @property
    def engine_started(self) -> bool:
        """Whether the decoding engine exists yet (it is created by the first audio open)."""
        with self._lock:
            return self._engine is not None

    @property
    def open_handles(self) -> int:
        with self._lock:
            return len(self._open)

    def stats(self) -> dict[str, int]:
        """Counters since the mount started (the root's ``user.ecdcfs.stats``): the
        decoders' (see :meth:`~ecdcfs.scheduler.DecodeScheduler.stats`; zeros before the
        first audio open), the bytes of audio served and the files open."""
        with self._lock:
            engine, served, handles = self._engine, self._bytes_served, list(self._open)
        decoders = engine.scheduler.stats() if engine is not None else dict.fromkeys(STATS_KEYS, 0)
        return {
            **decoders,
            "bytes_served": served,
            "files_open": sum(isinstance(handle, AudioHandle) for handle in handles),
        }


def _attributes(kind: str, st: os.stat_result, wav_size: int | None = None) -> FileInfo:
    """What stat shows for a source entry of this kind (an audio file: its WAV size)."""
    mode = st.st_mode if kind == LINK else st.st_mode & ~WRITE_BITS
    size, blocks, nlink = st.st_size, st.st_blocks, st.st_nlink
    if kind == AUDIO:
        size = wav_size or 0
        blocks, nlink = math.ceil(size / 512), 1
    times = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
    return FileInfo(mode, size, nlink, st.st_uid, st.st_gid, *times, blocks)
