"""The read-only view of a SOURCE folder that ecdcfs mounts (no FUSE here).

What the view shows under which name (``x.ecdc`` as ``x.wav``, collisions, hidden
entries) is :mod:`ecdcfs.names`. Paths are resolved one component at a time with
``O_NOFOLLOW``, so no content from outside SOURCE is ever served.

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

The kernel's page cache (:meth:`SourceTree.direct_io`): audio handles bypass it, so a read
of a few header or tag bytes reaches ecdcfs as just those bytes (no page rounding, no
kernel read-ahead) and decodes nothing. Other files use it, except a handle opened while a
handle of another version of the same path is open: the kernel keeps one page cache per
path, and cached pages must never mix two versions.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from .audiofile import SCANNER_READ_BYTES, AudioFile, Reader, wav_layout
from .container import MODELS, EcdcError, ModelSpec, read_header
from .decoder import ModelUnavailable
from .engine import Engine
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

WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
# Folders are walked with O_PATH descriptors: like a path lookup, that needs search (x)
# permission only; listing a folder opens it for reading.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# Times a file that changes while it is being snapshotted is read again before giving up.
_SNAPSHOT_ATTEMPTS = 3

WARM_UP_QUIET_SECONDS = 1.0
# Headers read (in this many folders at most) to learn which models to load at mount.
WARM_UP_HEADERS, WARM_UP_FOLDERS = 64, 256


# The decoders' counters (DecodeScheduler.stats), zero before the engine starts.
_DECODER_STATS = (
    "units_decoded",
    "decodes_started",
    "decodes_interrupted",
    "cache_hits",
    "cache_misses",
    "cache_bytes",
)


@dataclass(frozen=True)
class Entry:
    """What a path of the view is: its kind, its source path and the source's lstat."""

    kind: str
    source: str  # absolute source path
    st: os.stat_result


def _identity(path: str, st: os.stat_result) -> tuple:
    """Changes whenever the file at ``path`` may have changed."""
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Folder:
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


@dataclass(frozen=True)
class _Probe:
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


class _LogOnce:
    """Logs each (file, reason) once, remembering a bounded number of them."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: LRUCache = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def __call__(self, level: int, key: tuple, msg: str, *args, exc_info=None) -> None:
        with self._lock:
            if key in self._seen:
                return
            self._seen[key] = True
        log.log(level, msg, *args, exc_info=exc_info)


class AudioHandle:
    """An open ``x.wav``: the shared AudioFile plus this handle's own Reader."""

    def __init__(self, audio: AudioFile, path: str, source: str, st: os.stat_result) -> None:
        self.audio = audio
        self.reader: Reader = audio.reader(SCANNER_READ_BYTES)
        self.path = path  # the view's path (the kernel's page cache is per path)
        self.st = st  # the source's stat when opened (the version the snapshot holds)
        self.version = _identity(source, st)
        self.direct_io = False

    def close(self) -> None:
        self.reader.close()


class FileHandle:
    """An open passthrough file: a read-only descriptor of the source file."""

    def __init__(self, fd: int, path: str, source: str, st: os.stat_result) -> None:
        self.fd = fd
        self.path = path
        self.version = _identity(source, st)
        self.direct_io = False

    def close(self) -> None:
        os.close(self.fd)


