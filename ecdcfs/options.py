"""The options of ``ecdcfs``, stated once: :data:`OPTIONS` builds the command line's long
options and their ``-o key=value`` forms (what mount(8) and fstab pass), and a test holds
the README's option table to it. Standard library only (``--help`` stays instant)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .settings import DEFAULT_BUFSIZE, DEFAULT_CACHE_DIR_MB, DEFAULT_CACHE_MB, UsageError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# mount(8) / fstab options that mean nothing to ecdcfs or libfuse; dropped silently.
_MOUNT_ONLY = {
    "ro",
    "rw",  # mount(8) passes it by default; the mount is read-only regardless
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "_netdev",
    "nofail",
}


# What --device accepts: torch device names ecdcfs can decode on.
_DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]+)?")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _device(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N or mps)")
    return text


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.lower()


@dataclass(frozen=True)
class Option:
    """An ecdcfs option: ``--name`` on the command line, ``-o name=value`` in mount options
    (a flag: ``--name``, ``-o name``). The one table both parsers are built from."""

    name: str  # as on the command line, without the dashes
    help: str
    convert: Callable[[str], Any] | None = None  # None: a flag
    metavar: str | None = None
    short: str | None = None

    @property
    def attr(self) -> str:
        """The Config attribute, which is also the ``-o`` key."""
        return self.name.replace("-", "_")


OPTIONS = (
    Option("foreground", "stay in the foreground (default: daemonize once mounted)", short="-f"),
    Option(
        "exact",
        "decode with encodec's own PyTorch model, bit for bit (default: its decoder on ONNX "
        "Runtime, within 2 LSB, faster and smaller; the graph is built once per checkpoint "
        "into the cache dir)",
    ),
    Option(
        "device",
        "cpu, or a GPU for torch to decode on: cuda, cuda:N or mps; a GPU that is not there "
        "is refused at mount (default: cuda when an NVIDIA GPU is usable, else cpu)",
        _device,
        "DEVICE",
    ),
    Option(
        "threads",
        "decodes run in parallel on the CPU, one ONNX Runtime thread each (default: one "
        "per core, at most 4; --exact and GPUs: one at a time)",
        _positive_int,
        "N",
    ),
    Option(
        "cache-mb",
        f"memory for decoded audio, in MiB (default: {DEFAULT_CACHE_MB})",
        _positive_int,
        "N",
    ),
    Option(
        "bufsize",
        "initial read-ahead, in frames (24 kHz: chunks); grows by N per sequential step "
        f"(default: {DEFAULT_BUFSIZE})",
        _positive_int,
        "N",
    ),
    Option(
        "cache-dir",
        "where decoder graphs and code indexes of LM-coded files persist "
        "(default: $XDG_CACHE_HOME/ecdcfs, i.e. ~/.cache/ecdcfs)",
        str,
        "DIR",
    ),
    Option(
        "cache-dir-mb",
        "cap of the cache dir's code indexes in MiB; least recently used go first "
        f"(decoder graphs are not counted) (default: {DEFAULT_CACHE_DIR_MB})",
        _positive_int,
        "N",
    ),
    Option(
        "no-persist",
        "write nothing to the cache dir: code indexes in memory only, decoder graphs "
        "rebuilt at every start",
    ),
    Option("log-level", f"one of {', '.join(LOG_LEVELS)} (default: info)", _log_level, "LEVEL"),
    Option(
        "log-file",
        "append log messages to FILE (a daemon without one logs to syslog, else to "
        "$XDG_STATE_HOME/ecdcfs/ecdcfs.log)",
        str,
        "FILE",
    ),
    Option(
        "riff-info",
        "also tag each WAV with RIFF LIST/INFO that every reader finds, for software that "
        "reads no ID3 chunk (GStreamer 1.22): ffmpeg 5 then warns that it discards the ID3 "
        "tags, and MediaInfo shows a non-ASCII INFO title as Latin-1",
    ),
    Option(
        "allow-other",
        "let other users read the mount (FUSE allow_other, with default_permissions; "
        "non-root users need user_allow_other in /etc/fuse.conf)",
    ),
)
_OPTIONS_BY_KEY = {option.attr: option for option in OPTIONS}


@dataclass
class Config:
    """Everything the command line says (one attribute per :data:`OPTIONS` entry, too)."""

    source: str = ""
    mountpoint: str = ""
    unmount: bool = False
    clear_cache: bool = False
    foreground: bool = False
    exact: bool = False
    device: str | None = None
    threads: int | None = None  # None: one per core, at most 4
    cache_mb: int = DEFAULT_CACHE_MB
    bufsize: int = DEFAULT_BUFSIZE
    cache_dir: str | None = None  # None: the default ($XDG_CACHE_HOME/ecdcfs)
    cache_dir_mb: int = DEFAULT_CACHE_DIR_MB
    no_persist: bool = False
    log_level: str = "info"
    log_file: str | None = None
    riff_info: bool = False
    allow_other: bool = False
    fuse_options: dict[str, str | bool] = field(default_factory=dict)

    @property
    def persist(self) -> bool:
        return not self.no_persist


def split_options(text: str) -> list[str]:
    """Split ``-o`` text at commas; ``\\,`` is a literal comma (as libfuse reads it)."""
    items, current, chars = [], [], iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item for item in items if item]


def parse_mount_options(texts: list[str]) -> tuple[dict[str, object], dict[str, str | bool]]:
    """``-o`` texts -> (ecdcfs options by attribute name, FUSE options)."""
    ours: dict[str, object] = {}
    fuse: dict[str, str | bool] = {}
    for text in texts:
        for item in split_options(text):
            key, separator, value = item.partition("=")
            has_value = bool(separator)
            name = key.strip().replace("-", "_")
            option = _OPTIONS_BY_KEY.get(name)
            if option is not None:
                ours[name] = _option_value(option, has_value, value)
            elif name in _MOUNT_ONLY or name == "comment" or key.startswith("x-"):
                continue
            elif not name:
                raise UsageError(f"bad -o option {item!r}")
            else:
                fuse[key] = value if has_value else True
    return ours, fuse


def _option_value(option: Option, has_value: bool, value: str) -> object:
    """The value of ``-o key[=value]`` for one of our options."""
    key = option.attr
    if option.convert is None:
        if has_value:
            raise UsageError(f"-o {key} takes no value")
        return True
    if not has_value or not value:
        raise UsageError(f"-o {key} needs a value ({key}=...)")
    try:
        return option.convert(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"-o {key}: {exc}") from None
