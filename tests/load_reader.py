"""A reader process for load runs (test_mount_hardening.py and ``scripts/bench --load``).

    python tests/load_reader.py PATH SIZE SECONDS SEED MODE REFERENCE

reads PATH (SIZE bytes) for SECONDS, comparing every byte with the file REFERENCE. MODE is
``seq`` (128 KiB reads from the start, over and over) or ``rand`` (preads of 1 B to
200 KiB at random offsets, from SEED), with ``-direct`` appended for O_DIRECT (every read
reaches the daemon). Prints ``bytes_checked reads slowest_read_s errors``; each error (a
failed read or wrong bytes) is also printed to stderr.
"""

from __future__ import annotations

import os
import random
import sys
import time

SEQUENTIAL_READ = 128 << 10  # what cp and the kernel's FUSE reads use
RANDOM_SIZES = (1, 4096, 65536, 204800)


def read_for(
    path: str, size: int, seconds: float, seed: int, mode: str, expected: bytes
) -> tuple[int, int, float, int]:
    """(bytes checked, reads, slowest read in seconds, errors) of reading for ``seconds``."""
    sequential = mode.startswith("seq")
    flags = os.O_RDONLY | (os.O_DIRECT if mode.endswith("direct") else 0)
    rng = random.Random(seed)
    checked = reads = errors = 0
    worst = 0.0
    deadline = time.monotonic() + seconds
    fd = os.open(path, flags)
    offset = 0
    while time.monotonic() < deadline:
        if sequential:
            length = SEQUENTIAL_READ
            if offset >= size:  # from the start again, through a fresh descriptor
                os.close(fd)
                fd = os.open(path, flags)
                offset = 0
        else:
            offset, length = rng.randrange(size), rng.choice(RANDOM_SIZES)
        t = time.perf_counter()
        try:
            got = os.pread(fd, length, offset)
        except OSError as exc:
            print(f"ERROR {path}: {exc}", file=sys.stderr)
            errors += 1
            continue
        worst = max(worst, time.perf_counter() - t)
        # A read of a mounted .wav's header ends where the PCM begins: a prefix.
        if not got and offset < size or got != expected[offset : offset + len(got)]:
            print(f"MISMATCH {path} at {offset}+{length}", file=sys.stderr)
            errors += 1
            offset = size  # (sequential: start again)
            continue
        checked += len(got)
        reads += 1
        offset += len(got)
    os.close(fd)
    return checked, reads, worst, errors


def main(argv: list[str]) -> int:
    """Run one reader as the command line says; print its figures."""
    path, size, seconds, seed, mode, reference = argv
    with open(reference, "rb") as f:
        expected = f.read()
    checked, reads, worst, errors = read_for(
        path, int(size), float(seconds), int(seed), mode, expected
    )
    print(checked, reads, worst, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
