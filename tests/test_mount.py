"""Real FUSE mounts of ``ecdcfs``: what programs see through the mount.

One foreground mount of a small library serves most tests (module-scoped); long and
edge-length files mount their own. Every mount is unmounted in teardown, lazily if need
be. The mount's life (daemons, signals, fstab) is in test_daemon.py; bad files, changing
sources and missing checkpoints have their own modules.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import subprocess
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mutagen.wave import WAVE

import helpers
import synth
from mounting import (
    SR,
    TITLE,
    Mount,
    fuse_available,
    is_mounted,
    pread_full,
    source_folder,
    wav_bytes,
    wav_size,
)

pytestmark = pytest.mark.mount

SONG_SAMPLES = 2 * SR  # 2 s, 3 frames
SHORT_SAMPLES = SR  # 1 s, 2 frames
HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None

if not fuse_available():
    pytest.skip("needs /dev/fuse and fusermount", allow_module_level=True)


# ----- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory, media) -> Path:
    src = tmp_path_factory.mktemp("library")
    (src / "song.ecdc").write_bytes(media["song"])
    (src / "titled.ecdc").write_bytes(media["short_v193"])
    (src / "Disc 1 [bonus]").mkdir()
    (src / "Disc 1 [bonus]" / "Ünïcode track.ecdc").write_bytes(media["short"])
    (src / "Disc 1 [bonus]" / "notes.txt").write_text("liner notes\n")
    with open(bytes(src / "Disc 1 [bonus]") + b"/caf\xe9 \xff.ecdc", "wb") as f:  # not UTF-8
        f.write(media["short"])
    (src / "cold.ecdc").write_bytes(media["short_v192"])
    (src / "entropy coded.ecdc").write_bytes(media["lm"])
    (src / "cover.jpg").write_bytes(random.Random(5).randbytes(300_000))
    (src / "bad magic.ecdc").write_bytes(b"RIFF" + media["short"][4:])
    (src / "truncated.ecdc").write_bytes(media["song"][: len(media["song"]) // 2])
    os.symlink("cover.jpg", src / "cover link.jpg")
    return src


@pytest.fixture(scope="module")
def mount(library, tmp_path_factory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("mount")
    m = Mount(library, base / "mnt", base / "ecdcfs.log")
    try:
        yield m
    finally:
        m.stop()
    assert not is_mounted(m.mnt)


@pytest.fixture(scope="module")
def song_bytes(mount) -> bytes:
    """song.wav read sequentially (``cp``) through the mount."""
    out = mount.mnt.parent / "copy.wav"
    subprocess.run(["cp", str(mount.mnt / "song.wav"), str(out)], check=True, timeout=300)
    return out.read_bytes()


# ----- through the mount --------------------------------------------------------------


def test_listing_and_sizes(mount, media):
    listing = subprocess.run(
        ["ls", "-l", str(mount.mnt), str(mount.mnt / "Disc 1 [bonus]")],
        capture_output=True,
        errors="surrogateescape",
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    assert "caf\udce9 \udcff.wav" in listing.stdout
    assert sorted(os.listdir(mount.mnt)) == sorted(
        [
            "song.wav",
            "titled.wav",
            "cold.wav",
            "entropy coded.wav",
            "Disc 1 [bonus]",
            "cover.jpg",
            "bad magic.wav",
            "truncated.wav",
            "cover link.jpg",
        ]
    )
    assert sorted(os.listdir(bytes(mount.mnt / "Disc 1 [bonus]"))) == [
        b"caf\xe9 \xff.wav",
        b"notes.txt",
        "Ünïcode track.wav".encode(),
    ]
    assert os.stat(mount.mnt / "song.wav").st_size == wav_size(SONG_SAMPLES * 2 * 2)
    titled = len(wav_bytes(media["short_pcm"], 44_100, TITLE))
    assert os.stat(mount.mnt / "titled.wav").st_size == titled
    st = os.stat(mount.mnt / "song.wav")
    src_st = os.stat(mount.src / "song.ecdc")
    assert st.st_mtime_ns == src_st.st_mtime_ns
    assert st.st_mode & 0o777 == src_st.st_mode & 0o555
    assert os.readlink(mount.mnt / "cover link.jpg") == "cover.jpg"


def test_models_load_in_the_background_after_mounting(mount):
    # Nothing has read audio yet (tests run in file order): the warm-up thread loads it.
    deadline = time.monotonic() + 120
    while "loaded encodec_48khz" not in mount.log_text():
        assert time.monotonic() < deadline, mount.log_text()
        time.sleep(0.2)


def test_sequential_read_is_the_reference(song_bytes, media):
    assert song_bytes == wav_bytes(media["song_pcm"], SR)
    with _wave(song_bytes) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (
            2,
            2,
            SR,
            SONG_SAMPLES,
        )
        data = w.readframes(SONG_SAMPLES)
    assert data == media["song_pcm"].astype("<i2").tobytes()


def _wave(data: bytes):
    return wave.open(io.BytesIO(data), "rb")


def test_random_tail_first_and_past_eof_reads(mount, song_bytes):
    size = len(song_bytes)
    rng = random.Random(1)
    fd = os.open(mount.mnt / "song.wav", os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, size - 1000) == song_bytes[-1000:]  # tail first
        assert os.pread(fd, 100, size - 10) == song_bytes[-10:]
        assert os.pread(fd, 100, size) == b""
        assert os.pread(fd, 100, size + 12345) == b""
        for _ in range(40):
            offset = rng.randrange(size)
            length = rng.choice([1, 3, 44, 4096, 100_000, 200_000])
            assert os.pread(fd, length, offset) == song_bytes[offset : offset + length]
    finally:
        os.close(fd)


def test_concurrent_cold_reads(mount, media):
    """Threads reading a file nothing has decoded yet, through shared and own handles."""
    expected = wav_bytes(media["short_pcm"], SR)
    size = len(expected)
    path = mount.mnt / "cold.wav"
    shared = os.open(path, os.O_RDONLY)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        own = os.open(path, os.O_RDONLY)
        try:
            for i in range(20):
                fd = rng.choice([own, shared])
                length = rng.choice([7, 4096, 65_536, 131_072])
                offset = size - 5000 if i == 0 and seed % 2 else rng.randrange(size)
                got = pread_full(fd, length, offset)
                assert got == expected[offset : offset + length], (seed, offset, length)
        finally:
            os.close(own)

    errors = helpers.run_in_threads(worker, [(i,) for i in range(8)])
    os.close(shared)
    assert not errors, errors[0]
    assert path.read_bytes() == expected


def test_entropy_coded_file(mount, media):
    path = mount.mnt / "entropy coded.wav"
    expected = wav_bytes(media["lm_pcm"], SR)
    with open(path, "rb") as f:  # tail first, then all of it
        f.seek(-3000, os.SEEK_END)
        assert f.read() == expected[-3000:]
    assert path.read_bytes() == expected


def test_v193_rate_and_title(mount, media):
    data = (mount.mnt / "titled.wav").read_bytes()
    assert data == wav_bytes(media["short_pcm"], 44_100, TITLE)
    with _wave(data) as w:
        assert w.getframerate() == 44_100 and w.getnframes() == SHORT_SAMPLES
    assert TITLE.encode() in data[:200]  # ID3, then LIST/INFO for minidlna only
    assert WAVE(mount.mnt / "titled.wav").tags["TIT2"].text == [TITLE]  # the tag reader's view


def test_subfolder_with_unicode_names(mount, media):
    data = (mount.mnt / "Disc 1 [bonus]" / "Ünïcode track.wav").read_bytes()
    assert data == wav_bytes(media["short_pcm"], SR)
    assert (mount.mnt / "Disc 1 [bonus]" / "notes.txt").read_text() == "liner notes\n"
    with open(bytes(mount.mnt / "Disc 1 [bonus]") + b"/caf\xe9 \xff.wav", "rb") as f:
        assert f.read() == wav_bytes(media["short_pcm"], SR)


@pytest.mark.skipif(not HAVE_FFMPEG, reason="needs ffmpeg and ffprobe")
def test_ffprobe_and_ffmpeg_seek(mount, media):
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=sample_rate,channels,duration,codec_name",
            "-of",
            "json",
            str(mount.mnt / "song.wav"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    stream = json.loads(probe.stdout)["streams"][0]
    assert stream["codec_name"] == "pcm_s16le"
    assert int(stream["sample_rate"]) == SR and stream["channels"] == 2
    assert float(stream["duration"]) == pytest.approx(SONG_SAMPLES / SR, abs=1e-3)
    out = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-ss",
            "1.5",
            "-i",
            str(mount.mnt / "song.wav"),
            "-f",
            "s16le",
            "-",
        ],
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    start = int(1.5 * SR)
    assert out == media["song_pcm"][start:].astype("<i2").tobytes()


def test_passthrough_files_identical(mount, library):
    for name in ("cover.jpg", "cover link.jpg"):
        assert (mount.mnt / name).read_bytes() == (library / "cover.jpg").read_bytes()


def test_writes_fail_with_erofs(mount):
    attempts = [
        lambda: open(mount.mnt / "new.txt", "w"),  # noqa: SIM115
        lambda: open(mount.mnt / "song.wav", "r+b"),  # noqa: SIM115
        lambda: open(mount.mnt / "cover.jpg", "ab"),  # noqa: SIM115
        lambda: os.remove(mount.mnt / "cover.jpg"),
        lambda: os.mkdir(mount.mnt / "d"),
        lambda: os.rename(mount.mnt / "cover.jpg", mount.mnt / "c.jpg"),
        lambda: os.chmod(mount.mnt / "song.wav", 0o777),
        lambda: os.symlink("x", mount.mnt / "l"),
        lambda: os.truncate(mount.mnt / "song.wav", 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert (mount.src / "cover.jpg").exists()


# ----- long and edge-length files -----------------------------------------------------


def test_one_hour_24khz_file_mounts_seeks_and_streams_in_bounded_memory(torch_home, tmp_path):
    rate, nc = 24_000, 2
    samples = 3600 * rate + 7
    data = synth.container_24khz(samples, nc, synth.random_packed_24khz(samples, nc, seed=8))
    src = source_folder(tmp_path, {"hour.ecdc": data})
    path = src / "hour.ecdc"
    m = Mount(src, tmp_path / "mnt", tmp_path / "log", "--cache-mb", "16")
    try:
        wav = m.mnt / "hour.wav"
        assert os.stat(wav).st_size == wav_size(2 * samples)
        deadline = time.monotonic() + 120
        while "loaded encodec_24khz" not in m.log_text():  # the only model its files use
            assert time.monotonic() < deadline, m.log_text()
            time.sleep(0.2)
        pid = m.proc.pid
        rss_kib = helpers.proc_kib(pid, "VmRSS")
        assert helpers.reset_peak_rss(pid)
        from ecdcfs.engine import Engine, Settings

        engine = Engine(Settings(device="cpu", exact=True, cache_dir=None))
        expected = engine.open(path)
        with open(wav, "rb") as f:
            seek = 8192 + 2 * 45 * 60 * rate  # 45:00
            assert os.pread(f.fileno(), 2 * rate, seek) == expected.read(seek, 2 * rate)
            start = 8192 + 2 * 10 * 60 * rate  # 10:00, then 40 s in 128 KiB reads
            f.seek(start)
            for offset in range(start, start + 2 * 40 * rate, 128 << 10):
                assert f.read(128 << 10) == expected.read(offset, 128 << 10), offset
        engine.close()
        growth_mb = (helpers.proc_kib(pid, "VmHWM") - rss_kib) / 1024
        # A 6 s decode's activations (~300 MB at their peak) and a 16 MB cache, whatever
        # the length: decoding the hour in one piece, as encodec does, takes ~60 GB.
        assert growth_mb < 450, growth_mb
        assert "loaded encodec_48khz" not in m.log_text()
    finally:
        m.stop()


def test_lm_coded_24khz_file_reads_like_the_plain_file_of_its_codes(torch_home, tmp_path):
    """Two chunks of LM-coded 24 kHz through the mount: the index is built in blocks from
    one arithmetic-coded stream; the bytes equal those of the same codes bit-packed."""
    from ecdcfs.container import MODELS, unpack_codes
    from ecdcfs.lm import load_lm

    samples, nc = 400 * 320 - 9, 2  # 400 code steps: a 375-step chunk and a short one
    plain = synth.random_packed_24khz(samples, nc, seed=21)
    lm = load_lm(MODELS["encodec_24khz"])
    lm_coded = synth.lm_encode(lm, unpack_codes(plain, nc, 400, 10))
    src = source_folder(
        tmp_path,
        {
            "lm.ecdc": synth.container_24khz(samples, nc, lm_coded, lm=True),
            "plain.ecdc": synth.container_24khz(samples, nc, plain),
        },
    )
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    try:
        with open(m.mnt / "lm.wav", "rb") as f:  # the second chunk first
            tail = os.pread(f.fileno(), 10_000, 8192 + 2 * 375 * 320 - 5000)
            whole = f.read()
        expected = (m.mnt / "plain.wav").read_bytes()
        assert whole == expected and len(whole) == wav_size(2 * samples)
        assert tail == expected[8192 + 2 * 375 * 320 - 5000 :][:10_000]
        assert "Traceback" not in m.log_text()
    finally:
        m.stop()


def test_edge_length_library_copies_whole(torch_home, tmp_path):
    """Lengths that end on two short frames, or whose second-to-last frame reaches past
    the last one's end: `cp -r` of the library succeeds and every byte is the reference."""
    lengths = [2 * SR - 2 * 480 + 1, SR - 480 + 320, 4 * 47_520 + 160]  # k*47,520 + r
    files = {f"{n}.ecdc": synth.make_ecdc(samples=n, kbps=3, seed=n) for n in lengths}
    src = source_folder(tmp_path, files)
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    try:
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-r", str(m.mnt), str(copy)], check=True, timeout=300)
        for n in lengths:
            expected = synth.reference_pcm(files[f"{n}.ecdc"])
            assert os.stat(m.mnt / f"{n}.wav").st_size == wav_size(4 * n)
            with wave.open(str(copy / f"{n}.wav")) as w:
                assert w.getnframes() == n
                pcm = np.frombuffer(w.readframes(n), "<i2").reshape(-1, 2)
            assert np.array_equal(pcm, expected)
        assert " ERROR " not in m.log_text()
    finally:
        m.stop()


