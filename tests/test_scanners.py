"""Library scanners through a real mount: what each one decodes, and the tags it shows.

Every scanner runs over the same files (titles in ASCII and not, none, a source URL) on a
fresh mount of its own, as a media server's first scan would; the decodes it caused are
counted from the root's ``user.ecdcfs.stats``. Tag readers decode nothing; the others
decode at most the frames their own reads cover (ffprobe 288 KiB, MediaInfo its first MiB,
gst-discoverer 23 KiB). Each shows every file's title and duration, and ffprobe at
Jellyfin's log level prints nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

import synth
from mounting import Mount, fuse_available

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount"),
]

SR, SECONDS = 48_000, 8  # longer than any scanner reads: its counts are its own
TITLES = {"ascii": "Plain Song", "utf8": "Été ☃ 日本", "untitled": None, "sourced": "Sourced"}


def require(*tools: str) -> None:
    """Fail, not skip, where a scanner CI installs is missing (scripts/setup --test)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: run scripts/setup --test"


@pytest.fixture(scope="module")
def library(torch_home, tmp_path_factory) -> Path:
    """Four files of the same audio with different headers (so nothing is shared)."""
    v0 = synth.make_ecdc(samples=SECONDS * SR, seed=31)
    src = tmp_path_factory.mktemp("scan-src")
    for i, (name, title) in enumerate(TITLES.items()):
        source = "https://example.org/watch?v=1" if name == "sourced" else None
        data = synth.to_v193(v0, SR, name=title, source=source, br=6 + i / 1000)
        (src / f"{name}.ecdc").write_bytes(data)
    return src


@pytest.fixture
def mount(library, tmp_path):
    m = Mount(library, tmp_path / "mnt", tmp_path / "log", exact=False)
    try:
        yield m
    finally:
        m.stop()


