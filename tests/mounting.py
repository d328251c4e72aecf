"""Helpers for tests (and scripts/bench) through real FUSE mounts.

A foreground or daemon ``ecdcfs`` subprocess, unmounting (a dead mount included), waiting
for a mount, and an independent WAV writer for the bytes a mount must show.
"""

from __future__ import annotations

import io
import json
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
import pytest
from mutagen.id3 import ID3, TIT2, Encoding

SR = 48_000  # the rate of the 48 kHz test files
TITLE = "Título [live] ☃"  # the title of conftest's media["short_v193"]


def fuse_available() -> bool:
    """Whether FUSE mounts can work here (/dev/fuse and fusermount)."""
    return os.path.exists("/dev/fuse") and any(
        shutil.which(c) for c in ("fusermount3", "fusermount")
    )


def mounts(test):
    """Mark a test that mounts: marker ``mount``, skipped where FUSE cannot work."""
    needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount")
    return pytest.mark.mount(needs_fuse(test))


def wav_size(data_bytes: int, title: str | None = None) -> int:
    """Size of the WAV a mount serves for ``data_bytes`` of PCM with ``title``: the PCM from
    8 KiB on (after long tags), to a 4 KiB boundary, then 1 KiB."""
    tags = _id3_chunk(title) + _hidden_info(title) if title else b""
    start = max(8192, 44 + len(tags) + 8 + (1 if title else 0))  # JUNK: 1+ bytes if odd
    return start + -(start + data_bytes) % 4096 + data_bytes + 1024


def wav_bytes(pcm: np.ndarray, rate: int, title: str | None = None) -> bytes:
    """A 16-bit PCM WAV of ``pcm`` [samples, channels], built independently of ecdcfs in
    the layout a mount serves: ``RIFF WAVE fmt [id3 ] JUNK [JUNK JUNK] data <PCM> JUNK``."""
    channels = pcm.shape[1]
    data = pcm.astype("<i2").tobytes()
    fmt = struct.pack(
        "<4sIHHIIHH", b"fmt ", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16
    )
    id3, hidden = (_id3_chunk(title), _hidden_info(title)) if title else (b"", b"")
    head = b"WAVE" + fmt + id3
    pcm_start = wav_size(len(data), title) - 1024 - len(data)
    junk = pcm_start - 8 - len(head) - 16 - len(hidden)
    head += b"JUNK" + struct.pack("<I", junk) + bytes(junk) + hidden
    head += b"data" + struct.pack("<I", len(data))
    body = head + data + b"JUNK" + struct.pack("<I", 1016) + bytes(1016)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _hidden_info(title: str) -> bytes:
    """What follows the body of the odd-sized JUNK before ``data`` in a titled file: its
    pad byte, an empty JUNK, and a JUNK whose body holds LIST/INFO with the title where a
    walk that skips no pad byte (minidlna's) lands: it reads the pad byte and ``JUN`` as a
    chunk id, ``K\0\0\0`` as its size (75), and so goes on 66 bytes into that body."""
    text = title.encode() + b"\0"
    text += b"\0" * (len(text) % 2)
    info = b"INFO" + b"INAM" + struct.pack("<I", len(text)) + text
    listed = b"LIST" + struct.pack("<I", len(info)) + info
    body = bytes(66) + listed
    return b"\0JUNK" + bytes(4) + b"JUNK" + struct.pack("<I", len(body)) + body


def _id3_chunk(title: str) -> bytes:
    """An ``id3 `` chunk holding an ID3v2.4 tag with a UTF-8 title, written by mutagen
    (with a byte of padding where the tag would have an odd size)."""
    tag = ID3()
    tag.add(TIT2(encoding=Encoding.UTF8, text=title))
    for padding in (0, 1):
        out = io.BytesIO()
        tag.save(out, v2_version=4, padding=lambda info, n=padding: n)
        body = out.getvalue()
        if len(body) % 2 == 0:
            break
    return b"id3 " + struct.pack("<I", len(body)) + body


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer at the end of the file) in as many reads as it
    takes: a read of a mounted .wav's header ends where its PCM begins."""
    out = b""
    while len(out) < length and (chunk := os.pread(fd, length - len(out), offset + len(out))):
        out += chunk
    return out


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
    """A foreground ``ecdcfs SRC MNT -f --device cpu --log-file LOG`` subprocess
    (``--exact --no-persist`` unless ``exact`` is False); its stderr goes to ``LOG.stderr``."""

    def __init__(
        self,
        src: Path,
        mnt: Path,
        log: Path,
        *extra: str,
        exact: bool = True,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> None:
        self.src, self.mnt, self.log = src, mnt, log
        mnt.mkdir(exist_ok=True)
        options = [*(EXACT if exact else ()), "--device", "cpu", "--log-file", str(log), *extra]
        with open(log.with_name(log.name + ".stderr"), "wb") as stderr:
            self.proc = subprocess.Popen(
                ecdcfs_cmd(str(src), str(mnt), "-f", *options, python=python),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
        try:
            wait_mounted(mnt, self.proc, timeout)
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}: {self.tail()}") from None

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.proc.pid

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

    def error_lines(self) -> list[str]:
        """The log's ERROR lines."""
        return [line for line in self.log_text().splitlines() if " ERROR " in line]

    def tail(self) -> str:
        """The end of the daemon's stderr and log (for error messages)."""
        stderr = self.log.with_name(self.log.name + ".stderr")
        text = (stderr.read_text() if stderr.exists() else "") + self.log_text()
        return text[-2000:] or "(no output)"

    def stats(self) -> dict[str, int]:
        """The mount's counters (``user.ecdcfs.stats``), once every file is closed."""
        deadline = time.monotonic() + 30
        while True:
            found = json.loads(os.getxattr(self.mnt, "user.ecdcfs.stats"))
            if found["files_open"] == 0 or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


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