# ----- the default decoder ------------------------------------------------------------


def test_default_decoder_mount_never_loads_torch_and_is_the_same_on_every_mount(
    tmp_path, media, default_cache
):
    """Plain files with their graphs cached: the daemon never maps libtorch, cp -r gives
    each file within 2 LSB of encodec's decode, and a second mount gives the same bytes."""
    src = source_folder(tmp_path, {"song.ecdc": media["song"], "short.ecdc": media["short_v193"]})
    copies = []
    for n in range(2):
        base = tmp_path / f"mount{n}"
        base.mkdir()
        m = Mount(src, base / "mnt", base / "log", "--cache-dir", str(default_cache), exact=False)
        try:
            subprocess.run(["cp", "-r", str(m.mnt), str(base / "copy")], check=True, timeout=300)
            maps = Path(f"/proc/{m.proc.pid}/maps").read_text()
            assert "libtorch" not in maps and "onnxruntime" in maps
        finally:
            m.stop()
        copies.append({p.name: p.read_bytes() for p in (base / "copy").iterdir()})
    assert copies[0] == copies[1]
    for name, pcm in (("song.wav", media["song_pcm"]), ("short.wav", media["short_pcm"])):
        copy = copies[0][name]
        start = copy.index(b"data") + 8
        got = np.frombuffer(copy[start : start + pcm.nbytes], "<i2").reshape(pcm.shape)
        assert np.abs(got.astype(np.int32) - pcm).max() <= 2


def test_statfs_and_mount_table_name_the_source(mount):
    """df shows the disk SOURCE is on (not a full disk), and names SOURCE as the device."""
    sv, src = os.statvfs(mount.mnt), os.statvfs(mount.src)
    assert (sv.f_blocks, sv.f_bsize, sv.f_files) == (src.f_blocks, src.f_bsize, src.f_files)
    assert sv.f_bfree > 0 and abs(sv.f_bavail - src.f_bavail) < src.f_blocks // 100
    assert sv.f_flag & os.ST_RDONLY
    found = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(mount.mnt)], capture_output=True, text=True
    )
    assert found.stdout.split() == [str(mount.src.resolve()), "fuse.ecdcfs"]
    df = subprocess.run(["df", "-P", str(mount.mnt)], capture_output=True, text=True)
    assert df.stdout.splitlines()[1].split()[0] == str(mount.src.resolve())
