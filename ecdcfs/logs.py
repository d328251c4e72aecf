"""Where the daemon's messages go: --log-file, stderr in the foreground, syslog, or a file
in the state dir when no syslog listens (containers, WSL, small servers); and saying a
file's trouble once (:class:`LogOnce`)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from .settings import UsageError, default_log_file, is_inside

if TYPE_CHECKING:
    from .options import Config

# Where syslog listens (a module constant, so that tests can point it elsewhere).
SYSLOG_SOCKET = "/dev/log"


class _Formatter(logging.Formatter):
    """Shows the bytes of a file name that is not UTF-8 as ``\\xff`` escapes.

    Such names reach Python as lone surrogates, which no handler could encode: the line
    naming the file would be lost.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that no byte stands for
            raw = text.encode("utf-8", "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")


def _syslog_listening(path: str) -> bool:
    """Whether a syslog daemon takes messages at ``path`` (its socket can outlive it)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # as SysLogHandler tries them
        with socket.socket(socket.AF_UNIX, kind) as sock:
            try:
                sock.connect(path)
                return True
            except OSError:
                continue
    return False


def _state_log_handler(cfg: Config) -> logging.Handler:
    """A daemon's log without --log-file and syslog: the state dir's file, said on stderr."""
    path = default_log_file()
    if is_inside(os.path.realpath(path), cfg.mountpoint):
        raise UsageError(
            f"no syslog ({SYSLOG_SOCKET}), and the log file {str(path)!r} would be inside "
            "MOUNTPOINT: use --log-file or set XDG_STATE_HOME"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError as exc:
        sys.stderr.write(
            f"ecdcfs: warning: no syslog ({SYSLOG_SOCKET}) and cannot write {path} "
            f"({exc.strerror}): the daemon's messages are lost (use --log-file or -f)\n"
        )
        return logging.NullHandler()
    sys.stderr.write(f"ecdcfs: no syslog ({SYSLOG_SOCKET}): the daemon logs to {path}\n")
    return handler


def setup_logging(cfg: Config) -> logging.Handler:
    """Log to --log-file, else to stderr (foreground), else to syslog, else to the state
    dir (:func:`default_log_file`)."""
    fmt = "%(asctime)s ecdcfs[%(process)d] %(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    if cfg.log_file:
        try:
            handler = logging.FileHandler(cfg.log_file)
        except OSError as exc:
            raise UsageError(f"cannot open the log file {cfg.log_file!r}: {exc.strerror}") from None
    elif cfg.foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif _syslog_listening(SYSLOG_SOCKET):
        handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        fmt = "ecdcfs[%(process)d]: %(levelname)s %(name)s: %(message)s"
    else:
        handler = _state_log_handler(cfg)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    level = getattr(logging, cfg.log_level.upper())
    root.setLevel(level)
    # mfusepy logs a traceback for every errno at debug level (-o debug shows libfuse's trace).
    logging.getLogger("fuse").setLevel(max(level, logging.WARNING))
    return handler


class LogOnce:
    """Logs each (file, reason) to ``logger`` once, remembering the last ``size`` keys."""

    def __init__(self, logger: logging.Logger, size: int = 4096) -> None:
        self._logger, self._size = logger, size
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, level: int, key: tuple, msg: str, *args, exc_info=None) -> None:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return
            self._seen[key] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
        self._logger.log(level, msg, *args, exc_info=exc_info)