def scan(mount: Mount, command: list[str]) -> dict[str, str]:
    """Run ``command FILE`` on every file; its output per name, checked for success."""
    out = {}
    for name in TITLES:
        done = subprocess.run(
            [*command, str(mount.mnt / f"{name}.wav")], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        out[name] = done.stdout + done.stderr
    return out


def decodes_per_file(mount: Mount) -> float:
    return mount.stats()["decodes_started"] / len(TITLES)


def test_the_counters_say_what_was_decoded_and_served(mount):
    before = mount.stats()
    assert before["decodes_started"] == before["bytes_served"] == 0
    assert "user.ecdcfs.stats" in os.listxattr(mount.mnt)
    fd = os.open(mount.mnt / "ascii.wav", os.O_RDONLY)
    header = os.pread(fd, 20_000, 0)  # a read of the header ends where the PCM begins
    assert header.endswith(b"data" + (8 * SR * 4).to_bytes(4, "little"))
    assert os.pread(fd, 20_000 - len(header), len(header))  # the PCM: frame 0
    during = json.loads(os.getxattr(mount.mnt, "user.ecdcfs.stats"))
    os.close(fd)
    after = mount.stats()
    assert during["files_open"] == 1 and after["files_open"] == 0
    assert after["bytes_served"] == 20_000
    assert after["units_decoded"] == after["decodes_started"] == 1  # frame 0, no read-ahead
    assert after["cache_misses"] == 1 and after["cache_bytes"] > 0


def test_mutagen_decodes_nothing_and_reads_the_tags(mount):
    from mutagen.wave import WAVE

    for name, title in TITLES.items():
        wav = WAVE(mount.mnt / f"{name}.wav")
        assert wav.info.length == pytest.approx(SECONDS, abs=1e-3)
        assert (wav.tags["TIT2"].text if title else wav.tags) == ([title] if title else None)
    assert decodes_per_file(mount) == 0


def test_taglib_decodes_nothing_and_reads_the_tags(mount):
    taglib = pytest.importorskip("taglib", reason="pytaglib: pip install -e '.[test]'")
    for name, title in TITLES.items():
        with taglib.File(str(mount.mnt / f"{name}.wav")) as f:
            assert f.length == SECONDS
            assert f.tags.get("TITLE") == ([title] if title else None)
    assert decodes_per_file(mount) == 0


def test_exiftool_decodes_nothing_and_reads_the_tags(mount):
    require("exiftool")
    for name, out in scan(mount, ["exiftool", "-j", "-n", "-Title", "-Duration"]).items():
        found = json.loads(out)[0]
        assert found.get("Title") == TITLES[name]
        # ExifTool estimates a WAV's duration from the file size: the layout's few KiB.
        assert SECONDS <= found["Duration"] < SECONDS + 0.1
    assert decodes_per_file(mount) == 0


def test_ffprobe_decodes_only_what_it_reads_and_says_nothing(mount):
    require("ffprobe")
    jellyfin = ["ffprobe", "-v", "warning", "-print_format", "json", "-show_format"]
    jellyfin += ["-show_streams", "-show_chapters", "-analyzeduration", "200M"]
    for name, out in scan(mount, jellyfin).items():
        found = json.loads(out)  # nothing but the JSON: no warning
        assert float(found["format"]["duration"]) == pytest.approx(SECONDS, abs=1e-3)
        assert found["format"].get("tags", {}).get("title") == TITLES[name]
    assert decodes_per_file(mount) <= 2


def test_mediainfo_decodes_only_what_it_reads_and_shows_the_title(mount):
    require("mediainfo")
    for name, out in scan(mount, ["mediainfo", "--Output=JSON"]).items():
        general = json.loads(out)["media"]["track"][0]
        assert float(general["Duration"]) == pytest.approx(SECONDS, abs=1e-3)
        assert general.get("Title") == TITLES[name] and general.get("Track") == TITLES[name]
    assert decodes_per_file(mount) <= 6
    texts = scan(mount, ["mediainfo"])
    assert f"Track name                               : {TITLES['utf8']}" in texts["utf8"]


def test_gst_discoverer_decodes_one_frame(mount):
    """(Its wavparse, GStreamer 1.22, reads RIFF INFO tags only: it shows no title.)"""
    require("gst-discoverer-1.0")
    for out in scan(mount, ["gst-discoverer-1.0", "-v"]).values():
        assert f"Duration: 0:00:{SECONDS:02d}.000000000" in out
    assert decodes_per_file(mount) <= 1


def test_riff_info_gives_gstreamer_the_title(library, tmp_path):
    """``-o riff_info`` adds LIST/INFO for software that reads no ID3 chunk."""
    require("gst-discoverer-1.0")
    m = Mount(library, tmp_path / "mnt", tmp_path / "log", "-o", "riff_info", exact=False)
    try:
        for name, out in scan(m, ["gst-discoverer-1.0", "-v"]).items():
            assert (f"title: {TITLES[name]}" in out) == (TITLES[name] is not None)
        assert decodes_per_file(m) <= 1
    finally:
        m.stop()


def test_minidlna_decodes_nothing_and_stores_title_and_duration(mount, tmp_path):
    """minidlna walks the chunks without pad bytes and reads LIST/INFO only: it finds the
    INFO that the layout places for such readers (see ecdcfs.wav)."""
    require("minidlnad")
    db = tmp_path / "minidlna"
    db.mkdir()
    with socket.socket() as s:  # a free port for its HTTP server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = db / "minidlna.conf"
    conf.write_text(f"media_dir=A,{mount.mnt}\ndb_dir={db}\nlog_dir={db}\nport={port}\n")
    daemon = subprocess.Popen(
        ["minidlnad", "-f", str(conf), "-d", "-P", str(db / "pid"), "-R"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        log = ""
        for line in daemon.stdout:
            log += line
            if "Scanning" in line and "finished" in line:
                break
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    assert "finished (4 files)" in log, log
    with sqlite3.connect(db / "files.db") as con:
        query = "SELECT PATH, TITLE, DURATION, SAMPLERATE, CHANNELS FROM DETAILS WHERE PATH LIKE ?"
        rows = con.execute(query, ("%.wav",))
        found = {Path(path).stem: rest for path, *rest in rows}
    assert found == {
        name: [title or name, f"0:00:{SECONDS:02d}.000", SR, 2] for name, title in TITLES.items()
    }
    assert decodes_per_file(mount) == 0


def test_listing_and_stat_decode_nothing(mount):
    for _ in range(2):
        subprocess.run(["ls", "-lR", str(mount.mnt)], capture_output=True, check=True)
        subprocess.run(["du", "-s", str(mount.mnt)], capture_output=True, check=True)
    assert mount.stats()["decodes_started"] == 0
