"""``scripts/bench --scan``: library scanners over a mount and over real WAV files.

Each scanner runs over the same N distinct 48 kHz files (one encoding, N headers: titles in
ASCII and not, none, a source URL), on a fresh mount of its own (a cold cache, as a media
server's first scan), then over real WAV copies of the same files on the local disk (the
baseline). Decodes a file come from the mount's ``user.ecdcfs.stats`` (decodes started:
finished, interrupted or failed); seconds a file are wall time. mpd (``mpc update``) and
minidlna (``minidlnad`` with a database of its own) run where they are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchlib.common import (
    MODEL,
    SR,
    Row,
    build_graphs,
    log,
    print_report,
    start_run,
)
from benchlib.daemon import Mount

TITLES = ("Plain Song {}", "Été ☃ {}", None, "Sourced {}")
# Goals in decodes a file (issue #19): None where there is none.
GOALS = {
    "ls -lR, du": 0,
    "mutagen (beets, Picard)": 0,
    "TagLib (pytaglib)": 0,
    "exiftool": 0,
    "tinytag": 0,
    "minidlna": 0,
    "gst-discoverer": 1,
    "ffprobe": 2,
    "ffprobe, Jellyfin's arguments": 2,
    "mpd update": 5,
    "MediaInfo --Output=JSON": 6,
}
JELLYFIN = ["-analyzeduration", "200M", "-probesize", "1G", "-threads", "0", "-v", "warning"]
JELLYFIN += ["-print_format", "json", "-show_streams", "-show_chapters", "-show_format"]


def write_files(work: Path, n_files: int, seconds: float) -> Path:
    """``work/src`` with ``n_files`` distinct .ecdc files of the same audio."""
    import synth

    v0 = synth.make_ecdc(model=MODEL, samples=int(seconds * SR), seed=41)
    src = work / "src"
    src.mkdir()
    for i in range(n_files):
        title = TITLES[i % len(TITLES)]
        source = f"https://example.org/watch?v={i}" if i % len(TITLES) == 3 else None
        br = 6 + i / 1000  # (distinct bytes, untitled files too: nothing is shared)
        data = synth.to_v193(v0, SR, name=title and title.format(i), source=source, br=br)
        (src / f"song {i:03d}.ecdc").write_bytes(data)
    return src


def each_file(command: list[str]) -> Callable[[Path], None]:
    """Run ``command FILE`` for every .wav under a folder."""

    def run(folder: Path) -> None:
        for path in sorted(folder.glob("*.wav")):
            subprocess.run([*command, str(path)], capture_output=True, check=True, timeout=300)

    return run


def python_scanner(code: str) -> Callable[[Path], None]:
    """``code`` (with ``paths``) in a fresh interpreter, over every .wav of a folder."""

    def run(folder: Path) -> None:
        paths = [str(p) for p in sorted(folder.glob("*.wav"))]
        script = f"import json, sys\npaths = json.loads(sys.argv[1])\n{code}"
        cmd = [sys.executable, "-c", script, json.dumps(paths)]
        subprocess.run(cmd, capture_output=True, check=True, timeout=600)

    return run


def mpd_update(folder: Path) -> None:
    """A fresh mpd over ``folder``: ``mpc update --wait`` builds its database."""
    with tempfile.TemporaryDirectory(prefix="ecdcfs-mpd-") as tmp:
        port = "6612"
        conf = Path(tmp) / "mpd.conf"
        conf.write_text(
            f'music_directory "{folder}"\ndb_file "{tmp}/db"\nstate_file "{tmp}/state"\n'
            f'bind_to_address "127.0.0.1"\nport "{port}"\npid_file "{tmp}/pid"\n'
            f'log_file "{tmp}/log"\naudio_output {{\n type "null"\n name "null"\n}}\n'
        )
        daemon = subprocess.Popen(["mpd", "--no-daemon", str(conf)], stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if subprocess.run(["mpc", "-p", port, "status"], capture_output=True).returncode:
                    time.sleep(0.1)
            mpc = ["mpc", "-p", port, "--wait", "update"]
            subprocess.run(mpc, capture_output=True, check=True, timeout=600)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


def minidlna_scan(folder: Path) -> None:
    """A fresh minidlnad over ``folder`` until its scan is over (a database of its own)."""
    with tempfile.TemporaryDirectory(prefix="ecdcfs-minidlna-") as tmp:
        conf = Path(tmp) / "minidlna.conf"
        conf.write_text(f"media_dir=A,{folder}\ndb_dir={tmp}\nlog_dir={tmp}\nport=8299\n")
        cmd = ["minidlnad", "-f", str(conf), "-d", "-P", f"{tmp}/pid", "-R"]
        daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert daemon.stdout is not None
            deadline = time.monotonic() + 600
            for line in daemon.stdout:
                if "Scanning" in line and "finished" in line or time.monotonic() > deadline:
                    break
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)


def scanners() -> dict[str, Callable[[Path], None] | None]:
    """Each scanner's run over a folder; None where it is not installed."""
    have = shutil.which

    def importable(name: str) -> bool:
        probe = [sys.executable, "-c", f"import {name}"]
        return subprocess.run(probe, capture_output=True).returncode == 0

    def listing(folder: Path) -> None:
        for cmd in (["ls", "-lR"], ["du", "-s"], ["find", "-type", "f"]):
            subprocess.run([*cmd[:1], str(folder), *cmd[1:]], capture_output=True, check=True)

    return {
        "ls -lR, du": listing,
        "mutagen (beets, Picard)": python_scanner(
            "import mutagen\nfor p in paths: mutagen.File(p)"
        ),
        "TagLib (pytaglib)": python_scanner(
            "import taglib\nfor p in paths:\n    with taglib.File(p) as f: f.tags, f.length"
        )
        if importable("taglib")
        else None,
        "exiftool": each_file(["exiftool", "-j"]) if have("exiftool") else None,
        "tinytag": python_scanner("from tinytag import TinyTag\nfor p in paths: TinyTag.get(p)")
        if importable("tinytag")
        else None,
        "gst-discoverer": each_file(["gst-discoverer-1.0"]) if have("gst-discoverer-1.0") else None,
        "ffprobe": each_file(["ffprobe", "-v", "warning", "-show_format", "-show_streams"]),
        "ffprobe, Jellyfin's arguments": each_file(["ffprobe", *JELLYFIN, "-i"]),
        "MediaInfo --Output=JSON": each_file(["mediainfo", "--Output=JSON"])
        if have("mediainfo")
        else None,
        "mpd update": mpd_update if have("mpd") and have("mpc") else None,
        "minidlna": minidlna_scan if have("minidlnad") else None,
    }


