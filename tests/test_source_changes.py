"""Nothing is lost: a source replaced, rewritten, truncated or deleted serves its new
audio to new opens and never a mix; an open file keeps the snapshot it opened. From the
engine (AudioFile), the view (SourceTree) and a real mount."""

from __future__ import annotations

import errno
import os
import time

import pytest

import helpers
import synth
from ecdcfs.container import EcdcError
from ecdcfs.tree import SourceTree
from helpers import read_all
from mounting import (
    SR,
    Mount,
    mounts,
    pread_full,
    source_folder,
    wav_bytes,
    wav_size,
)


def test_replaced_source_serves_new_audio(engine, tmp_path):
    first = synth.make_ecdc(samples=60_000, kbps=6, seed=0)
    second = synth.make_ecdc(samples=60_000, kbps=6, seed=1)
    path = synth.write(tmp_path, "x.ecdc", first)
    old = engine.open(path)
    assert read_all(old.reader()) == helpers.expected_wav(first)
    synth.write(tmp_path, "x.ecdc", second)
    assert read_all(engine.open(path).reader()) == helpers.expected_wav(second)
    assert read_all(old.reader()) == helpers.expected_wav(
        first
    )  # an open handle keeps its snapshot


def test_a_file_changing_while_it_is_snapshotted_is_read_again(src, monkeypatch):
    import ecdcfs.tree as tree_module

    engine = helpers.RecordingEngine()
    tree = SourceTree(src, engine_factory=engine)
    path = src / "x.ecdc"
    path.write_bytes(synth.zero_codes(4_800))
    real = tree_module.read_all
    writes = [synth.zero_codes(9_600)]

    def rewrite_during_read(fd, size):
        data = real(fd, size)
        if writes:  # a writer rewrites the file in place while we read it
            with open(path, "r+b") as f:
                f.write(writes.pop())
        return data

    monkeypatch.setattr(tree_module, "read_all", rewrite_during_read)
    fh = tree.open("/x.wav")
    # The first read saw the old bytes of a file that changed: it was read again, whole.
    assert engine.opened == [len(synth.zero_codes(9_600))]
    assert fh.audio.size == wav_size(9_600 * 4)
    tree.release(fh)

    def always_rewrite(fd, size):
        data = real(fd, size)
        os.utime(path, ns=(0, time.time_ns()))
        return data

    monkeypatch.setattr(tree_module, "read_all", always_rewrite)
    path.write_bytes(synth.zero_codes(14_400))
    with pytest.raises(EcdcError, match="kept changing"):
        tree.open("/x.wav")


def test_deleted_or_truncated_source_keeps_serving_the_open_snapshot(src):
    tree = SourceTree(src, engine_factory=helpers.RecordingEngine())
    path = src / "x.ecdc"
    path.write_bytes(synth.zero_codes(4_800))
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


def test_audio_and_other_versions_of_one_path_bypass_the_page_cache(src):
    """Audio always (reads reach the tree as the reader made them); another file while a
    handle of another version of its path is open (the kernel caches pages by path)."""
    tree = SourceTree(src, engine_factory=helpers.RecordingEngine())
    (src / "x.ecdc").write_bytes(synth.zero_codes(4_800))
    (src / "a.txt").write_text("old")
    first, same = tree.open("/x.wav"), tree.open("/x.wav")
    text = tree.open("/a.txt")
    assert first.bypass_page_cache and same.bypass_page_cache and not text.bypass_page_cache
    (src / "new").write_bytes(synth.zero_codes(9_600))
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


