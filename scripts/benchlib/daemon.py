"""The mount under test: ``ecdcfs SRC MNT -f --log-level debug`` as a subprocess, and what
its own debug log says it decoded.

The decode worker logs one line per unit it decodes (a 48 kHz frame or a 24 kHz chunk)::

    ... DEBUG ecdcfs.scheduler: decoded unit ('<identity>', '<tag>', <index>) in 0.123 s

so the bench counts and times the daemon's decodes without patching anything in it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from benchlib.common import forget, on_cleanup

_DECODED = re.compile(r" ecdcfs\.scheduler: decoded unit (\(.*\)) in ([0-9.]+) s$")


class Decoded(NamedTuple):
    """One unit the daemon decoded: the file's identity, the unit's index, seconds taken."""

    identity: str
    index: int
    seconds: float


def decoded_units(log_text: str) -> list[Decoded]:
    """The units a daemon's debug log says were decoded, in order."""
    units = []
    for line in log_text.splitlines():
        if match := _DECODED.search(line):
            identity, _tag, index = ast.literal_eval(match[1])
            units.append(Decoded(identity, index, float(match[2])))
    return units


class Mount:
    """``ecdcfs SRC MNT -f --device cpu --log-level debug --log-file WORK/daemon.log``."""

    def __init__(self, src: Path, mnt: Path, work: Path, env: dict, *extra: str) -> None:
        self.mnt = mnt
        self.log_file = work / "daemon.log"
        mnt.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "ecdcfs", str(src), str(mnt), "-f", "--device", "cpu"]
        cmd += ["--log-level", "debug", "--log-file", str(self.log_file), *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        on_cleanup(self.stop)
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ecdcfs exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mnt} not mounted after 60 s: {self.tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.proc.pid

    def log_text(self) -> str:
        """The daemon's whole log so far."""
        try:
            return self.log_file.read_text()
        except OSError:
            return ""

    def tail(self) -> str:
        """The end of the daemon's log (for error messages)."""
        return self.log_text()[-2000:] or "(no log)"

    def stats(self) -> dict[str, int]:
        """The mount's counters (``user.ecdcfs.stats``), once every file is closed."""
        deadline = time.monotonic() + 30
        while True:
            found = json.loads(os.getxattr(self.mnt, "user.ecdcfs.stats"))
            if found["files_open"] == 0 or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def decoded(self) -> list[Decoded]:
        """Every unit the daemon decoded so far, in order."""
        return decoded_units(self.log_text())

    def stop(self) -> None:
        """Unmount (``ecdcfs -u``), wait for the daemon (kill it after 30 s), and clear a
        dead mount left by a killed daemon."""
        if self.proc.poll() is None and os.path.ismount(self.mnt):
            subprocess.run(
                [sys.executable, "-m", "ecdcfs", "-u", str(self.mnt)],
                capture_output=True,
                timeout=60,
            )
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        forget(self.stop)
