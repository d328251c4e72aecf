"""The mount table: what is mounted where (a dead FUSE mount included), and unmounting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def _unescape_mount_path(text: str) -> str:
    """Mount points in /proc/self/mountinfo escape space, tab, newline and backslash."""
    raw = text.encode("utf-8", "surrogateescape")
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


def mount_points() -> dict[str, str]:
    """Every mount point of this mount namespace (a dead FUSE mount included) and the type
    of the file system mounted there (the last one mounted, if several are)."""
    points: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split(" ")
                if len(fields) > 4:
                    # Optional fields end at "-", which the file system type follows.
                    kind = fields[fields.index("-", 6) + 1] if "-" in fields[6:] else "?"
                    points[_unescape_mount_path(fields[4])] = kind
    except OSError:
        pass
    return points


def is_mounted(path: str) -> bool:
    points = mount_points()
    if points:
        return os.path.abspath(path) in points
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def unmount(mountpoint: str) -> int:
    """Unmount with fusermount3, fusermount, then lazily; 0 on success."""
    # Resolve symlinks above the mount point, not through it: it may be a dead mount.
    path = os.path.abspath(mountpoint)
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if not is_mounted(path) and is_mounted(os.path.realpath(path)):
        path = os.path.realpath(path)
    if not is_mounted(path):
        sys.stderr.write(f"ecdcfs: error: {mountpoint!r} is not mounted\n")
        return 1
    attempts = (
        ["fusermount3", "-u"],
        ["fusermount", "-u"],
        ["fusermount3", "-uz"],
        ["fusermount", "-uz"],
        ["umount", "-l"],
    )
    reason = "no fusermount3, fusermount or umount found"
    for command in attempts:
        if shutil.which(command[0]) is None:
            continue
        try:
            done = subprocess.run([*command, path], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = f"{command[0]}: {exc}"
            continue
        if not is_mounted(path):
            return 0
        reason = (
            done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else (f"{' '.join(command)} exited with {done.returncode}")
        )
    sys.stderr.write(f"ecdcfs: error: cannot unmount {mountpoint!r}: {reason}\n")
    return 1