def test_probe_cache_hits_and_invalidates_on_change(src, tree, monkeypatch):
    import ecdcfs.tree as tree_module

    calls = []
    real = tree_module.read_header
    monkeypatch.setattr(tree_module, "read_header", lambda *a: calls.append(1) or real(*a))
    path = src / "x.ecdc"
    path.write_bytes(synth.zero_codes(4_800))
    before = os.lstat(path)
    assert tree.getattr("/x.wav").size == wav_size(4_800 * 4)
    assert tree.getattr("/x.wav").size == wav_size(4_800 * 4)
    helpers.entries(tree)
    assert len(calls) == 1
    # Same mtime, different size: re-probed.
    path.write_bytes(synth.zero_codes(9_600))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert tree.getattr("/x.wav").size == wav_size(9_600 * 4)
    # Same size, same mtime, other content (in place): ctime changed, re-probed.
    path.write_bytes(synth.zero_codes(9_600, version=193, sr=44_100))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert len(calls) == 2
    tree.getattr("/x.wav")
    assert len(calls) == 3
    # Replaced by another file (new inode).
    (src / "new").write_bytes(synth.zero_codes(14_400))
    os.replace(src / "new", path)
    assert tree.getattr("/x.wav").size == wav_size(14_400 * 4)


@mounts
def test_replaced_source_is_read_afresh(small_library, tmp_path, media):
    m = Mount(small_library, tmp_path / "mnt", tmp_path / "log")
    try:
        target = small_library / "x.ecdc"
        before = (m.mnt / "x.wav").read_bytes()
        assert before == wav_bytes(media["short_pcm"], SR)
        old = os.stat(target)
        # Same WAV size, same mtime: only the header's sample rate differs.
        (small_library / "new").write_bytes(synth.to_v193(media["short"], sr=44_100))
        os.replace(small_library / "new", target)
        os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
        after = (m.mnt / "x.wav").read_bytes()
        assert after == wav_bytes(media["short_pcm"], 44_100)
    finally:
        m.stop()


@mounts
def test_source_replaced_truncated_or_deleted_while_open(tmp_path, media):
    """An open handle keeps reading its version; new opens see the new one; never mixed."""
    src = source_folder(tmp_path, {"x.ecdc": media["song"]})
    target = src / "x.ecdc"
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    path = m.mnt / "x.wav"
    old, new, short = media["song_wav"], media["song2_wav"], media["short_wav"]
    assert len(old) == len(new) and old != new

    def read_all(fd: int, size: int) -> bytes:
        return pread_full(fd, size, 0)

    def replace(data: bytes) -> None:
        (src / "tmp").write_bytes(data)
        os.replace(src / "tmp", target)

    try:
        first = os.open(path, os.O_RDONLY)
        assert pread_full(first, 100_000, 0) == old[:100_000]
        replace(media["song2"])  # same length, other audio
        time.sleep(1.1)  # past the attribute timeout: the kernel asks again
        second = os.open(path, os.O_RDONLY)
        assert read_all(second, len(new)) == new
        assert read_all(first, len(old)) == old  # its own version, whole
        assert os.fstat(first).st_size == len(old)
        # A shorter version while both are open: each handle still reads its own bytes
        # (the kernel keeps one size per name, so an older handle may see its end early).
        replace(media["short"])
        third = os.open(path, os.O_RDONLY)
        assert read_all(third, len(short)) == short
        for fd, data in ((first, old), (second, new)):
            got = read_all(fd, len(data))
            assert got == data[: len(got)] and len(got) >= len(short)
        # Deleted: open handles keep their snapshots; the name is gone.
        target.unlink()
        assert read_all(third, len(short)) == short
        time.sleep(1.1)
        assert not path.exists()
        assert read_all(third, len(short)) == short  # after the name is gone, too
        for fd in (first, second, third):
            os.close(fd)
        # Truncated while open, then while mounted: lists with size 0, fails with EIO.
        target.write_bytes(media["short"])
        fd = os.open(path, os.O_RDONLY)
        with open(target, "r+b") as f:
            f.truncate(len(media["short"]) // 2)
        assert read_all(fd, len(short)) == short  # the snapshot taken at open
        os.close(fd)
        time.sleep(1.1)
        assert os.stat(path).st_size == 0
        with pytest.raises(OSError) as info:
            path.read_bytes()
        assert info.value.errno == errno.EIO
        target.write_bytes(media["short"])  # repaired in place
        time.sleep(1.1)
        assert path.read_bytes() == short
        assert "Traceback" not in m.log_text()
    finally:
        m.stop()
