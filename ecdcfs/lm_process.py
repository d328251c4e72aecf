"""The LM pass of an LM-coded file in a child process, so the daemon never holds torch.

Entropy-decoding an LM-coded file needs encodec's language model on torch; loaded in the
daemon, torch and the LM stay for good (measured: ~890 MiB of RSS after two LM-coded
files, against ~190 MiB serving plain ones). So each index build runs ``python -m
ecdcfs.lm_process FIRST OFFSET`` with the file's bytes on its stdin: the child loads the LM
(torch's default threads, as in-process: the same codes bit for bit, tested), streams
each unit's codes back on its stdout as it decodes them, and exits when the index is built
(or when the daemon exits). The price is a torch import and an LM load per index build.

Each record on the pipe is ``struct RECORD`` (unit, scale or NaN, codebooks, steps, payload
offset of the next unit) and the codes, uint16 little-endian; a unit number of -1 carries
an error instead: its length, then JSON ``{"kind", "message"}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from .checkpoint import LM_CHECKPOINTS, load_state_dict
from .container import ContainerError, EcdcError, ModelSpec
from .decoder import LM_NEEDS_TORCH, ModelUnavailable
from .index import Unit
from .settings import torch_installed

RECORD = struct.Struct("<qdqqq")
LENGTH = struct.Struct("<q")
ERROR_UNIT = -1
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent exits
_ERRORS: dict[str, type[EcdcError]] = {
    "container": ContainerError,
    "model": ModelUnavailable,
    "error": EcdcError,
}


@dataclass(frozen=True)
class LanguageModel:
    """encodec's LM of ``spec``'s model, whose checkpoint is present and readable: it
    entropy-decodes files in a child process (:meth:`scan`)."""

    spec: ModelSpec

    def scan(self, data: bytes, first: int, offset: int, block_steps: int | None) -> Iterator[Unit]:
        """The units of the LM-coded file ``data`` from ``first`` (at payload ``offset``),
        as :meth:`~ecdcfs.units.DecodeUnits.scan_lm` gives them, decoded in a child
        (``block_steps``: the code steps of a one-frame file's units, its index blocks)."""
        arguments = [str(first), str(offset), str(block_steps or 0)]
        with tempfile.TemporaryFile() as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", __name__, *arguments],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=_child_env(),
            )
            try:
                assert child.stdin is not None and child.stdout is not None
                with contextlib.suppress(BrokenPipeError):  # it died: its exit says why
                    child.stdin.write(data)
                    child.stdin.flush()
                with contextlib.suppress(OSError):
                    child.stdin.close()
                yield from _read_units(child.stdout)
                if child.wait() != 0:
                    stderr.seek(0)
                    tail = " ".join(stderr.read().decode(errors="replace").split()[-40:])
                    raise EcdcError(f"the LM process exited with {child.returncode}: {tail}")
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()


def find_lm(spec: ModelSpec) -> LanguageModel:
    """The LM of ``spec``'s model, once torch is installed and its checkpoint is present
    (downloaded if missing) and reads as a checkpoint; ModelUnavailable, one line, if not."""
    if not torch_installed():
        raise ModelUnavailable(LM_NEEDS_TORCH)
    load_state_dict(LM_CHECKPOINTS[spec.name], f"{spec.name} LM")  # a damaged copy: say so now
    return LanguageModel(spec)


def _child_env() -> dict[str, str]:
    """This environment, with this package importable in the child wherever it lies."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _read_units(stream: IO[bytes]) -> Iterator[Unit]:
    """Units as the child writes them, until its stdout ends; its error raised as ours."""
    while header := stream.read(RECORD.size):
        if len(header) < RECORD.size:
            raise EcdcError("the LM process stopped mid-record")
        unit, scale, codebooks, steps, next_offset = RECORD.unpack(header)
        if unit == ERROR_UNIT:
            (length,) = LENGTH.unpack(stream.read(LENGTH.size))
            error = json.loads(stream.read(length))
            raise _ERRORS.get(error["kind"], EcdcError)(error["message"])
        raw = stream.read(2 * codebooks * steps)
        if len(raw) < 2 * codebooks * steps:
            raise EcdcError("the LM process stopped mid-record")
        codes = np.frombuffer(raw, "<u2").astype(np.int64).reshape(codebooks, steps)
        yield Unit(unit, None if math.isnan(scale) else scale, codes, next_offset)


def _write_unit(out: BinaryIO, unit: Unit) -> None:
    number, scale, codes, next_offset = unit
    nan = math.nan if scale is None else scale
    out.write(RECORD.pack(number, nan, *codes.shape, next_offset))
    out.write(np.ascontiguousarray(codes, "<u2").tobytes())
    out.flush()


def _write_error(out: BinaryIO, error: Exception) -> None:
    kind = next((k for k, t in _ERRORS.items() if isinstance(error, t)), "error")
    message = json.dumps({"kind": kind, "message": str(error)}).encode()
    out.write(RECORD.pack(ERROR_UNIT, math.nan, 0, 0, 0) + LENGTH.pack(len(message)) + message)
    out.flush()


def _die_with_parent() -> None:
    """Exit when the process that asked for the index exits (Linux), so an unmount never
    leaves an LM pass running."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it exited before prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """``python -m ecdcfs.lm_process FIRST OFFSET BLOCK_STEPS`` < file: its units from FIRST
    on (BLOCK_STEPS: those of a one-frame file's units; 0: the grid's own)."""
    import warnings

    from .container import read_header
    from .lm import load_lm
    from .source import MemorySource, as_stream
    from .units import decode_units

    _die_with_parent()
    warnings.filterwarnings("ignore")  # encodec's deprecations: nothing a user can act on
    first, offset, block_steps = (int(arg) for arg in (argv or sys.argv[1:]))
    source = MemorySource(sys.stdin.buffer.read())
    out = sys.stdout.buffer
    try:
        header = read_header(as_stream(source, block=1), source.size)
        lm = load_lm(header.model)
        units = decode_units(header, block_steps or None)
        for unit in units.scan_lm(lm, source, first, offset):
            _write_unit(out, unit)
    except EcdcError as error:
        _write_error(out, error)
    except BrokenPipeError:  # the daemon stopped reading: nothing more is wanted
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
