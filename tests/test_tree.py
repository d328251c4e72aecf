"""The view of SOURCE (ecdcfs.tree) and the FUSE operations (ecdcfs.fs), without mounting.

Files here are hand-built headers with zero-filled payloads: enough to stat, list and
open, never decoded, so no torch and no model is needed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mfusepy import FuseOSError

import helpers
import mounting
import synth
from ecdcfs.container import MODELS
from ecdcfs.fs import ERROR_XATTR, STATS_XATTR, EcdcFS
from ecdcfs.names import AUDIO, DIR, FILE, LINK, list_names
from ecdcfs.tree import SourceTree


def wav_size(samples: int, channels: int = 2) -> int:
    return mounting.wav_size(samples * channels * 2)


def test_ecdc_shown_as_wav_with_exact_size_and_source_attributes(src, tree):
    (src / "x.ecdc").write_bytes(synth.zero_codes(48_000))
    os.chmod(src / "x.ecdc", 0o664)
    os.utime(src / "x.ecdc", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    listing = helpers.entries(tree)
    assert list(listing) == ["x.wav"]
    assert stat.S_ISREG(listing["x.wav"])
    attrs = tree.getattr("/x.wav")
    source = os.lstat(src / "x.ecdc")
    assert attrs.size == wav_size(48_000)
    assert attrs.blocks == -(-wav_size(48_000) // 512)
    assert attrs.mode == stat.S_IFREG | 0o444
    assert attrs.mtime_ns == 1_500_000_000_987_654_321
    assert attrs.atime_ns == source.st_atime_ns
    assert attrs.ctime_ns == source.st_ctime_ns
    assert (attrs.uid, attrs.gid, attrs.nlink) == (
        source.st_uid,
        source.st_gid,
        1,
    )
    with pytest.raises(FileNotFoundError):
        tree.getattr("/x.ecdc")
    with pytest.raises(FileNotFoundError):
        tree.getattr("/nothing.wav")


def test_v193_header_size_includes_the_tag_chunks(src, tree):
    # v193 with sr and a title: tag chunks before the PCM (see mounting.wav_bytes); a long
    # one pushes the PCM past 8 KiB.
    for name, title in [("t", "Song"), ("l", "é" * 5000)]:
        (src / f"{name}.ecdc").write_bytes(
            synth.zero_codes(9_600, version=193, sr=44_100, n=title, br=6.0)
        )
        assert tree.getattr(f"/{name}.wav").size == mounting.wav_size(9_600 * 4, title)
    assert mounting.wav_size(9_600 * 4, "é" * 5000) > 16_384


def test_24khz_mono_size(src, tree):
    (src / "m.ecdc").write_bytes(synth.zero_codes(24_000, model="encodec_24khz", nc=4))
    assert tree.getattr("/m.wav").size == wav_size(24_000, channels=1)


def test_subfolders_mirrored_and_folders_named_ecdc_kept(src, tree):
    (src / "Album").mkdir()
    (src / "Album" / "01 intro.ecdc").write_bytes(synth.zero_codes())
    (src / "folder.ecdc").mkdir()
    (src / "folder.ecdc" / "inner.ecdc").write_bytes(synth.zero_codes())
    os.chmod(src / "Album", 0o775)
    assert helpers.entries(tree) == {"Album": stat.S_IFDIR, "folder.ecdc": stat.S_IFDIR}
    assert list(helpers.entries(tree, "/Album")) == ["01 intro.wav"]
    assert list(helpers.entries(tree, "/folder.ecdc")) == ["inner.wav"]
    attrs = tree.getattr("/Album")
    assert attrs.mode == stat.S_IFDIR | 0o555
    assert attrs.nlink == os.lstat(src / "Album").st_nlink
    assert tree.getattr("/folder.ecdc").mode & stat.S_IFDIR
    assert tree.getattr("/folder.ecdc/inner.wav").size == wav_size(4800)
    with pytest.raises(FileNotFoundError):
        tree.getattr("/folder.wav")
    with pytest.raises(NotADirectoryError):
        tree.getattr("/Album/01 intro.wav/x")


def test_passthrough_files_read_only_and_identical(src, tree):
    data = os.urandom(100_000)
    (src / "cover.jpg").write_bytes(data)
    (src / "list.m3u").write_text("x.wav\n")
    os.chmod(src / "cover.jpg", 0o644)
    assert set(helpers.entries(tree)) == {"cover.jpg", "list.m3u"}
    attrs = tree.getattr("/cover.jpg")
    assert attrs.size == len(data)
    assert attrs.mode == stat.S_IFREG | 0o444
    fh = tree.open("/cover.jpg", os.O_RDONLY)
    try:
        assert tree.read(fh, 4096, 0) == data[:4096]
        assert tree.read(fh, 10_000, 95_000) == data[95_000:]
        assert tree.read(fh, 100, 200_000) == b""
    finally:
        tree.release(fh)
    assert tree.open_handles == 0


def test_symlinks_shown_verbatim_and_never_followed(src, tree, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.ecdc").write_bytes(synth.zero_codes())
    (src / "x.ecdc").write_bytes(synth.zero_codes())
    os.symlink(outside, src / "secret")
    os.symlink("x.ecdc", src / "y.ecdc")
    os.symlink(tmp_path / "outside", src / "linkdir")
    os.symlink("missing", src / "dangling.wav")
    listing = helpers.entries(tree)
    assert listing == {
        "x.wav": stat.S_IFREG,
        "secret": stat.S_IFLNK,
        "y.ecdc": stat.S_IFLNK,
        "linkdir": stat.S_IFLNK,
        "dangling.wav": stat.S_IFLNK,
    }
    assert tree.readlink("/secret") == str(outside)
    assert tree.readlink("/y.ecdc") == "x.ecdc"
    assert tree.readlink("/dangling.wav") == "missing"
    assert stat.S_ISLNK(tree.getattr("/secret").mode)
    assert stat.S_ISLNK(tree.getattr("/linkdir").mode)
    with pytest.raises(OSError) as info:
        tree.open("/secret")
    assert info.value.errno == errno.ELOOP
    # A path through a symlinked folder never reaches outside SOURCE.
    for op in (tree.getattr, tree.readdir, tree.open):
        with pytest.raises(NotADirectoryError):
            op("/linkdir/o.wav" if op is not tree.readdir else "/linkdir")
    with pytest.raises(OSError) as info:
        tree.readlink("/x.wav")
    assert info.value.errno == errno.EINVAL


def test_special_files_are_hidden(src, tree):
    os.mkfifo(src / "pipe")
    (src / "a.ecdc").write_bytes(synth.zero_codes())
    assert list(helpers.entries(tree)) == ["a.wav"]
    with pytest.raises(FileNotFoundError):
        tree.getattr("/pipe")


def test_collision_real_wav_wins_decoded_becomes_ecdc_wav(src, tree):
    (src / "x.ecdc").write_bytes(synth.zero_codes(9_600))
    (src / "x.wav").write_bytes(b"RIFF real")
    listing = helpers.entries(tree)
    assert set(listing) == {"x.wav", "x.ecdc.wav"}
    assert tree.getattr("/x.wav").size == len(b"RIFF real")
    assert tree.getattr("/x.ecdc.wav").size == wav_size(9_600)
    assert tree.resolve("/x.ecdc.wav").kind == AUDIO
    fh = tree.open("/x.wav")
    assert tree.read(fh, 100, 0) == b"RIFF real"
    tree.release(fh)
    with pytest.raises(FileNotFoundError):
        tree.getattr("/x.ecdc")


def test_collision_with_both_names_taken_shows_raw_ecdc(src, tree):
    (src / "x.ecdc").write_bytes(synth.zero_codes(9_600))
    (src / "x.wav").mkdir()
    (src / "x.ecdc.wav").write_bytes(b"real too")
    assert set(helpers.entries(tree)) == {"x.wav", "x.ecdc.wav", "x.ecdc"}
    assert tree.resolve("/x.ecdc").kind == FILE
    assert tree.resolve("/x.wav").kind == DIR
    assert tree.getattr("/x.ecdc").size == len(synth.zero_codes(9_600))


def test_collision_chain_primary_name_wins_over_fallback(src, tree):
    (src / "x.ecdc").write_bytes(synth.zero_codes(4_800))
    (src / "x.wav").write_bytes(b"real")
    (src / "x.ecdc.ecdc").write_bytes(synth.zero_codes(9_600))
    listing = helpers.entries(tree)
    assert set(listing) == {"x.wav", "x.ecdc.wav", "x.ecdc"}
    assert tree.resolve("/x.ecdc.wav").source == str(src / "x.ecdc.ecdc")
    assert tree.getattr("/x.ecdc.wav").size == wav_size(9_600)
    assert tree.resolve("/x.ecdc").kind == FILE


NAME_PARTS = [
    "a",
    "a.ecdc",
    "a.wav",
    "a.ecdc.wav",
    "a.ecdc.ecdc",
    "a.ecdc.ecdc.wav",
    ".ecdc",
    ".wav",
    "b.ecdc",
]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.sampled_from(NAME_PARTS),
        st.sampled_from([FILE, DIR, LINK, "fifo"]),
        max_size=len(NAME_PARTS),
    )
)
def test_lookup_agrees_with_listing_and_is_one_to_one(tmp_path_factory, entries):
    src = tmp_path_factory.mktemp("src")
    for name, kind in entries.items():
        if kind == FILE:
            (src / name).write_bytes(synth.zero_codes() if name.endswith(".ecdc") else b"x")
        elif kind == DIR:
            (src / name).mkdir()
        elif kind == LINK:
            os.symlink("target", src / name)
        else:
            os.mkfifo(src / name)
    tree = SourceTree(src, engine_factory=helpers.NoEngine())
    visible = {n: k for n, k in entries.items() if k != "fifo"}
    shown = dict(tree.readdir("/"))
    # Every visible source entry is shown exactly once; lookups find what was listed.
    sources = [tree.resolve("/" + name).source for name in shown]
    assert sorted(sources) == sorted(str(src / n) for n in visible)
    for name in shown:
        entry = tree.resolve("/" + name)
        assert stat.S_IFMT(tree.getattr("/" + name).mode) == shown[name]
        if entry.kind == AUDIO:
            assert name.endswith(".wav") and entry.source.endswith(".ecdc")
        else:
            assert entry.source == str(src / name)
    for name in NAME_PARTS + ["a.wav.wav", "x"]:
        if name not in shown:
            with pytest.raises(FileNotFoundError):
                tree.resolve("/" + name)
    assert list_names(visible) == {
        name: (k, os.path.basename(tree.resolve("/" + name).source))
        for name, k in ((n, tree.resolve("/" + n).kind) for n in shown)
    }


def test_unusual_names(src, tree):
    weird = ["Café [live] (1).ecdc", "a b  c.ecdc", "日本語.ecdc", "#1 - 100%.ecdc", "-x.ecdc"]
    for name in weird:
        (src / name).write_bytes(synth.zero_codes())
    raw = os.fsencode(str(src)) + b"/caf\xe9 \xff.ecdc"
    with open(raw, "wb") as f:
        f.write(synth.zero_codes())
    (src / "x.ecdc").write_bytes(synth.zero_codes())
    (src / ".ecdc").write_bytes(synth.zero_codes())  # no stem: not converted
    listing = helpers.entries(tree)
    bad = "caf\udce9 \udcff.wav"  # what mfusepy hands over (surrogateescape)
    expected = {n[:-5] + ".wav" for n in weird} | {bad, "x.wav", ".ecdc"}
    assert set(listing) == expected
    for name in expected - {".ecdc"}:
        assert tree.getattr("/" + name).size == wav_size(4800)
    fh = tree.open("/" + bad)
    tree.release(fh)


def test_unpublished_paths(src, tree):
    for path in ("/../etc", "/./x", "/a/../b"):
        with pytest.raises(FileNotFoundError):
            tree.getattr(path)


def test_getattr_and_readdir_import_no_torch(tmp_path):
    (tmp_path / "a.ecdc").write_bytes(synth.zero_codes())
    (tmp_path / "b.ecdc").write_bytes(b"bad")
    code = textwrap.dedent(f"""
        import sys
        from ecdcfs.tree import SourceTree
        from ecdcfs import cli, fs
        t = SourceTree({str(tmp_path)!r})
        assert sorted(dict(t.readdir("/"))) == ["a.wav", "b.wav"], t.readdir("/")
        t.getattr("/a.wav"); t.getattr("/b.wav")
        try:
            t.open("/b.wav")
        except Exception:
            pass
        assert "torch" not in sys.modules and "encodec" not in sys.modules
        assert not t.engine_started
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


