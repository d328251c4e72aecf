"""What a user can tune, with its defaults, and where ecdcfs keeps things on disk.

Standard library only: the command line imports this before it forks, and ``--help``,
``-u`` and listings must never pay for numpy or torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"  # of a file being written into a cache dir (see write_atomically)

DEFAULT_CACHE_MB = 512  # decoded-unit cache
DEFAULT_BUFSIZE = 1  # initial read-ahead, in units
DEFAULT_CACHE_DIR_MB = 256  # cap of the cache directory's code indexes (not its graphs)
MAX_DEFAULT_THREADS = 4  # parallel decodes by default: one per core, at most this many


class UsageError(Exception):
    """A command line that cannot work: one line on stderr, exit status 2 (``ecdcfs`` and
    ``ecdc-stream`` alike)."""


def is_inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _xdg_dir(variable: str, *fallback: str) -> Path:
    """``$variable``, or ``~/<fallback>`` when it is unset or empty (the XDG rule)."""
    return Path(os.environ.get(variable) or os.path.join(os.path.expanduser("~"), *fallback))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ecdcfs`` (``~/.cache/ecdcfs``): where LM code indexes persist."""
    return _xdg_dir("XDG_CACHE_HOME", ".cache") / "ecdcfs"


def default_log_file() -> Path:
    """``$XDG_STATE_HOME/ecdcfs/ecdcfs.log`` (``~/.local/state/...``): a daemon's log
    when there is neither ``--log-file`` nor a syslog to send it to."""
    return _xdg_dir("XDG_STATE_HOME", ".local", "state") / "ecdcfs" / "ecdcfs.log"


def default_threads() -> int:
    """Parallel decodes by default: one per core this process may use, at most 4."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores = len(usable) if usable else os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cores))


TORCH_EXTRA = "pip install 'ecdcfs[torch]'"  # what a user without torch runs to get it


@functools.cache
def torch_installed() -> bool:
    """Whether torch and encodec are installed (the ``ecdcfs[torch]`` extra): what
    ``--exact``, GPUs, LM-coded files and encoding need. Imports neither."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "encodec"))


def checkpoint_dir() -> Path:
    """Where torch.hub keeps (and downloads) checkpoints: ``$TORCH_HOME/hub/checkpoints``.

    The same directory as ``torch.hub.get_dir()``, without importing torch (seconds).
    """
    torch_home = os.environ.get("TORCH_HOME") or _xdg_dir("XDG_CACHE_HOME", ".cache") / "torch"
    return Path(torch_home) / "hub" / "checkpoints"


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create ``path`` with ``write(file)`` through a temp file beside it (``<name>.*.tmp``)
    and a rename: readers never see half a file, a failed write leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX, delete=False
    ) as tmp:
        try:
            write(tmp)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


@dataclass
class Settings:
    """Everything a user can tune about decoding."""

    device: str | None = None  # None: cuda when available (torch decodes), else cpu
    cache_mb: int = DEFAULT_CACHE_MB  # decoded-unit cache cap
    bufsize: int = DEFAULT_BUFSIZE  # read-ahead window, in units; grows by this much per step
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None: no persistence
    cache_dir_mb: int | None = DEFAULT_CACHE_DIR_MB  # cap of cache_dir (LRU); None: no cap
    exact: bool = False  # encodec's own torch decode (bit-exact on the CPU), one at a time
    threads: int | None = None  # parallel decodes on ONNX Runtime; None: default_threads()
