"""Hardening without a mount: hostile files, files changing under us, the index cache.

Mount-level counterparts (EIO through the kernel, signals, load) are in
``test_mount_hardening.py``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import synth
from ecdcfs import cli, index
from ecdcfs.cache_dir import INDEX_SUFFIX, clear_files, enforce_cap
from ecdcfs.container import MODELS, EcdcError, FrameLayout
from ecdcfs.decoder import ModelUnavailable
from ecdcfs.engine import Engine, Settings
from ecdcfs.index import CodeIndex, IndexStore
from ecdcfs.names import AUDIO
from ecdcfs.options import Config
from ecdcfs.settings import default_cache_dir
from ecdcfs.tree import SourceTree
from mounting import wav_size

HEADER = struct.Struct("!4sBI")


def raw(meta, payload: bytes = b"", version: int = 0) -> bytes:
    body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return HEADER.pack(b"ECDC", version, len(body)) + body + payload


def plain(samples: int = 4800, model: str = "encodec_48khz", nc: int = 2, **extra) -> bytes:
    meta = {"m": model, "al": samples, "nc": nc, "lm": False, **extra}
    return raw(meta, bytes(FrameLayout(MODELS[model], samples, nc).plain_payload_bytes()))


def meta48(**changes) -> dict:
    return {"m": "encodec_48khz", "al": 4800, "nc": 2, "lm": False, **changes}


# Every kind of bad header the issue lists, as files (the container tests parse them;
# here they go through the view: listed, stat-able, refused at open with one log line).
BAD_FILES = {
    "empty.ecdc": b"",
    "magic.ecdc": b"RIFF" + plain()[4:],
    "version.ecdc": plain()[:4] + bytes([9]) + plain()[5:],
    "json.ecdc": raw(b'{"m": "encodec_48khz", "al": 48'),
    "not utf8.ecdc": raw(b'{"m": "\xff"}'),
    "meta past end.ecdc": HEADER.pack(b"ECDC", 0, 1000) + b"{}",
    "meta near 4 GiB.ecdc": HEADER.pack(b"ECDC", 0, 0xFFFF_FFF0) + b"{}",
    "truncated mid-frame.ecdc": plain(100_000)[:-7],
    "al 1e12.ecdc": raw(meta48(al=10**12), bytes(4096)),
    "al 1e12 lm.ecdc": raw(meta48(al=10**12, lm=True), bytes(4096)),
    "nc 0.ecdc": raw(meta48(nc=0), bytes(4096)),
    "nc 17.ecdc": raw(meta48(nc=17), bytes(4096)),
    "nc 33 24k.ecdc": raw(meta48(m="encodec_24khz", nc=33), bytes(4096)),
    "model.ecdc": raw(meta48(m="encodec_96khz"), bytes(4096)),
    "model type.ecdc": raw(meta48(m=["encodec_48khz"]), bytes(4096)),
    "al string.ecdc": raw(meta48(al="4800"), bytes(4096)),
    "al float.ecdc": raw(meta48(al=4800.0), bytes(4096)),
    "nc bool.ecdc": raw(meta48(nc=True), bytes(4096)),
    "lm int.ecdc": raw(meta48(lm=1), bytes(4096)),
    "sr string.ecdc": raw(meta48(sr="fast"), bytes(4096), version=193),
    "title number.ecdc": raw(meta48(n=5), bytes(4096), version=193),
    "array.ecdc": raw([1, 2, 3]),
}


class RecordingEngine:
    """Engine stand-in: records the bytes each open snapshot holds, decodes nothing."""

    def __init__(self) -> None:
        from ecdcfs.settings import Settings

        self.opened: list[int] = []
        self.settings = Settings()

    def __call__(self):
        return self

    def open(self, path, data, riff_info=False):
        from ecdcfs.audiofile import AudioFile
        from ecdcfs.container import parse_header
        from ecdcfs.source import MemorySource

        self.opened.append(len(data))
        header = parse_header(data, len(data))
        return AudioFile(self, str(path), MemorySource(data), header, riff_info)

    def close(self) -> None:
        pass


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    return d


def test_every_bad_header_lists_stats_and_fails_fast_with_one_line(src, caplog):
    engine = RecordingEngine()
    tree = SourceTree(src, engine_factory=engine)
    for name, data in BAD_FILES.items():
        (src / name).write_bytes(data)
    (src / "good.ecdc").write_bytes(plain(9_600))
    (src / "dir.ecdc").mkdir()  # a folder named like audio is a folder
    (src / "dir.ecdc" / "inner.ecdc").write_bytes(b"junk")
    caplog.set_level(logging.INFO, logger="ecdcfs")
    listing = dict(tree.readdir("/"))
    assert set(listing) == {n[:-5] + ".wav" for n in BAD_FILES} | {"good.wav", "dir.ecdc"}
    for name in BAD_FILES:
        path = "/" + name[:-5] + ".wav"
        assert tree.getattr(path).size == 0, name
        started = time.monotonic()
        for _ in range(2):
            with pytest.raises(EcdcError):
                tree.open(path)
        assert time.monotonic() - started < 2, name
    assert tree.getattr("/dir.ecdc/inner.wav").size == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(BAD_FILES)  # one line per file, naming it
    for name in BAD_FILES:
        lines = [r.getMessage() for r in errors if f"/{name}: " in r.getMessage()]
        assert len(lines) == 1, (name, lines)
    assert all(r.exc_info is None for r in errors)
    # The rest of the view is unaffected, and no bad file ever reached the engine.
    fh = tree.open("/good.wav")
    assert tree.read(fh, 4, 0) == b"RIFF"
    tree.release(fh)
    assert engine.opened == [len(plain(9_600))]


def test_huge_files_are_never_read_whole(src):
    """A sparse 8 GiB file costs no memory: rejected from its header, or trimmed."""
    engine = RecordingEngine()
    tree = SourceTree(src, engine_factory=engine)
    with open(src / "zeros.ecdc", "wb") as f:
        f.truncate(8 << 30)
    good = plain(48_000)
    with open(src / "tail.ecdc", "wb") as f:  # a valid file followed by 8 GiB of zeros
        f.write(good)
        f.truncate(8 << 30)
    lm = raw(meta48(al=10 * 48_000, lm=True), bytes(100))  # a valid LM-coded header
    with open(src / "lm.ecdc", "wb") as f:
        f.write(lm)
        f.truncate(8 << 30)
    started = time.monotonic()
    assert tree.getattr("/zeros.wav").size == 0
    with pytest.raises(EcdcError):
        tree.open("/zeros.wav")
    fh = tree.open("/tail.wav")
    assert engine.opened == [len(good)]  # only the bytes the header describes
    assert tree.getattr("/tail.wav", fh).size == wav_size(48_000 * 4)
    tree.release(fh)
    fh = tree.open("/lm.wav")  # 11 frames of at most 16 + 150 * 2 * 4 bytes are read
    assert engine.opened[-1] == len(lm) - 100 + 11 * (16 + 150 * 2 * 4)
    tree.release(fh)
    assert time.monotonic() - started < 5


def test_a_file_changing_while_it_is_snapshotted_is_read_again(src, monkeypatch):
    import ecdcfs.tree as tree_module

    engine = RecordingEngine()
    tree = SourceTree(src, engine_factory=engine)
    path = src / "x.ecdc"
    path.write_bytes(plain(4_800))
    real = tree_module.read_all
    writes = [plain(9_600)]

    def rewrite_during_read(fd, size):
        data = real(fd, size)
        if writes:  # a writer rewrites the file in place while we read it
            with open(path, "r+b") as f:
                f.write(writes.pop())
        return data

    monkeypatch.setattr(tree_module, "read_all", rewrite_during_read)
    fh = tree.open("/x.wav")
    # The first read saw the old bytes of a file that changed: it was read again, whole.
    assert engine.opened == [len(plain(9_600))]
    assert fh.audio.size == wav_size(9_600 * 4)
    tree.release(fh)

    def always_rewrite(fd, size):
        data = real(fd, size)
        os.utime(path, ns=(0, time.time_ns()))
        return data

    monkeypatch.setattr(tree_module, "read_all", always_rewrite)
    path.write_bytes(plain(14_400))
    with pytest.raises(EcdcError, match="kept changing"):
        tree.open("/x.wav")


def test_audio_and_other_versions_of_one_path_bypass_the_page_cache(src):
    """Audio always (reads reach the tree as the reader made them); another file while a
    handle of another version of its path is open (the kernel caches pages by path)."""
    tree = SourceTree(src, engine_factory=RecordingEngine())
    (src / "x.ecdc").write_bytes(plain(4_800))
    (src / "a.txt").write_text("old")
    first, same = tree.open("/x.wav"), tree.open("/x.wav")
    text = tree.open("/a.txt")
    assert first.bypass_page_cache and same.bypass_page_cache and not text.bypass_page_cache
    (src / "new").write_bytes(plain(9_600))
    os.replace(src / "new", src / "x.ecdc")
    (src / "new").write_text("new!")
    os.replace(src / "new", src / "a.txt")
    second = tree.open("/x.wav")  # another version while the first is open
    text2 = tree.open("/a.txt")
    assert second.bypass_page_cache and text2.bypass_page_cache
    assert tree.read(text, 10, 0) == b"old" and tree.read(text2, 10, 0) == b"new!"
    assert tree.getattr("/x.wav", first).size == wav_size(4_800 * 4)
    assert tree.getattr("/x.wav", second).size == wav_size(9_600 * 4)
    for fh in (first, same, text):
        tree.release(fh)
    third = tree.open("/x.wav")
    text3 = tree.open("/a.txt")  # only its own version is open: the page cache is safe
    assert third.bypass_page_cache and not text3.bypass_page_cache
    for fh in (second, third, text2, text3):
        tree.release(fh)
    assert tree.open_handles == 0


def test_deleted_or_truncated_source_keeps_serving_the_open_snapshot(src):
    tree = SourceTree(src, engine_factory=RecordingEngine())
    path = src / "x.ecdc"
    path.write_bytes(plain(4_800))
    fh = tree.open("/x.wav")
    head = tree.read(fh, 44, 0)
    with open(path, "r+b") as f:
        f.truncate(10)
    assert tree.getattr("/x.wav").size == 0  # the file as it is now
    with pytest.raises(EcdcError):
        tree.open("/x.wav")
    path.unlink()
    with pytest.raises(FileNotFoundError):
        tree.getattr("/x.wav")
    assert tree.read(fh, 44, 0) == head  # the handle reads what it opened
    assert tree.getattr("/x.wav", fh).size == wav_size(4_800 * 4)  # fstat still works
    tree.release(fh)


# ----- decoding hostile payloads (needs the synthetic models) --------------------------


def _garbage_lm(data: bytes, keep: int, seed: int) -> bytes:
    """``data`` with its LM payload replaced by random bytes after ``keep`` bytes."""
    _, _, offset = synth.parse_header(data)
    rng = random.Random(seed)
    tail = len(data) - offset - keep
    return data[: offset + keep] + rng.randbytes(tail)


def _read_everything(audio, timeout: float) -> tuple[str, float]:
    """Read the whole WAV in a thread: ('ok' | error text, seconds); fails on a hang."""
    result: list[str] = []

    def run() -> None:
        reader = audio.reader()
        try:
            out, offset = bytearray(), 0
            while chunk := reader.read(offset, 128 * 1024):
                out += chunk
                offset += len(chunk)
            assert len(out) == audio.size
            result.append("ok")
        except EcdcError as exc:
            result.append(f"error: {exc}")
        finally:
            reader.close()

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"reading a garbage LM payload hung for {timeout} s"
    return result[0], time.monotonic() - started


@pytest.mark.parametrize(
    ("model", "samples", "keep", "seeds"),
    [
        ("encodec_48khz", 30_000, 0, 2),  # all random, from the first frame's scale on
        ("encodec_48khz", 100_000, 40, 1),  # a valid start, random after
        ("encodec_24khz", 12_000, 0, 2),
    ],
)
def test_garbage_lm_payload_fails_or_plays_but_never_hangs(
    torch_home, tmp_path, model, samples, keep, seeds
):
    """Random bytes after a valid LM header decode to some audio or fail; never hang."""
    data = synth.make_ecdc(model=model, samples=samples, kbps=6, lm=True, seed=3)
    engine = Engine(Settings(device="cpu", exact=True, cache_dir=tmp_path / "cache"))
    try:
        for seed in range(seeds):
            bad = _garbage_lm(data, keep, seed)
            audio = engine.open(tmp_path / f"g{seed}.ecdc", bad)
            outcome, seconds = _read_everything(audio, timeout=120)
            assert outcome == "ok" or outcome.startswith("error: "), outcome
            assert seconds < 60
        good = engine.open(tmp_path / "good.ecdc", data)  # the engine still works
        assert _read_everything(good, timeout=120)[0] == "ok"
    finally:
        engine.close()


@pytest.mark.skipif(
    subprocess.run(
        [sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]
    ).returncode,
    reason="CUDA is available here",
)
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "bogus"])
def test_unavailable_device_fails_reads_quickly_and_clearly(torch_home, tmp_path, device, caplog):
    data = synth.make_ecdc(samples=30_000, kbps=6)
    engine = Engine(Settings(device=device, cache_dir=None))
    try:
        audio = engine.open(tmp_path / "x.ecdc", data)
        started = time.monotonic()
        for _ in range(2):  # reported once, then remembered
            with pytest.raises(ModelUnavailable, match="device") as info:
                audio.read(0, 100_000)
        assert repr(device) in str(info.value)
        assert time.monotonic() - started < 60
    finally:
        engine.close()
    assert sum(r.levelno >= logging.ERROR for r in caplog.records) == 1


def read_tree(tree: SourceTree, fh: int) -> bytes:
    """The whole file through the tree (a read of the header ends where the PCM begins)."""
    out = bytearray()
    while chunk := tree.read(fh, 1 << 20, len(out)):
        out += chunk
    return bytes(out)


def test_a_checkpoint_copied_in_is_used_at_the_next_read(
    torch_home, tmp_path, src, engine, monkeypatch, caplog
):
    """A model that failed to load is tried again when its checkpoint file changes (it
    appears, a partial copy is completed), not at every read: offline, no download is
    attempted twice."""
    for name, lm in (("x.ecdc", False), ("y.ecdc", True)):
        (src / name).write_bytes(synth.make_ecdc(samples=30_000, kbps=6, lm=lm, seed=3))
    expected = {n: read_whole(engine.open(src / f"{n}.ecdc")) for n in "xy"}
    seeded = synth.checkpoint_dir(torch_home)
    home = tmp_path / "home"
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    downloads = []

    def fail_download(url, *args, **kwargs):
        downloads.append(url.rsplit("/", 1)[-1])
        raise OSError("network is unreachable")

    def read(fh: int) -> bytes:
        return read_tree(tree, fh)

    monkeypatch.setattr("ecdcfs.checkpoint.download", fail_download)
    caplog.set_level(logging.INFO, logger="ecdcfs")
    tree = SourceTree(
        src, engine_factory=lambda: Engine(Settings(device="cpu", exact=True, cache_dir=None))
    )
    try:
        x, y = tree.open("/x.wav"), tree.open("/y.wav")
        for _ in range(3):
            for fh in (x, y):
                with pytest.raises(ModelUnavailable, match="encodec_48khz-7e698e3e.th is missing"):
                    read(fh)
        assert downloads == ["encodec_48khz-7e698e3e.th"]
        for path in ("/x.wav", "/y.wav"):  # the reason, with the URL, in the xattr
            assert f"from {URL}encodec_48khz-7e698e3e.th " in tree.error(path)
        model = (seeded / "encodec_48khz-7e698e3e.th").read_bytes()
        (checkpoints / "encodec_48khz-7e698e3e.th").write_bytes(model[: len(model) // 2])
        assert tree.error("/x.wav") is None  # changed: the next read tries again
        for _ in range(2):
            with pytest.raises(ModelUnavailable, match="cannot load encodec_48khz from"):
                read(x)
        assert "partial or damaged copy" in tree.error("/x.wav")
        (checkpoints / "part").write_bytes(model)  # the copy completed
        os.replace(checkpoints / "part", checkpoints / "encodec_48khz-7e698e3e.th")
        assert read(x) == expected["x"]
        assert tree.error("/x.wav") is None
        for _ in range(2):  # the LM-coded file needs the LM checkpoint too
            with pytest.raises(ModelUnavailable, match="encodec_lm_48khz-7add9fc3.th is missing"):
                read(y)
        assert downloads == ["encodec_48khz-7e698e3e.th", "encodec_lm_48khz-7add9fc3.th"]
        assert "encodec_lm_48khz-7add9fc3.th is missing" in tree.error("/y.wav")
        assert tree.error("/x.wav") is None
        shutil.copy(seeded / "encodec_lm_48khz-7add9fc3.th", checkpoints)
        assert read(y) == expected["y"]
        assert tree.error("/y.wav") is None
    finally:
        tree.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3, errors  # missing, then a partial copy; the missing LM
    found = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
    found = [m for m in found if m not in errors and not m.startswith("downloading")]
    assert found == [
        "encodec_48khz loaded: its checkpoint encodec_48khz-7e698e3e.th was found",
        "encodec_48khz LM loaded: its checkpoint encodec_lm_48khz-7add9fc3.th was found",
    ]


URL = "https://dl.fbaipublicfiles.com/encodec/v0/"  # encodec's ROOT_URL


def read_whole(audio) -> bytes:
    return audio.read(0, audio.size)


def test_a_frame_that_cannot_be_decoded_says_why_in_the_xattr(torch_home, src, caplog):
    data = synth.make_ecdc(samples=100_000, kbps=6, seed=4)
    _, meta, offset = synth.parse_header(data)
    frame = FrameLayout(MODELS["encodec_48khz"], 100_000, meta["nc"]).plain_frame_offset(1)
    nan_scale = struct.pack("!f", float("nan"))
    (src / "bad.ecdc").write_bytes(data[: offset + frame] + nan_scale + data[offset + frame + 4 :])
    (src / "good.ecdc").write_bytes(data)
    tree = SourceTree(
        src, engine_factory=lambda: Engine(Settings(device="cpu", exact=True, cache_dir=None))
    )
    try:
        fh = tree.open("/bad.wav")
        assert tree.error("/bad.wav") is None  # not known before a read needs frame 1
        pcm = len(fh.audio.wav.header)
        assert len(tree.read(fh, 1000, pcm)) == 1000  # frame 0 is fine
        for _ in range(2):
            with pytest.raises(EcdcError, match="non-finite scale"):
                tree.read(fh, 10**6, pcm)
        assert tree.error("/bad.wav") == "frame 1 has a non-finite scale nan"
        good = tree.open("/good.wav")
        tree.read(good, 10**6, pcm)
        assert tree.error("/good.wav") is None
    finally:
        tree.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"cannot decode {src}/bad.ecdc: frame 1 has a non-finite scale nan"]


def test_full_cache_directory_only_costs_persistence(torch_home, tmp_path, monkeypatch, caplog):
    data = synth.make_ecdc(samples=54_240, kbps=6, lm=True)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    engine = Engine(Settings(device="cpu", exact=True, cache_dir=tmp_path / "cache"))
    try:
        audio = engine.open(tmp_path / "x.ecdc", data)
        assert _read_everything(audio, timeout=120)[0] == "ok"
        assert engine.indexes.directory is None  # gave up persisting, kept serving
    finally:
        engine.close()
    assert "No space left on device" in caplog.text
    assert not list((tmp_path / "cache").glob("*.tmp"))  # no half-written file left


def test_a_real_full_filesystem_only_costs_persistence(torch_home, tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    cache = tmp_path / "small"
    cache.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr!r}")
    try:
        fd = os.open(cache / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill it up
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(4096))
        finally:
            os.close(fd)
        data = synth.make_ecdc(samples=54_240, kbps=6, lm=True)
        engine = Engine(Settings(device="cpu", exact=True, cache_dir=cache / "ecdcfs"))
        try:
            audio = engine.open(tmp_path / "x.ecdc", data)
            assert _read_everything(audio, timeout=120)[0] == "ok"
        finally:
            engine.close()
        assert "cannot persist index" in caplog.text
    finally:
        subprocess.run(["umount", str(cache)], check=True)


# ----- the cache directory ------------------------------------------------------------


def _index(frames: int, codebooks: int = 2, steps: int = 150) -> CodeIndex:
    idx = CodeIndex(frames)
    for i in range(frames):
        idx.append(1.0, np.full((codebooks, steps), i, dtype=np.int64), (i + 1) * 100)
    return idx


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ecdcfs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ecdcfs"
    assert Settings().cache_dir == tmp_path / "home" / ".cache" / "ecdcfs"
    assert Settings().cache_dir_mb == index.DEFAULT_CACHE_DIR_MB == Config().cache_dir_mb


def test_enforce_cap_deletes_least_recently_used_indexes_only(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    now = time.time_ns()
    for i, name in enumerate(["a", "b", "c", "d"]):
        path = cache / f"{name}{INDEX_SUFFIX}"
        path.write_bytes(bytes(1000))
        os.utime(path, ns=(now, now - (10 - i) * 10**9))  # a oldest ... d newest
    (cache / "notes.txt").write_bytes(bytes(5000))  # not ours: never counted or touched
    (cache / "x.codes.npz.abc.tmp").write_bytes(bytes(10))  # ours (a leftover)
    os.utime(cache / "x.codes.npz.abc.tmp", ns=(now, now - 100 * 10**9))
    os.symlink("/etc/passwd", cache / f"link{INDEX_SUFFIX}")  # not a regular file
    keep = cache / f"a{INDEX_SUFFIX}"  # just written: goes last
    assert enforce_cap(cache, 2500, keep=keep) == 3
    assert sorted(p.name for p in cache.iterdir()) == [
        f"a{INDEX_SUFFIX}",
        f"d{INDEX_SUFFIX}",
        f"link{INDEX_SUFFIX}",
        "notes.txt",
    ]
    assert enforce_cap(cache, 10**9) == 0
    assert enforce_cap(tmp_path / "missing", 0) == 0


def test_persisting_keeps_the_directory_under_its_cap_and_loading_touches(tmp_path):
    cache = tmp_path / "cache"
    one = _index(20)
    store = IndexStore(cache, max_bytes=10**9)
    store.persist("aa", one)
    size = (cache / f"aa{INDEX_SUFFIX}").stat().st_size
    store.max_bytes = int(size * 2.5)  # room for two
    store.persist("bb", _index(20))
    old = time.time_ns() - 100 * 10**9
    os.utime(cache / f"aa{INDEX_SUFFIX}", ns=(old, old))
    os.utime(cache / f"bb{INDEX_SUFFIX}", ns=(old + 10**9, old + 10**9))
    # A new store (a remount) loads "aa": it becomes the most recently used.
    store = IndexStore(cache, max_bytes=int(size * 2.5))
    loaded = store.get("aa", 20, 2, lambda unit: 150)
    assert len(loaded) == 20 and int(loaded.codes[7][0, 0]) == 7
    store.persist("cc", _index(20))
    assert sorted(p.name for p in cache.iterdir()) == [
        f"aa{INDEX_SUFFIX}",
        f"cc{INDEX_SUFFIX}",
    ]


@pytest.mark.parametrize(
    "junk", [b"", b"PK\x03\x04 truncated zip", b"\x93NUMPY garbage", os.urandom(3000)]
)
def test_corrupt_index_file_is_ignored(tmp_path, junk, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"ff{INDEX_SUFFIX}").write_bytes(junk)
    store = IndexStore(cache)
    fresh = store.get("ff", 5, 2, lambda unit: 150)
    assert len(fresh) == 0 and fresh.unit_count == 5
    assert "ignoring unreadable index" in caplog.text


def test_index_with_other_unit_lengths_is_ignored(tmp_path, caplog):
    """E.g. an LM-coded 24 kHz file's index written with another chunk size."""
    IndexStore(tmp_path / "cache").persist("aa", _index(3, steps=150))
    assert len(IndexStore(tmp_path / "cache").get("aa", 3, 2, lambda unit: 150)) == 3
    fresh = IndexStore(tmp_path / "cache").get("aa", 3, 2, lambda unit: 100 if unit else 150)
    assert len(fresh) == 0 and "ignoring unreadable index" in caplog.text


