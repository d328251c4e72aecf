"""The cache dir: where it is (XDG), its cap, persisted code indexes (reused, shared,
ignored when corrupt), clearing it, and a full or unwritable one costing only
persistence."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import helpers
import synth
from ecdcfs import cli, graph_store, index
from ecdcfs.cache_dir import DIGESTS_FILE, INDEX_SUFFIX, clear_files, enforce_cap
from ecdcfs.engine import Engine, Settings
from ecdcfs.graph_store import GraphStore
from ecdcfs.index import CodeIndex, IndexStore
from ecdcfs.options import Config
from ecdcfs.settings import default_cache_dir
from helpers import read_all


def test_full_cache_directory_only_costs_persistence(torch_home, tmp_path, monkeypatch, caplog):
    data = synth.make_ecdc(samples=54_240, kbps=6, lm=True)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    engine = Engine(Settings(device="cpu", exact=True, cache_dir=tmp_path / "cache"))
    try:
        audio = engine.open(tmp_path / "x.ecdc", data)
        assert helpers.read_everything(audio, timeout=120)[0] == "ok"
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
            assert helpers.read_everything(audio, timeout=120)[0] == "ok"
        finally:
            engine.close()
        assert "cannot persist index" in caplog.text
    finally:
        subprocess.run(["umount", str(cache)], check=True)


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


def test_lm_index_is_persisted_and_reused(torch_home, tmp_path, monkeypatch):
    data = synth.make_ecdc(samples=100_000, kbps=3, lm=True)
    path = synth.write(tmp_path, "x.ecdc", data)
    settings = Settings(device="cpu", exact=True, cache_dir=tmp_path / "cache")
    engine = Engine(settings)
    audio = engine.open(path)
    assert read_all(audio.reader()) == helpers.expected_wav(data)
    engine.close()
    assert list((tmp_path / "cache").glob(f"{audio.identity}.codes.npz"))

    def no_lm(*args, **kwargs):
        raise AssertionError("the persisted index should have been used")

    monkeypatch.setattr("ecdcfs.lm_process.LanguageModel.scan", no_lm)
    engine = Engine(settings)
    try:
        assert read_all(engine.open(path).reader()) == helpers.expected_wav(data)
    finally:
        engine.close()


def test_unwritable_cache_dir_only_costs_persistence(torch_home, tmp_path):
    data = synth.make_ecdc(samples=54_240, kbps=6, lm=True)
    blocker = synth.write(tmp_path, "not-a-dir", b"")
    engine = Engine(Settings(device="cpu", exact=True, cache_dir=blocker / "cache"))
    try:
        audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
        assert read_all(audio.reader()) == helpers.expected_wav(data)
    finally:
        engine.close()


def test_clear_cache_deletes_the_graphs_too(default_cache, capsys):
    from ecdcfs import cli

    (default_cache / "graphs" / "notes.txt").write_text("not ours")
    assert cli.main(["--clear-cache", "--cache-dir", str(default_cache)]) == 0
    assert "and 2 decoder graphs" in capsys.readouterr().out
    assert [p.name for p in (default_cache / "graphs").iterdir()] == ["notes.txt"]


def test_a_checkpoints_digest_is_remembered_until_the_file_changes(
    default_cache, tmp_path, monkeypatch
):
    store = GraphStore(default_cache)
    checkpoint = tmp_path / "model.th"
    checkpoint.write_bytes(b"weights" * 1000)
    first = store.checkpoint_digest(checkpoint)
    assert first == graph_store.file_digest(checkpoint)
    hashed = []
    real = graph_store.file_digest
    monkeypatch.setattr(graph_store, "file_digest", lambda p: hashed.append(p) or real(p))
    assert store.checkpoint_digest(checkpoint) == first and not hashed
    checkpoint.write_bytes(b"WEIGHTS" * 1000)  # same size, new content and mtime
    os.utime(checkpoint, ns=(1, 1))
    assert store.checkpoint_digest(checkpoint) == real(checkpoint) != first
    assert hashed == [checkpoint]
    (default_cache / "graphs" / DIGESTS_FILE).write_text("{not json")
    assert store.checkpoint_digest(checkpoint) == real(checkpoint)
