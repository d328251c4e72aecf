"""The RSS a model costs: ``python scripts/benchlib/model_rss.py MODEL`` imports ecdcfs,
loads MODEL (e.g. ``encodec_48khz``) as the daemon does, and prints its VmHWM in bytes.

Row 5 of the bench measures the daemon's peak RSS against this (the daemon loads only the
models its files use)."""

from __future__ import annotations

import sys


def peak_rss() -> int:
    """This process's VmHWM, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise LookupError("VmHWM")


def main(argv: list[str]) -> int:
    """Load the model named on the command line; print the peak RSS."""
    from ecdcfs.container import MODELS
    from ecdcfs.engine import Engine, Settings

    engine = Engine(Settings(device="cpu", cache_dir=None))
    engine.decoder(MODELS[argv[0]])
    print(peak_rss())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
