"""Rows 14-16 of the bench: what the install weighs and what a first-ever mount costs.

14. the venv of ``pip install`` of this checkout without extras (the core: no torch), made
    fresh in the bench's temp dir: its size (target <= 300 MB) and the install's seconds;
    beside it the size of the project's own ``.venv`` (the test extras, torch with CUDA).
15. building the decoder graphs from the seeded checkpoints, in this process, into an empty
    cache dir (no torch needed; info).
16. the first 4 KiB read of a 48 kHz file right after the first-ever mount (an empty cache
    dir: no graph built yet) of a folder holding 48 and 24 kHz files, so that both models
    load at once (target <= 3 s); then the first 4 KiB of the 24 kHz file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib.common import PREAD, Row, build_graphs, log
from benchlib.daemon import Mount

REPO = Path(__file__).resolve().parents[2]
MAX_CORE_MB = 300
MAX_FIRST_EVER_S = 3.0


def tree_mb(folder: Path) -> float:
    """Disk space of a folder's files, in MB (10**6 bytes)."""
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*")) / 1e6


def core_install(work: Path) -> tuple[float, float]:
    """(MB, seconds) of a fresh venv with ``pip install`` of this checkout, no extras."""
    project, venv = work / "core-project", work / "core-venv"
    shutil.copytree(
        REPO / "ecdcfs", project / "ecdcfs", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
    subprocess.run([*pip, str(project)], check=True)
    seconds = time.perf_counter() - t
    return tree_mb(venv), seconds


def first_ever_read(
    file_48: Path, file_24: bytes, work: Path, env: dict, *extra: str
) -> tuple[float, float]:
    """Seconds of the first 4 KiB of ``first.wav`` (``file_48``), then of ``k24.wav``
    (``file_24``), right after mounting a folder of the two with an empty cache dir."""
    from ecdcfs.audiofile import wav_layout_of

    base = work / "first-ever"
    src = base / "src"
    src.mkdir(parents=True)
    shutil.copy(file_48, src / "first.ecdc")
    (src / "k24.ecdc").write_bytes(file_24)
    mount = Mount(src, base / "mnt", base, env, *extra, "--cache-dir", str(base / "cache"))
    try:
        times = []
        for name in ("first", "k24"):
            audio = len(wav_layout_of(src / f"{name}.ecdc").header)  # where its PCM starts
            t = time.perf_counter()
            with open(mount.mnt / f"{name}.wav", "rb", buffering=0) as fh:
                got = os.pread(fh.fileno(), PREAD, audio)
            times.append(time.perf_counter() - t)
            if len(got) != PREAD:
                raise RuntimeError(f"the first read of {name} returned {len(got)} bytes")
    finally:
        mount.stop()
    return times[0], times[1]


def install_rows(
    work: Path, file_48: Path, file_24: bytes, env: dict, *extra: str
) -> tuple[list[Row], list[str]]:
    """Rows 14-16 (see the module docstring)."""
    log("14. installing the core (pip install ., no extras) into a fresh venv ...")
    core_mb, install_s = core_install(work)
    full_mb = tree_mb(REPO / ".venv")
    log("15. building the decoder graphs into an empty cache dir ...")
    models = ["encodec_48khz", "encodec_24khz"]
    graph_s = build_graphs(work / "graph-build", *models)
    log("16. the first read after the first-ever mount ...")
    first_48, first_24 = first_ever_read(file_48, file_24, work, env, *extra)
    rows = [
        Row(
            "14. core venv (pip install ., no extras) / .venv with the test extras",
            f"{core_mb:.0f} MB",
            f"{full_mb:.0f} MB",
            core_mb / full_mb,
            f"<= {MAX_CORE_MB} MB",
            core_mb <= MAX_CORE_MB,
        ),
        Row(
            f"15. decoder graphs built from the checkpoints ({', '.join(models)})",
            f"{graph_s:.2f} s",
            "",
            None,
            "",
            None,
        ),
        Row(
            "16. first 4 KiB after the first-ever mount (48 and 24 kHz files, no graph cached)",
            f"{first_48:.2f} s",
            "",
            None,
            f"<= {MAX_FIRST_EVER_S:g} s",
            first_48 <= MAX_FIRST_EVER_S,
        ),
        Row("    then the first 4 KiB of the 24 kHz file", f"{first_24:.2f} s", "", None, "", None),
    ]
    return rows, [f"core install: {install_s:.0f} s (venv, pip, downloads)"]