def main(args: argparse.Namespace) -> int:
    """One row per scanner: decodes a file on a fresh mount, and seconds a file there beside
    the same scanner over real WAV copies."""
    work, load_start = start_run("ecdcfs-bench-scan-")
    n_files = args.scan_files
    cache = work / "xdg" / "ecdcfs"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent)}
    src = write_files(work, n_files, args.scan_seconds)
    log(f"{n_files} files of {args.scan_seconds:g} s; building the decoder graph ...")
    build_graphs(cache, MODEL)
    real = work / "real"
    mount = Mount(src, work / "mnt", work, env, "--cache-dir", str(cache))
    try:
        shutil.copytree(mount.mnt, real)  # the baseline: the same WAV bytes on a local disk
    finally:
        mount.stop()
    rows, notes = [], []
    for name, scan in scanners().items():
        if scan is None:
            notes.append(f"{name}: not installed here")
            continue
        mount = Mount(src, work / "mnt", work, env, "--cache-dir", str(cache))
        try:
            started = time.perf_counter()
            scan(mount.mnt)
            on_mount = (time.perf_counter() - started) / n_files
            decodes = mount.stats()["decodes_started"] / n_files
        except (subprocess.SubprocessError, OSError) as exc:
            notes.append(f"{name}: failed on the mount ({exc})")
            continue
        finally:
            mount.stop()
        started = time.perf_counter()
        scan(real)
        on_real = (time.perf_counter() - started) / n_files
        goal = GOALS.get(name)
        log(f"{name}: {decodes:.2f} decodes, {on_mount:.4f} s a file ({on_real:.4f} on WAVs)")
        rows.append(
            Row(
                f"scan: {name}, decodes a file",
                f"{decodes:.2f} ({on_mount:.4f} s a file)",
                f"{on_real:.4f} s a file on WAVs",
                on_mount / on_real if on_real > 0 else None,
                "" if goal is None else f"<= {goal}",
                None if goal is None else decodes <= goal,
            )
        )
    notes.append(f"load average: {load_start} at start, {os.getloadavg()[0]:.2f} at the end")
    print_report(rows, notes)
    return 0