def test_clear_cache_deletes_only_indexes(tmp_path):
    cache = tmp_path / "cache"
    IndexStore(cache).persist("aa", _index(3))
    (cache / "bb.codes.npz.x1.tmp").write_bytes(b"x")
    (cache / "keep.txt").write_text("mine")
    (cache / "sub").mkdir()
    assert clear_files(cache)[0] == 2
    assert sorted(p.name for p in cache.iterdir()) == ["keep.txt", "sub"]
    assert clear_files(tmp_path / "missing") == (0, 0)


def _ecdcfs(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ecdcfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_clear_cache_command(tmp_path):
    xdg = tmp_path / "xdg"
    IndexStore(xdg / "ecdcfs").persist("aa", _index(3))
    other = tmp_path / "other"
    IndexStore(other).persist("bb", _index(3))
    (other / "precious.txt").write_text("x")
    done = _ecdcfs("--clear-cache", env={"XDG_CACHE_HOME": str(xdg)})
    assert done.returncode == 0, done.stderr
    assert "deleted 1 code indexes" in done.stdout and str(xdg / "ecdcfs") in done.stdout
    assert not list((xdg / "ecdcfs").iterdir())
    done = _ecdcfs("--clear-cache", "--cache-dir", str(other))
    assert done.returncode == 0 and sorted(os.listdir(other)) == ["precious.txt"]
    done = _ecdcfs("--clear-cache", "a", "b")
    assert done.returncode == 2 and "--clear-cache takes no" in done.stderr


def test_cache_dir_mb_option(tmp_path):
    assert cli.parse_args(["a", "b"]).cache_dir_mb == Settings().cache_dir_mb
    assert cli.parse_args(["a", "b", "--cache-dir-mb", "64"]).cache_dir_mb == 64
    assert cli.parse_args(["a", "b", "-o", "cache_dir_mb=32"]).cache_dir_mb == 32
    assert (
        cli.parse_args(["a", "b", "-o", "cache-dir-mb=32", "--cache-dir-mb", "8"]).cache_dir_mb == 8
    )
    with pytest.raises(cli.UsageError, match="at least 1"):
        cli.parse_args(["a", "b", "--cache-dir-mb", "0"])
    help_text = _ecdcfs("--help").stdout
    for word in ("--cache-dir-mb", "--clear-cache", "fuse.ecdcfs", "mount -t", "least recently"):
        assert word in help_text, word


def test_checkpoints_inside_the_mount_point_are_refused(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "mnt" / "torch"))
    with pytest.raises(cli.UsageError, match="checkpoints"):
        cli.check_paths(cli.parse_args([str(tmp_path / "src"), str(tmp_path / "mnt")]))