class TestOpenAudio:
    """Opening audio creates AudioFiles (never decoding here: nothing is read)."""

    def test_handles_share_audio_file_but_not_readers(self, src, tree):
        (src / "x.ecdc").write_bytes(synth.zero_codes(9_600))
        a, b = tree.open("/x.wav"), tree.open("/x.wav")
        ha, hb = a, b
        assert ha.audio is hb.audio and ha.reader is not hb.reader
        assert ha.audio.size == wav_size(9_600)
        assert tree.read(a, 44, 0)[:4] == b"RIFF"  # the header needs no decoding
        assert tree.read(a, 10, wav_size(9_600)) == b""
        tree.release(a)
        tree.release(b)
        assert tree.open_handles == 0
        with pytest.raises(OSError) as info:
            tree.read(a, 1, 0)
        assert info.value.errno == errno.EBADF

    def test_replaced_source_gets_a_new_audio_file(self, src, tree):
        (src / "x.ecdc").write_bytes(synth.zero_codes(9_600))
        a = tree.open("/x.wav")
        (src / "new").write_bytes(synth.zero_codes(4_800))
        os.replace(src / "new", src / "x.ecdc")
        b = tree.open("/x.wav")
        assert a.audio.size == wav_size(9_600)
        assert b.audio.size == wav_size(4_800)
        # fstat() of an open handle gives the size of the version it reads.
        assert tree.getattr("/x.wav", a).size == wav_size(9_600)
        assert tree.getattr("/x.wav", b).size == wav_size(4_800)
        assert tree.getattr("/x.wav").size == wav_size(4_800)
        tree.release(a)
        tree.release(b)

    def test_engine_created_once_lazily(self, src):
        created = []

        def factory():
            from ecdcfs.engine import Engine

            created.append(Engine())
            return created[-1]

        tree = SourceTree(src, engine_factory=factory)
        (src / "x.ecdc").write_bytes(synth.zero_codes())
        (src / "y.ecdc").write_bytes(synth.zero_codes(9_600))
        tree.getattr("/x.wav")
        assert created == []
        handles = [tree.open("/x.wav"), tree.open("/y.wav")]
        assert len(created) == 1
        for fh in handles:
            tree.release(fh)
        tree.close()


