"""Helpers for tests through real FUSE mounts (test_mount.py, test_mount_hardening.py).

A foreground or daemon ``ecdcfs`` subprocess, unmounting (a dead mount included), waiting
for a mount, and an independent WAV writer for the bytes a mount must show.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from mutagen.id3 import ID3, TIT2, Encoding

SR = 48_000  # the rate of the 48 kHz test files


def fuse_available() -> bool:
    """Whether FUSE mounts can work here (/dev/fuse and fusermount)."""
    return os.path.exists("/dev/fuse") and any(
        shutil.which(c) for c in ("fusermount3", "fusermount")
    )


def wav_bytes(pcm: np.ndarray, rate: int, title: str | None = None) -> bytes:
    """A 16-bit PCM WAV of ``pcm`` [samples, channels], built independently of ecdcfs."""
    channels = pcm.shape[1]
    data = pcm.astype("<i2").tobytes()
    fmt = struct.pack(
        "<4sIHHIIHH", b"fmt ", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16
    )
    info = b""
    if title:
        text = title.encode() + b"\0"
        text += b"\0" * (len(text) % 2)
        inam = b"INAM" + struct.pack("<I", len(title.encode()) + 1) + text
        info = b"LIST" + struct.pack("<I", 4 + len(inam)) + b"INFO" + inam + _id3_chunk(title)
    body = b"WAVE" + fmt + info + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _id3_chunk(title: str) -> bytes:
    """An ``id3 `` chunk holding an ID3v2.4 tag with a UTF-8 title, written by mutagen."""
    tag = ID3()
    tag.add(TIT2(encoding=Encoding.UTF8, text=title))
    out = io.BytesIO()
    tag.save(out, v2_version=4, padding=lambda info: 0)
    body = out.getvalue()
    return b"id3 " + struct.pack("<I", len(body)) + body + b"\0" * (len(body) % 2)


def unmount(mnt: Path) -> None:
    """Unmount whatever is at ``mnt`` (a dead mount included), lazily as a last resort."""
    for cmd in (
        ["fusermount3", "-u"],
        ["fusermount", "-u"],
        ["fusermount3", "-uz"],
        ["fusermount", "-uz"],
        ["umount", "-l"],
    ):
        if not is_mounted(mnt):
            return
        if shutil.which(cmd[0]):
            subprocess.run([*cmd, str(mnt)], capture_output=True, timeout=30)


def is_mounted(mnt: Path) -> bool:
    from ecdcfs.mounts import is_mounted as cli_is_mounted

    return cli_is_mounted(str(mnt))


def ecdcfs_cmd(*args: str, python: str = sys.executable) -> list[str]:
    """The command line of ``ecdcfs ARGS`` run by ``python`` (this interpreter)."""
    return [python, "-m", "ecdcfs", *args]


def source_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """``tmp_path/src`` holding ``files`` (name -> content): a SOURCE to mount."""
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src


def wait_mounted(mnt: Path, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    """Wait until ``mnt`` is a mount point; fail if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ecdcfs exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{mnt} not mounted after {timeout} s")
        time.sleep(0.05)


# What mounts in tests decode with unless they say otherwise: encodec's own decode, so
# that bytes compare exactly with synth.reference_pcm (tests of the default decoder mount
# with exact=False and a cache dir holding its graphs).
EXACT = ("--exact", "--no-persist")


class Mount:
    """A foreground ``ecdcfs SRC MNT -f`` subprocess (``--exact --no-persist`` unless
    ``exact`` is False)."""

    def __init__(
        self,
        src: Path,
        mnt: Path,
        log: Path,
        *extra: str,
        exact: bool = True,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
    ) -> None:
        self.src, self.mnt, self.log = src, mnt, log
        mnt.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ecdcfs_cmd(
                str(src),
                str(mnt),
                "-f",
                *(EXACT if exact else ()),
                "--device",
                "cpu",
                "--log-file",
                str(log),
                *extra,
                python=python,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            wait_mounted(mnt, self.proc)
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        """Unmount, wait for the daemon to exit (kill it after 30 s), unmount what is left."""
        unmount(self.mnt)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        unmount(self.mnt)

    def log_text(self) -> str:
        """The daemon's log so far."""
        return self.log.read_text() if self.log.exists() else ""


@contextmanager
def daemon(src: Path, mnt: Path, log: Path, *options: str) -> Iterator[None]:
    """``ecdcfs SRC MNT --exact --no-persist`` in daemon mode (no -f), mounted once the
    command returns; on exit, unmounted and its daemon gone (killed if need be)."""
    mnt.mkdir(exist_ok=True)
    try:
        started = subprocess.run(
            ecdcfs_cmd(str(src), str(mnt), *EXACT, "--log-file", str(log), *options),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert started.returncode == 0, started.stderr
        yield
    finally:
        unmount(mnt)
        for pid in daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)


def wait_daemon_gone(mnt: Path, timeout: float = 30) -> None:
    """Wait until no process serves ``mnt`` any more (at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while daemon_pids(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)


def daemon_pids(mnt: Path) -> list[int]:
    """Processes whose command line names ``mnt`` (the ecdcfs daemon)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(mnt).encode() in cmdline and b"ecdcfs" in b" ".join(cmdline):
                pids.append(int(entry))
    return pids
