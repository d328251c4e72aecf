"""The ``ecdcfs`` command: mount a folder of .ecdc files as .wav files, or unmount it."""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from . import version
from .cache_dir import clear
from .logs import setup_logging
from .mounts import mount_points, unmount
from .options import OPTIONS, Config, parse_mount_options
from .settings import (
    TORCH_EXTRA,
    Settings,
    UsageError,
    checkpoint_dir,
    default_cache_dir,
    is_inside,
    torch_installed,
)

log = logging.getLogger("ecdcfs")

DESCRIPTION = """\
Mount SOURCE, a folder of Encodec .ecdc files, at MOUNTPOINT, read-only: every x.ecdc
appears as x.wav (16-bit PCM, exact size, seekable), decoded on demand; subfolders and
other files (cover art, playlists...) are shown unchanged; symlinks are shown as symlinks.
If a real x.wav sits next to x.ecdc, the decoded one is shown as x.ecdc.wav."""

EPILOG = """\
-o options:
  Every long option can also be given as -o key=value (a flag as -o key), e.g.
    -o device=cpu,cache_mb=256,bufsize=2,log_level=debug,allow_other,no_persist
  (dashes or underscores). Other -o options go to FUSE, e.g. allow_root, uid=N, gid=N,
  umask=NNN, attr_timeout=S, entry_timeout=S, max_read=N, auto_unmount, debug.
  mount(8)-only options (ro, rw, defaults, noauto, user, _netdev, nofail...) are
  ignored, so mount(8) and fstab work (the mount is always read-only):
    mount -t fuse.ecdcfs /music/ecdc /music/wav -o allow_other,cache_mb=1024
    /music/ecdc  /music/wav  fuse.ecdcfs  allow_other,cache_mb=1024  0 0
  mount(8) runs ecdcfs through mount.fuse3 with a default PATH (/usr/local/bin, /usr/bin,
  ...): link ecdcfs there, or name it in full with type fuse:
    /path/to/.venv/bin/ecdcfs#/music/ecdc  /music/wav  fuse  allow_other  0 0

cache directory:
  --cache-dir (default $XDG_CACHE_HOME/ecdcfs) holds each model's decoder graph (graphs/,
  ~30 MB a model, built once per checkpoint and graph format, ~1 s; never evicted) and
  the code indexes of LM-coded files, at most --cache-dir-mb MiB of them (least recently
  used deleted first). A cache directory that cannot be written (read-only, full) only
  costs persistence. ecdcfs --clear-cache [--cache-dir DIR] deletes the indexes and
  graphs (nothing else) and exits.

decoding:
  Listing never decodes. By default frames decode on ONNX Runtime, several at once, with
  each model's decoder graph built by ecdcfs from its checkpoint (no torch) and kept in
  the cache dir. torch is needed only for --exact (encodec's own PyTorch model, bit for
  bit), a GPU (--device cuda) and the LM of LM-coded files: pip install 'ecdcfs[torch]';
  without it these options are refused at mount and LM-coded files fail to open (EIO).
  The decoders load in the daemon once it has started: in the background right away
  for checkpoints already on disk, else at the first read.
  Checkpoints live in $TORCH_HOME/hub/checkpoints (~/.cache/torch/hub/checkpoints), as
  torch.hub keeps them, and are downloaded there from encodec's URL if missing; if one is
  missing offline, one line in the log says which file, its URL and where it belongs,
  and reads of that model's files fail with EIO until it is copied there (no remount
  needed: the next read after the file appears uses it). A corrupt .ecdc lists
  with size 0 and fails to open with EIO; one log line names it and says why.
  A .wav that cannot be read carries the reason in its extended attribute
  user.ecdcfs.error (getfattr -d x.wav); files that read fine have none.

logging:
  In the foreground messages go to stderr (or --log-file); a daemon logs to --log-file,
  else to syslog (/dev/log), else (containers, WSL: no syslog listening) to
  $XDG_STATE_HOME/ecdcfs/ecdcfs.log (~/.local/state/ecdcfs/), as it says at mount.

refused at mount (exit status 2, one line):
  a MOUNTPOINT that is already mounted (unmount it first) or not empty (unless
  -o nonempty), a --device that is not
  one, or a GPU that is not there (--device cuda without CUDA, cuda:N past the last),
  --exact or a GPU without torch.

unmounting:
  ecdcfs -u MOUNTPOINT, or fusermount3 -u MOUNTPOINT. -u also clears a dead mount
  ("Transport endpoint is not connected") left by a killed daemon. SIGTERM or SIGINT
  to the daemon unmounts cleanly."""