class TestFuseOperations:
    """ecdcfs.fs maps the tree's errors to errno values."""

    @pytest.fixture
    def ops(self, src):
        (src / "x.ecdc").write_bytes(synth.zero_codes())
        (src / "bad.ecdc").write_bytes(b"bad")
        (src / "a.txt").write_text("text")
        fs = EcdcFS(SourceTree(src, engine_factory=helpers.NoEngine()))
        yield fs
        fs.destroy("/")

    def errno_of(self, func, *args) -> int:
        with pytest.raises(FuseOSError) as info:
            func(*args)
        return info.value.errno

    def test_errors(self, ops):
        assert self.errno_of(ops.getattr, "/missing") == errno.ENOENT
        assert self.errno_of(ops.open, "/bad.wav", os.O_RDONLY) == errno.EIO
        assert self.errno_of(ops.open, "/a.txt", os.O_WRONLY) == errno.EROFS
        assert self.errno_of(ops.read, "/x.wav", 10, 0, 12345) == errno.EBADF
        assert self.errno_of(ops.access, "/a.txt", os.W_OK) == errno.EROFS
        assert self.errno_of(ops.access, "/missing", os.R_OK) == errno.ENOENT
        assert ops.access("/a.txt", os.R_OK) == 0
        for op, args in [
            (ops.unlink, ("/a.txt",)),
            (ops.mkdir, ("/d", 0o755)),
            (ops.rename, ("/a.txt", "/b")),
            (ops.chmod, ("/a.txt", 0o777)),
            (ops.write, ("/a.txt", b"x", 0, 1)),
            (ops.create, ("/n", 0o644, 0)),
            (ops.truncate, ("/a.txt", 0)),
            (ops.symlink, ("/l", "a.txt")),
        ]:
            assert self.errno_of(op, *args) == errno.EROFS

    def test_listing_and_reading(self, ops, src):
        entries = ops.readdir("/", 0)
        assert entries[:2] == [".", ".."]
        assert {e[0] for e in entries[2:]} == {"x.wav", "bad.wav", "a.txt"}
        assert ops.getattr("/bad.wav")["st_size"] == 0
        fh = ops.open("/a.txt", os.O_RDONLY)
        assert ops.read("/a.txt", 100, 0, fh) == b"text"
        assert ops.release("/a.txt", fh) == 0
        fs, source = ops.statfs("/"), os.statvfs(src)  # the disk SOURCE is on, not full
        assert (fs["f_bsize"], fs["f_blocks"], fs["f_files"]) == (
            source.f_bsize,
            source.f_blocks,
            source.f_files,
        )
        assert fs["f_bavail"] > 0 and fs["f_namemax"] == source.f_namemax

    def test_start_and_end_name_source_and_mount_point(self, src, caplog):
        caplog.set_level(logging.INFO, "ecdcfs")
        fs = EcdcFS(SourceTree(src, engine_factory=helpers.NoEngine()), "/the/mnt", warm_up=False)
        fs.init("/")
        fs.destroy("/")
        assert [r.getMessage() for r in caplog.records] == [
            f"serving {src} on /the/mnt",
            "unmounted /the/mnt",
        ]

    def test_a_file_that_cannot_be_read_says_why_in_an_xattr(self, ops, src):
        """Only audio files that cannot be read have user.ecdcfs.error; it never decodes."""
        (src / "d").mkdir()
        reason = b"file too short for an ECDC header (3 bytes)"
        assert ops.listxattr("/bad.wav") == [ERROR_XATTR]
        assert ops.getxattr("/bad.wav", ERROR_XATTR) == reason
        assert self.errno_of(ops.getxattr, "/bad.wav", "user.other") == errno.ENODATA
        for path in ("/x.wav", "/a.txt", "/d", "/"):
            assert ops.listxattr(path) == ([STATS_XATTR] if path == "/" else []), path
            assert self.errno_of(ops.getxattr, path, ERROR_XATTR) == errno.ENODATA, path
        assert self.errno_of(ops.listxattr, "/missing.wav") == errno.ENOENT
        (src / "bad.ecdc").write_bytes(synth.zero_codes())  # repaired: the new version reads fine
        assert ops.listxattr("/bad.wav") == []
        assert helpers.NoEngine.calls == 0

    def test_the_root_has_the_counters_without_starting_the_engine(self, ops, src):
        """``user.ecdcfs.stats``: zeros before any audio is opened; files open and bytes
        served count audio only (the decoders' counters are the scheduler's, tested there)."""
        assert json.loads(ops.getxattr("/", STATS_XATTR)) == {
            "units_decoded": 0,
            "decodes_started": 0,
            "decodes_interrupted": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "cache_bytes": 0,
            "bytes_served": 0,
            "files_open": 0,
        }
        assert self.errno_of(ops.getxattr, "/x.wav", STATS_XATTR) == errno.ENODATA
        text = ops.open("/a.txt", os.O_RDONLY)
        assert ops.read("/a.txt", 100, 0, text) == b"text"
        assert json.loads(ops.getxattr("/", STATS_XATTR))["files_open"] == 0
        assert helpers.NoEngine.calls == 0

    def test_an_open_that_failed_says_why_in_an_xattr(self, ops, monkeypatch):
        monkeypatch.setattr(SourceTree, "_snapshot", staticmethod(lambda fd, st: None))
        assert self.errno_of(ops.open, "/x.wav", os.O_RDONLY) == errno.EIO
        assert b"kept changing while being read" in ops.getxattr("/x.wav", ERROR_XATTR)
        assert ops.listxattr("/x.wav") == [ERROR_XATTR]

    def test_unexpected_errors_become_eio(self, ops, monkeypatch, caplog):
        monkeypatch.setattr(ops.tree, "getattr", lambda path: 1 / 0)
        assert self.errno_of(ops.getattr, "/x.wav") == errno.EIO
        assert "unexpected error" in caplog.text


def test_warm_up_loads_only_the_models_the_files_use(src, torch_home):
    from ecdcfs.engine import Engine, Settings

    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "voice.ecdc").write_bytes(synth.zero_codes(model="encodec_24khz"))
    (src / "junk.ecdc").write_bytes(b"junk")
    os.mkfifo(src / "pipe.ecdc")  # opened without blocking, then skipped
    tree = SourceTree(
        src, engine_factory=lambda: Engine(Settings(device="cpu", exact=True, cache_dir=None))
    )
    try:
        assert tree.models_in_use() == {"encodec_24khz"}
        tree.warm_up(quiet_seconds=0)
        assert tree.engine.loaded_decoder(MODELS["encodec_24khz"]) is not None
        assert tree.engine.loaded_decoder(MODELS["encodec_48khz"]) is None
    finally:
        tree.close()
    (src / "song.ecdc").write_bytes(synth.zero_codes())
    assert SourceTree(src, engine_factory=helpers.NoEngine()).models_in_use() == set(MODELS)