def test_view_of_a_hostile_tree_has_no_surprises(src, tmp_path):
    """Names the kernel hands over (spaces, brackets, unicode, bytes) all resolve."""
    tree = SourceTree(src, engine_factory=RecordingEngine())
    names = ["a b.ecdc", "[x] (y) {z}.ecdc", "ünï ☃.ecdc", " lead.ecdc", "trail .ecdc", "\t.ecdc"]
    for name in names:
        (src / name).write_bytes(plain())
    with open(os.fsencode(src) + b"/\xff\xfe.ecdc", "wb") as f:
        f.write(plain())
    shown = dict(tree.readdir("/"))
    assert len(shown) == len(names) + 1
    for name in shown:
        assert tree.resolve("/" + name).kind == AUDIO
        assert tree.getattr("/" + name).size == wav_size(4800 * 4)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzzed_files_through_the_view_only_fail_cleanly(tmp_path_factory, data):
    """Mutated and cut files (plain or LM): getattr always answers, open fails only with
    EcdcError, and a file that opens reads its WAV header."""
    src = tmp_path_factory.mktemp("fuzz")
    lm = data.draw(st.booleans())
    original = bytearray(raw(meta48(al=60_000, lm=lm, nc=4), bytes(8000), version=193))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    (src / "f.ecdc").write_bytes(bytes(original[:cut]))
    tree = SourceTree(src, engine_factory=RecordingEngine())
    size = tree.getattr("/f.wav").size
    try:
        fh = tree.open("/f.wav")
    except EcdcError:
        assert size == 0
        return
    assert size > 0 and tree.read(fh, 4, 0) in (b"RIFF", b"RF64")
    tree.release(fh)


def test_an_index_being_built_is_shared_even_after_eviction(tmp_path):
    """More LM-coded files than the in-memory slots: a reopen finds the running build."""
    store = IndexStore(tmp_path / "cache", in_memory=1)
    gate = threading.Event()

    def scan(first: int, offset: int):
        for unit in range(first, 3):
            assert gate.wait(30)
            yield unit, None, np.full((2, 10), unit, dtype=np.int64), 0

    building = store.get("aa", 3, 2, lambda unit: 10)
    assert len(building) == 0  # empty, and still the one index of "aa"
    assert store.get("aa", 3, 2, lambda unit: 10) is building
    store.build("aa", building, scan, "aa")
    store.get("bb", 3, 2, lambda unit: 10)  # evicts "aa" from memory
    assert store.get("aa", 3, 2, lambda unit: 10) is building
    gate.set()
    assert int(building.get(2).codes[0, 0]) == 2