# Whether a GPU device exists, asked in a child process: torch takes seconds to import and
# starts threads, and neither may happen before libfuse forks the daemon.
_DEVICE_PROBE = """\
import sys, torch
device = sys.argv[1]
kind, _, number = device.partition(":")
if kind == "mps":
    sys.exit(0 if torch.backends.mps.is_available() else "MPS is not available here")
count = torch.cuda.device_count() if torch.cuda.is_available() else 0
if count == 0:
    sys.exit("no CUDA device is available here (torch.cuda.is_available() is False)")
if int(number or 0) >= count:
    sys.exit(f"no such CUDA device: this machine has {count} (cuda:0 to cuda:{count - 1})")
"""
DEVICE_CHECK_SECONDS = 120


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the whole usage
        raise UsageError(f"{message} (see ecdcfs --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ecdcfs",
        usage="ecdcfs SOURCE MOUNTPOINT [options]\n       ecdcfs -u MOUNTPOINT\n"
        "       ecdcfs --clear-cache [--cache-dir DIR]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="SOURCE MOUNTPOINT",
        help="folder of .ecdc files, and the (existing) folder to mount it on",
    )
    p.add_argument(
        "-u",
        "--unmount",
        action="store_true",
        help="unmount MOUNTPOINT (also a dead mount) and exit",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: any long option as key=value, or FUSE options",
    )
    for option in OPTIONS:
        flags = [f"--{option.name}", *([option.short] if option.short else [])]
        if option.convert is None:  # None when not given, so that -o can set it
            p.add_argument(*flags, action="store_true", default=None, help=option.help)
        else:
            p.add_argument(*flags, type=option.convert, metavar=option.metavar, help=option.help)
    p.add_argument(
        "--clear-cache",
        action="store_true",
        help="delete the code indexes and decoder graphs in the cache dir (--cache-dir, or "
        "the default) and exit",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line as a Config; UsageError if it makes no sense (no file checks)."""
    args = build_parser().parse_args(argv)
    ours, fuse = parse_mount_options(args.options)
    cfg = Config(unmount=args.unmount, clear_cache=args.clear_cache, fuse_options=fuse)
    for option in OPTIONS:  # a long option wins over its -o form
        value = getattr(args, option.attr)
        value = ours.get(option.attr) if value is None else value
        if value is not None:
            setattr(cfg, option.attr, value)
    if args.clear_cache:
        if args.unmount or args.paths:
            raise UsageError("--clear-cache takes no SOURCE, MOUNTPOINT or -u")
        return cfg
    if args.unmount:
        if len(args.paths) != 1:
            raise UsageError("-u takes exactly one argument: the MOUNTPOINT")
        cfg.mountpoint = args.paths[0]
        return cfg
    if len(args.paths) != 2:
        raise UsageError("expected SOURCE and MOUNTPOINT")
    cfg.source, cfg.mountpoint = args.paths
    return cfg


def check_paths(cfg: Config) -> None:
    """Resolve SOURCE, MOUNTPOINT and the other paths; UsageError if they cannot work.

    The daemon must never read its own mount point (it would wait on itself), so neither
    folder may contain the other, nor may the cache or log file live under the mount.
    """
    source = os.path.realpath(cfg.source)
    if not os.path.isdir(source):
        raise UsageError(f"SOURCE {cfg.source!r} is not a directory")
    try:
        is_dir = stat.S_ISDIR(os.stat(cfg.mountpoint).st_mode)
        if is_dir:
            os.statvfs(cfg.mountpoint)  # not answered from a cache: finds a dead mount
    except OSError as exc:
        hint = " (a dead mount? try: ecdcfs -u MOUNTPOINT)" if exc.errno == errno.ENOTCONN else ""
        raise UsageError(f"MOUNTPOINT {cfg.mountpoint!r}: {exc.strerror}{hint}") from None
    if not is_dir:
        raise UsageError(f"MOUNTPOINT {cfg.mountpoint!r} is not a directory")
    mountpoint = os.path.realpath(cfg.mountpoint)
    # libfuse would only say "not empty" and suggest -o nonempty, which stacks a second mount.
    mounted = mount_points().get(mountpoint)
    if mounted:
        raise UsageError(
            f"MOUNTPOINT {cfg.mountpoint!r} is already mounted ({mounted}); "
            "unmount it first (ecdcfs -u MOUNTPOINT)"
        )
    if is_inside(mountpoint, source):
        raise UsageError(f"MOUNTPOINT {cfg.mountpoint!r} is inside SOURCE {cfg.source!r}")
    if is_inside(source, mountpoint):
        raise UsageError(f"SOURCE {cfg.source!r} is inside MOUNTPOINT {cfg.mountpoint!r}")
    cfg.source, cfg.mountpoint = source, mountpoint
    if cfg.persist:
        cfg.cache_dir = os.path.realpath(cfg.cache_dir or default_cache_dir())
        if is_inside(cfg.cache_dir, mountpoint):
            raise UsageError(f"the cache dir {cfg.cache_dir!r} is inside MOUNTPOINT")
    if cfg.log_file:
        cfg.log_file = os.path.realpath(cfg.log_file)
        if is_inside(cfg.log_file, mountpoint):
            raise UsageError(f"the log file {cfg.log_file!r} is inside MOUNTPOINT")
    hub = os.path.realpath(checkpoint_dir().parent)
    if is_inside(hub, mountpoint):
        raise UsageError(f"the model checkpoints ({hub}, TORCH_HOME) are inside MOUNTPOINT")
    if not cfg.fuse_options.get("nonempty") and os.listdir(cfg.mountpoint):
        raise UsageError(
            f"MOUNTPOINT {cfg.mountpoint!r} is not empty: mount on an empty folder "
            "(-o nonempty mounts over what is there, hiding it)"
        )


def check_device(device: str | None, exact: bool) -> None:
    """UsageError unless torch is there for ``exact`` or a GPU, and ``device`` exists here
    (a GPU is looked for in a child process)."""
    if exact and not torch_installed():
        raise UsageError(f"--exact needs torch: {TORCH_EXTRA}")
    if device is None or device == "cpu":
        return
    if not torch_installed():
        raise UsageError(f"--device {device} needs torch: {TORCH_EXTRA}")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _DEVICE_PROBE, device],
            capture_output=True,
            text=True,
            timeout=DEVICE_CHECK_SECONDS,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"--device {device}: cannot check that it exists ({exc})") from None
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"the check exited with {done.returncode}"
        raise UsageError(f"--device {device}: {reason}; use --device cpu, or leave it out")


def fuse_options(cfg: Config) -> dict[str, str | bool]:
    """The FUSE mount options: ``mount``, ``findmnt`` and ``df`` show SOURCE as the device
    and ``fuse.ecdcfs`` as the type (libfuse reads ``\\`` and ``\\,`` as escapes)."""
    source = os.path.realpath(cfg.source).replace("\\", "\\\\").replace(",", "\\,")
    options: dict[str, str | bool] = {"ro": True, "fsname": source, "subtype": "ecdcfs"}
    if cfg.allow_other:
        options.update(allow_other=True, default_permissions=True)
    options.update(cfg.fuse_options)
    return options


def mount(cfg: Config) -> int:
    """Mount and serve until unmounted (in a daemon unless ``cfg.foreground``)."""
    from mfusepy import FUSE

    from .engine import Engine
    from .fs import EcdcFS
    from .tree import SourceTree

    settings = Settings(
        device=cfg.device,
        exact=cfg.exact,
        threads=cfg.threads,
        cache_mb=cfg.cache_mb,
        bufsize=cfg.bufsize,
        cache_dir=Path(cfg.cache_dir) if cfg.persist and cfg.cache_dir else None,
        cache_dir_mb=cfg.cache_dir_mb,
    )
    # Nothing may start a thread or import torch before libfuse forks the daemon: the
    # engine is created by the first open, in the daemon.
    tree = SourceTree(cfg.source, engine_factory=lambda: Engine(settings), riff_info=cfg.riff_info)
    log.debug("mounting %s on %s with %s", cfg.source, cfg.mountpoint, fuse_options(cfg))
    try:
        FUSE(
            EcdcFS(tree, cfg.mountpoint),
            cfg.mountpoint,
            foreground=cfg.foreground,
            encoding=sys.getfilesystemencoding(),
            errors="surrogateescape",
            raw_fi=True,  # open sets direct_io (see ecdcfs.fs)
            **fuse_options(cfg),
        )
    except RuntimeError as exc:
        log.error("mounting %s on %s failed (%s)", cfg.source, cfg.mountpoint, exc)
        sys.stderr.write(
            f"ecdcfs: error: cannot mount {cfg.mountpoint!r} (see the message above)\n"
        )
        return 1
    finally:
        tree.close()
    return 0


def clear_cache(cfg: Config) -> int:
    """Delete the code indexes and decoder graphs in the cache directory (nothing else)."""
    directory = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    try:
        (count, size), (graphs, graph_size) = clear(directory)
    except OSError as exc:
        sys.stderr.write(f"ecdcfs: error: cannot clear {str(directory)!r}: {exc}\n")
        return 1
    print(
        f"ecdcfs: deleted {count} code indexes ({size / 2**20:.1f} MiB) and {graphs} decoder "
        f"graphs ({graph_size / 2**20:.1f} MiB) from {directory}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.clear_cache:
            return clear_cache(cfg)
        if cfg.unmount:
            return unmount(cfg.mountpoint)
        check_paths(cfg)
        check_device(cfg.device, cfg.exact)
        setup_logging(cfg)
    except UsageError as exc:
        sys.stderr.write(f"ecdcfs: error: {exc}\n")
        return 2
    return mount(cfg)
