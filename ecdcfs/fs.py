"""FUSE operations: each delegates to :class:`~ecdcfs.tree.SourceTree` (read-only).

Errors map to errno values: :class:`~ecdcfs.container.EcdcError` (a bad file, a failed
decode, a missing model) -> EIO, ``OSError`` -> its errno, any write -> EROFS. An audio
file that cannot be read says why in its extended attribute ``user.ecdcfs.error``
(:data:`ERROR_XATTR`; files that read fine have none); the root's ``user.ecdcfs.stats``
(:data:`STATS_XATTR`) holds the mount's counters as JSON. Audio files are opened with
``direct_io`` (reads reach ecdcfs as the reader made them); other files without
``keep_cache``, so the kernel drops its cached pages of a file at every open and a source
replaced since is read afresh, and with ``direct_io`` while another version of the same
path is open (:meth:`~ecdcfs.tree.SourceTree.open`).

Mounted with mfusepy's ``raw_fi`` (to set ``direct_io``), ``open`` receives the
``fuse_file_info`` and the other operations receive it in place of a handle number; they
accept plain integers as well (flags for ``open``, handle numbers otherwise).
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from mfusepy import FuseOSError, Operations

from .container import EcdcError
from .tree import FileInfo, Handle, SourceTree

log = logging.getLogger(__name__)

# The extended attribute in which an audio file that cannot be read says why.
ERROR_XATTR = "user.ecdcfs.error"
# The mount root's extended attribute with the counters of SourceTree.stats(), as JSON.
STATS_XATTR = "user.ecdcfs.stats"


def _errno(func: Callable) -> Callable:
    """Turn whatever an operation raises into a FuseOSError with the right errno."""

    @functools.wraps(func)
    def wrapper(*args: Any) -> Any:
        try:
            return func(*args)
        except FuseOSError:
            raise
        except EcdcError as exc:
            raise FuseOSError(errno.EIO) from exc
        except OSError as exc:
            raise FuseOSError(exc.errno if exc.errno else errno.EIO) from exc
        except Exception as exc:
            log.exception("unexpected error in %s%r", func.__name__, args[1:])
            raise FuseOSError(errno.EIO) from exc

    return wrapper


def _read_only(*_args: Any) -> int:
    raise FuseOSError(errno.EROFS)


def _fh(fi: Any) -> int | None:
    """The handle number of a ``fuse_file_info`` (``raw_fi``) or of a plain number."""
    return fi if fi is None or isinstance(fi, int) else fi.fh


def _stat(info: FileInfo) -> dict[str, int]:
    """A tree's FileInfo as FUSE's ``st_*`` dict (times in ns: :attr:`EcdcFS.use_ns`)."""
    return {
        "st_mode": info.mode,
        "st_size": info.size,
        "st_nlink": info.nlink,
        "st_uid": info.uid,
        "st_gid": info.gid,
        "st_atime": info.atime_ns,
        "st_mtime": info.mtime_ns,
        "st_ctime": info.ctime_ns,
        "st_blocks": info.blocks,
    }


# The statvfs fields FUSE's statfs passes on (f_<name>).
_STATVFS_FIELDS = (
    "bsize",
    "frsize",
    "blocks",
    "bfree",
    "bavail",
    "files",
    "ffree",
    "favail",
    "namemax",
)


class EcdcFS(Operations):
    """The mounted view of a SOURCE folder of ``.ecdc`` files."""

    use_ns = True

    def __init__(self, tree: SourceTree, mountpoint: str = "", warm_up: bool = True) -> None:
        self.tree = tree
        self._handles: dict[int, Handle] = {}  # FUSE's handle numbers
        self._next_fh = itertools.count(1)
        self._lock = threading.Lock()
        self.mountpoint = mountpoint  # for messages (libfuse passes "/" to init and destroy)
        self.warm_up = warm_up  # load models with checkpoints on disk as the mount starts

    def init(self, path: str) -> None:
        # Runs in the daemon, after the fork: only now may threads start and torch load.
        log.info("serving %s on %s", self.tree.source, self.mountpoint)
        if self.warm_up:
            threading.Thread(target=self.tree.warm_up, name="ecdcfs-warm-up", daemon=True).start()

    def destroy(self, path: str) -> None:
        self.tree.close()
        log.info("unmounted %s", self.mountpoint)

    def _find(self, fi: Any) -> Handle | None:
        """The open handle a ``fuse_file_info`` or handle number names, if any."""
        with self._lock:
            return self._handles.get(_fh(fi) or 0)

    def _handle(self, fi: Any) -> Handle:
        """The open handle a ``fuse_file_info`` or handle number names (EBADF if none)."""
        handle = self._find(fi)
        if handle is None:
            raise OSError(errno.EBADF, "bad file handle")
        return handle

    @_errno
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        # An unknown handle: the path's attributes, as without one.
        return _stat(self.tree.getattr(path, self._find(fh)))

    @_errno
    def readdir(self, path: str, fh: int) -> list:
        entries = [(name, {"st_mode": mode}, 0) for name, mode in self.tree.readdir(path)]
        return [".", "..", *entries]

    @_errno
    def readlink(self, path: str) -> str:
        return self.tree.readlink(path)

    @_errno
    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise FuseOSError(errno.EROFS)
        self.tree.resolve(path)
        return 0

    @_errno
    def open(self, path: str, fi: Any) -> int:
        handle = self.tree.open(path, fi if isinstance(fi, int) else fi.flags)
        with self._lock:
            fh = next(self._next_fh)
            self._handles[fh] = handle
        if isinstance(fi, int):  # flags (without raw_fi): the handle number is returned
            return fh
        fi.fh, fi.direct_io = fh, handle.bypass_page_cache
        return 0

    @_errno
    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        return self.tree.read(self._handle(fh), size, offset)

    @_errno
    def release(self, path: str, fh: Any) -> int:
        with self._lock:
            handle = self._handles.pop(_fh(fh) or 0, None)
        if handle is not None:
            self.tree.release(handle)
        return 0

    @_errno
    def statfs(self, path: str) -> dict[str, int]:
        sv = self.tree.statfs()
        return {f"f_{name}": getattr(sv, f"f_{name}") for name in _STATVFS_FIELDS}

    @_errno
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if name == STATS_XATTR and path == "/":
            return json.dumps(self.tree.stats()).encode()
        reason = self.tree.error(path) if name == ERROR_XATTR else None
        if reason is None:
            raise FuseOSError(errno.ENODATA)
        return reason.encode("utf-8", "backslashreplace")

    @_errno
    def listxattr(self, path: str) -> list[str]:
        if path == "/":
            return [STATS_XATTR]
        return [ERROR_XATTR] if self.tree.error(path) is not None else []

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = _read_only
    symlink = truncate = unlink = utimens = write = setxattr = removexattr = _read_only
    fallocate = _read_only
