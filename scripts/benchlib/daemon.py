"""The mount under test: ``ecdcfs SRC MNT -f --log-level debug`` as a subprocess, and what
its own debug log says it decoded.

The decode worker logs one line per unit it decodes (a 48 kHz frame or a 24 kHz chunk)::

    ... DEBUG ecdcfs.scheduler: decoded unit ('<identity>', '<tag>', <index>) in 0.123 s

so the bench counts and times the daemon's decodes without patching anything in it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

import mounting
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


class Mount(mounting.Mount):
    """The tests' mount (tests/mounting.py) at log level debug, WORK/daemon.log, unmounted
    when the bench exits however it exits."""

    def __init__(self, src: Path, mnt: Path, work: Path, env: dict, *extra: str) -> None:
        log = work / "daemon.log"
        debug = ("--log-level", "debug", *extra)
        super().__init__(src, mnt, log, *debug, exact=False, env=env, timeout=60)
        on_cleanup(self.stop)

    def decoded(self) -> list[Decoded]:
        """Every unit the daemon decoded so far, in order."""
        return decoded_units(self.log_text())

    def stop(self) -> None:
        super().stop()
        forget(self.stop)