class SourceTree:
    """The view of ``source`` (see the module doc). Paths are ``/``-rooted view paths.

    Thread-safe: FUSE calls every method from many threads at once.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        engine_factory: Callable[[], Engine] = Engine,
        probe_cache_size: int = 16384,
        audio_cache_size: int = 32,
        riff_info: bool = False,
    ) -> None:
        self.source = os.path.realpath(os.fspath(source))
        self.riff_info = riff_info  # WAVs with LIST/INFO tags too (see ecdcfs.wav)
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._probes: LRUCache = LRUCache(maxsize=probe_cache_size)
        # Why a version (_identity) of a file failed to open or read, for error().
        self._errors: LRUCache = LRUCache(maxsize=probe_cache_size)
        self._audio: LRUCache = LRUCache(maxsize=audio_cache_size)
        self._handles: dict[int, AudioHandle | FileHandle] = {}
        self._next_fh = itertools.count(1)
        self._closed = False
        self._bytes_served = 0
        self.log_once = _LogOnce()
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
        """Names of the models of the first .ecdc files under the source.

        Reads at most :data:`WARM_UP_HEADERS` headers in :data:`WARM_UP_FOLDERS` folders,
        so a huge tree costs no more; unreadable and corrupt files are skipped.
        """
        names: set[str] = set()
        headers = 0
        for folders, (folder, _, files) in enumerate(os.walk(self.source), 1):
            for name in sorted(filter(is_ecdc_name, files)):
                try:
                    with open(_open_noatime(os.path.join(folder, name)), "rb") as f:
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

    def close(self) -> None:
        """Close every handle and the engine (at unmount)."""
        with self._lock:
            self._closed = True
            handles, self._handles = list(self._handles.values()), {}
            engine, self._engine = self._engine, None
            self._audio.clear()
        for handle in handles:
            try:
                handle.close()
            except Exception:  # best effort at shutdown
                log.debug("closing a handle failed", exc_info=True)
        if engine is not None:
            engine.close()

    # ----- path resolution ----------------------------------------------------------

    @staticmethod
    def _split(path: str) -> list[str]:
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise FileNotFoundError(errno.ENOENT, "no such entry", path)
        return parts

    @contextmanager
    def _folder(self, parts: list[str]) -> Iterator[tuple[_Folder, str]]:
        """The source folder ``parts`` opened without following symlinks, and its path.

        Folders keep their names in the view, so each component must be a real folder.
        """
        fd = os.open(self.source, _DIR_FLAGS)
        try:
            for part in parts:
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    # A symlink (the kernel resolves those), or a file of the view.
                    if exc.errno == errno.ELOOP or _Folder(fd).lookup(part) is not None:
                        raise NotADirectoryError(errno.ENOTDIR, "not a directory", part) from None
                    raise
                os.close(fd)
                fd = next_fd
            yield _Folder(fd), os.path.join(self.source, *parts)
        finally:
            os.close(fd)

    @contextmanager
    def _lookup(self, path: str) -> Iterator[tuple[Entry, _Folder | None]]:
        """The view's entry at ``path`` and its open source folder (None for the root)."""
        parts = self._split(path)
        if not parts:
            yield Entry(DIR, self.source, os.lstat(self.source)), None
            return
        with self._folder(parts[:-1]) as (folder, dirpath):
            found = folder.lookup(parts[-1])
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "no such entry", path)
            kind, name, st = found
            yield Entry(kind, os.path.join(dirpath, name), st), folder

    def resolve(self, path: str) -> Entry:
        """The view's entry at ``path``; FileNotFoundError if there is none."""
        with self._lookup(path) as (entry, _):
            return entry

    # ----- metadata -----------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict:
        """stat(2)-like attributes (times in nanoseconds); never decodes.

        With the handle of an open file, the attributes are those of the version it reads,
        even if the source has been replaced or deleted since. (The kernel passes the handle
        when a read needs the size; its ``fstat`` asks by path, so once the source is
        deleted and the cached attributes expire, ``fstat`` fails with ENOENT while reads
        go on.)
        """
        self._last_activity = time.monotonic()
        with self._lock:
            handle = self._handles.get(fh) if fh else None
        if isinstance(handle, AudioHandle):
            return _attributes(AUDIO, handle.st, handle.audio.size)
        if isinstance(handle, FileHandle):
            return _attributes(FILE, os.fstat(handle.fd))
        with self._lookup(path) as (entry, folder):
            size = self._probe(entry, folder).size if entry.kind == AUDIO else None
            return _attributes(entry.kind, entry.st, size)

    def _probe(self, entry: Entry, folder: _Folder | None) -> _Probe:
        """What the header of the .ecdc ``entry`` says (cached per version of the file)."""
        assert folder is not None  # only the root has none, and it is a folder
        key = _identity(entry.source, entry.st)
        with self._lock:
            probe = self._probes.get(key)
        if probe is None:
            try:
                fd = _open_noatime(os.path.basename(entry.source), folder.fd)
                with open(fd, "rb") as f:
                    header = read_header(f, os.fstat(f.fileno()).st_size)
                size = wav_layout(header, self.riff_info).size
                probe = _Probe(size, header.model, header.use_lm)
            except (EcdcError, OSError) as exc:
                log.debug("cannot probe %s: %s", entry.source, exc)
                probe = _Probe(0, error=_reason(exc))
            with self._lock:
                self._probes[key] = probe
        return probe

    def error(self, path: str) -> str | None:
        """Why the audio file ``path`` cannot be read; None if no reason is known (it has
        read fine, or not been read yet, or is no audio file). Never decodes or loads."""
        with self._lookup(path) as (entry, folder):
            if entry.kind != AUDIO:
                return None
            probe = self._probe(entry, folder)
        if probe.error is not None:
            return probe.error
        with self._lock:
            reason = self._errors.get(_identity(entry.source, entry.st))
            engine = self._engine
        if reason is None and engine is not None and probe.model is not None:
            reason = engine.failure(probe.model, probe.use_lm)
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
        kinds: dict[str, str] = {}
        with self._folder(self._split(path)) as (folder, _):
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
        types = {DIR: stat.S_IFDIR, FILE: stat.S_IFREG, LINK: stat.S_IFLNK, AUDIO: stat.S_IFREG}
        return [(name, types[kind]) for name, (kind, _) in sorted(list_names(kinds).items())]

    def readlink(self, path: str) -> str:
        with self._lookup(path) as (entry, folder):
            if entry.kind != LINK:
                raise OSError(errno.EINVAL, "not a symlink", path)
            assert folder is not None  # only the root has none, and it is a folder
            return os.readlink(os.path.basename(entry.source), dir_fd=folder.fd)

    def statfs(self) -> dict:
        """The source file system's figures: ``df`` shows the disk the library is on, its
        size and free space (not a full disk, which monitors alert on)."""
        sv = os.statvfs(self.source)
        fields = ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail")
        return {f"f_{name}": getattr(sv, f"f_{name}") for name in (*fields, "namemax")}

    # ----- open files ---------------------------------------------------------------

    def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        """A handle number for reading ``path``; OSError(EROFS) for any write access."""
        self._last_activity = time.monotonic()
        if flags & _WRITE_FLAGS:
            raise OSError(errno.EROFS, "read-only file system", path)
        with self._lookup(path) as (entry, folder):
            if entry.kind == DIR:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            if entry.kind == LINK:  # the kernel follows symlinks itself
                raise OSError(errno.ELOOP, "is a symlink", path)
            assert folder is not None  # only the root has none, and it is a folder
            fd = os.open(os.path.basename(entry.source), _FILE_FLAGS, dir_fd=folder.fd)
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
            handle.direct_io = isinstance(handle, AudioHandle) or any(
                other.path == path and other.version != handle.version
                for other in self._handles.values()
            )
            fh = next(self._next_fh)
            self._handles[fh] = handle
        return fh

    def direct_io(self, fh: int) -> bool:
        """Whether handle ``fh`` must bypass the kernel's page cache (see :meth:`open`)."""
        return self.handle(fh).direct_io

    def _audio_file(
        self, source: str, fd: int, st: os.stat_result
    ) -> tuple[AudioFile, os.stat_result]:
        """The AudioFile of this version of ``source`` (shared by its open handles).

        Returns it with the stat of the version it holds (the file may have changed
        since ``st`` was taken; then it is read again).
        """
        for _ in range(_SNAPSHOT_ATTEMPTS):
            key = _identity(source, st)
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
        self._failed(_identity(source, st), "open", source, error)
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
        data = _read_all(fd, min(st.st_size, header.payload_bound))
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ):
            return None
        return data

    def read(self, fh: int, size: int, offset: int) -> bytes:
        self._last_activity = time.monotonic()
        handle = self.handle(fh)
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

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.close()

    def handle(self, fh: int) -> AudioHandle | FileHandle:
        """The open handle ``fh``; OSError(EBADF) if there is none."""
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "bad file handle")
        return handle

    @property
    def engine_started(self) -> bool:
        """Whether the decoding engine exists yet (it is created by the first audio open)."""
        with self._lock:
            return self._engine is not None

    @property
    def open_handles(self) -> int:
        with self._lock:
            return len(self._handles)

    def stats(self) -> dict[str, int]:
        """Counters since the mount started (the root's ``user.ecdcfs.stats``): the
        decoders' (see :meth:`~ecdcfs.scheduler.DecodeScheduler.stats`; zeros before the
        first audio open), the bytes of audio served and the files open."""
        with self._lock:
            engine, served, handles = self._engine, self._bytes_served, list(self._handles.values())
        decoders = (
            engine.scheduler.stats() if engine is not None else dict.fromkeys(_DECODER_STATS, 0)
        )
        return {
            **decoders,
            "bytes_served": served,
            "files_open": sum(isinstance(handle, AudioHandle) for handle in handles),
        }


def _attributes(kind: str, st: os.stat_result, wav_size: int | None = None) -> dict:
    """What getattr shows for a source entry of this kind (an audio file: its WAV size)."""
    attrs = {
        "st_mode": st.st_mode if kind == LINK else st.st_mode & ~WRITE_BITS,
        "st_nlink": st.st_nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_size": st.st_size,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
        "st_blocks": st.st_blocks,
    }
    if kind == AUDIO:
        size = wav_size or 0
        attrs.update(st_size=size, st_blocks=math.ceil(size / 512), st_nlink=1)
    return attrs


def _open_noatime(name: str, dir_fd: int | None = None) -> int:
    """Open to read a header without touching the source's atime (where allowed)."""
    try:
        return os.open(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME needs to own the file
        return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)


def _read_all(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of ``fd`` (fewer if it is shorter now)."""
    chunks, total = [], 0
    while total < size:
        chunk = os.pread(fd, size - total, total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
