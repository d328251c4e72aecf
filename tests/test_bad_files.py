"""Bad input gets a clear error and nothing else breaks: bad headers, huge or truncated
files, garbage payloads and fuzzed bytes are listed and stat-able, fail at open or read
with one line (and the reason in an xattr), never hang, never take memory in proportion
to what a header claims. From the engine, the view and a real mount."""

from __future__ import annotations

import errno
import logging
import os
import random
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
import synth
from ecdcfs.container import MODELS, EcdcError, FrameLayout
from ecdcfs.engine import Engine, Settings
from ecdcfs.names import AUDIO
from ecdcfs.tree import SourceTree
from helpers import read_all
from mounting import SR, Mount, mounts, source_folder, wav_size

HEADER = struct.Struct("!4sBI")


def meta48(**changes) -> dict:
    return {"m": "encodec_48khz", "al": 4800, "nc": 2, "lm": False, **changes}


# Every kind of bad header the issue lists, as files (the container tests parse them;
# here they go through the view: listed, stat-able, refused at open with one log line).
BAD_FILES = {
    "empty.ecdc": b"",
    "magic.ecdc": b"RIFF" + synth.zero_codes()[4:],
    "version.ecdc": synth.zero_codes()[:4] + bytes([9]) + synth.zero_codes()[5:],
    "json.ecdc": synth.container_bytes(b'{"m": "encodec_48khz", "al": 48'),
    "not utf8.ecdc": synth.container_bytes(b'{"m": "\xff"}'),
    "meta past end.ecdc": HEADER.pack(b"ECDC", 0, 1000) + b"{}",
    "meta near 4 GiB.ecdc": HEADER.pack(b"ECDC", 0, 0xFFFF_FFF0) + b"{}",
    "truncated mid-frame.ecdc": synth.zero_codes(100_000)[:-7],
    "al 1e12.ecdc": synth.container_bytes(meta48(al=10**12), bytes(4096)),
    "al 1e12 lm.ecdc": synth.container_bytes(meta48(al=10**12, lm=True), bytes(4096)),
    "nc 0.ecdc": synth.container_bytes(meta48(nc=0), bytes(4096)),
    "nc 17.ecdc": synth.container_bytes(meta48(nc=17), bytes(4096)),
    "nc 33 24k.ecdc": synth.container_bytes(meta48(m="encodec_24khz", nc=33), bytes(4096)),
    "model.ecdc": synth.container_bytes(meta48(m="encodec_96khz"), bytes(4096)),
    "model type.ecdc": synth.container_bytes(meta48(m=["encodec_48khz"]), bytes(4096)),
    "al string.ecdc": synth.container_bytes(meta48(al="4800"), bytes(4096)),
    "al float.ecdc": synth.container_bytes(meta48(al=4800.0), bytes(4096)),
    "nc bool.ecdc": synth.container_bytes(meta48(nc=True), bytes(4096)),
    "lm int.ecdc": synth.container_bytes(meta48(lm=1), bytes(4096)),
    "sr string.ecdc": synth.container_bytes(meta48(sr="fast"), bytes(4096), version=193),
    "title number.ecdc": synth.container_bytes(meta48(n=5), bytes(4096), version=193),
    "array.ecdc": synth.container_bytes([1, 2, 3]),
}


def test_every_bad_header_lists_stats_and_fails_fast_with_one_line(src, caplog):
    engine = helpers.RecordingEngine()
    tree = SourceTree(src, engine_factory=engine)
    for name, data in BAD_FILES.items():
        (src / name).write_bytes(data)
    (src / "good.ecdc").write_bytes(synth.zero_codes(9_600))
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
    assert engine.opened == [len(synth.zero_codes(9_600))]


def test_huge_files_are_never_read_whole(src):
    """A sparse 8 GiB file costs no memory: rejected from its header, or trimmed."""
    engine = helpers.RecordingEngine()
    tree = SourceTree(src, engine_factory=engine)
    with open(src / "zeros.ecdc", "wb") as f:
        f.truncate(8 << 30)
    good = synth.zero_codes(48_000)
    with open(src / "tail.ecdc", "wb") as f:  # a valid file followed by 8 GiB of zeros
        f.write(good)
        f.truncate(8 << 30)
    lm = synth.container_bytes(
        meta48(al=10 * 48_000, lm=True), bytes(100)
    )  # a valid LM-coded header
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


def _garbage_lm(data: bytes, keep: int, seed: int) -> bytes:
    """``data`` with its LM payload replaced by random bytes after ``keep`` bytes."""
    _, _, offset = synth.parse_header(data)
    rng = random.Random(seed)
    tail = len(data) - offset - keep
    return data[: offset + keep] + rng.randbytes(tail)


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
            outcome, seconds = helpers.read_everything(audio, timeout=120)
            assert outcome == "ok" or outcome.startswith("error: "), outcome
            assert seconds < 60
        good = engine.open(tmp_path / "good.ecdc", data)  # the engine still works
        assert helpers.read_everything(good, timeout=120)[0] == "ok"
    finally:
        engine.close()


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


def test_view_of_a_hostile_tree_has_no_surprises(src, tmp_path):
    """Names the kernel hands over (spaces, brackets, unicode, bytes) all resolve."""
    tree = SourceTree(src, engine_factory=helpers.RecordingEngine())
    names = ["a b.ecdc", "[x] (y) {z}.ecdc", "ünï ☃.ecdc", " lead.ecdc", "trail .ecdc", "\t.ecdc"]
    for name in names:
        (src / name).write_bytes(synth.zero_codes())
    with open(os.fsencode(src) + b"/\xff\xfe.ecdc", "wb") as f:
        f.write(synth.zero_codes())
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
    original = bytearray(
        synth.container_bytes(meta48(al=60_000, lm=lm, nc=4), bytes(8000), version=193)
    )
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    (src / "f.ecdc").write_bytes(bytes(original[:cut]))
    tree = SourceTree(src, engine_factory=helpers.RecordingEngine())
    size = tree.getattr("/f.wav").size
    try:
        fh = tree.open("/f.wav")
    except EcdcError:
        assert size == 0
        return
    assert size > 0 and tree.read(fh, 4, 0) in (b"RIFF", b"RF64")
    tree.release(fh)


def test_corrupt_files_list_and_stat_but_fail_to_open(src, caplog):
    tree = SourceTree(src, engine_factory=helpers.NoEngine())
    for name, data in CORRUPT.items():
        (src / name).write_bytes(data)
    (src / "ok.txt").write_text("fine")
    listing = helpers.entries(tree)
    assert set(listing) == {n[:-5] + ".wav" for n in CORRUPT} | {"ok.txt"}
    caplog.set_level(logging.INFO, logger="ecdcfs")
    for name in CORRUPT:
        path = "/" + name[:-5] + ".wav"
        assert tree.getattr(path).size == 0
        for _ in range(3):
            with pytest.raises(EcdcError):
                tree.open(path)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(CORRUPT)  # one line per file, however often it is opened
    for record in errors:
        assert record.exc_info is None
        assert str(src) in record.getMessage()
    assert {r.getMessage().split(": ")[0].rsplit("/", 1)[1] for r in errors} == set(CORRUPT)
    fh = tree.open("/ok.txt")
    assert tree.read(fh, 10, 0) == b"fine"
    tree.release(fh)
    assert helpers.NoEngine.calls == 0


def test_unreadable_ecdc_stats_as_zero(src):
    """A source file the daemon may not read lists with size 0 (a readable one beside it
    with its size). Root reads everything: as root, the check runs without the
    capabilities that let it (setpriv)."""
    (src / "x.ecdc").write_bytes(synth.zero_codes())
    (src / "y.ecdc").write_bytes(synth.zero_codes(4_800))
    os.chmod(src / "x.ecdc", 0)
    code = (
        "import sys; from ecdcfs.tree import SourceTree\n"
        "tree = SourceTree(sys.argv[1])\n"
        "print(tree.getattr('/x.wav').size, tree.getattr('/y.wav').size)\n"
    )
    command = [sys.executable, "-c", code, str(src)]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", str(wav_size(4_800 * 4))]


def test_truncated_lm_payload_fails_cleanly(engine, tmp_path):
    data = synth.make_ecdc(samples=100_000, kbps=3, lm=True)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data[:-40]))
    good = helpers.expected_wav(data)
    assert audio.read(0, 4096) == good[:4096]  # the intact first frame still plays
    with pytest.raises(EcdcError, match="truncated"):
        read_all(audio.reader())


def test_bad_files_are_rejected_at_open(engine, tmp_path):
    data = synth.make_ecdc(samples=60_000, kbps=6)
    for name, bad in {"magic": b"XXXX" + data[4:], "truncated": data[:-1], "empty": b""}.items():
        with pytest.raises(EcdcError):
            engine.open(synth.write(tmp_path, f"{name}.ecdc", bad))


@mounts
def test_corrupt_files_fail_with_eio_and_the_rest_works(tmp_path, media):
    song = media["song"]
    bad = {"bad magic.ecdc": b"RIFF" + song[4:], "truncated.ecdc": song[: len(song) // 2]}
    mount = Mount(
        source_folder(tmp_path, {"song.ecdc": song, **bad}), tmp_path / "mnt", tmp_path / "log"
    )
    try:
        for name in ("bad magic.wav", "truncated.wav"):
            path = mount.mnt / name
            assert os.stat(path).st_size == 0
            started = time.monotonic()
            done = subprocess.run(["cat", str(path)], capture_output=True, text=True, timeout=60)
            assert done.returncode != 0
            assert "Input/output error" in done.stderr
            assert time.monotonic() - started < 5
            with pytest.raises(OSError) as info:
                path.read_bytes()
            assert info.value.errno == errno.EIO
        assert (mount.mnt / "song.wav").read_bytes() == media["song_wav"]
        log = mount.log_text()
        assert log.count("bad magic.ecdc") == 1 and log.count("truncated.ecdc") == 1
        assert "Traceback" not in log
    finally:
        mount.stop()


@mounts
def test_hostile_folder(tmp_path, media):
    """Every kind of bad file at once: each fails alone, quickly, with one log line."""
    src = tmp_path / "src"
    src.mkdir()
    m48 = {"m": "encodec_48khz", "al": SR, "nc": 4, "lm": False}
    _, _, lm_offset = synth.parse_header(media["lm"])
    bad = {
        "empty.ecdc": b"",
        "magic.ecdc": b"RIFF" + media["short"][4:],
        "version.ecdc": media["short"][:4] + b"\x05" + media["short"][5:],
        "json.ecdc": struct.pack("!4sBI", b"ECDC", 0, 6) + b'{"m": ',
        "meta past end.ecdc": struct.pack("!4sBI", b"ECDC", 0, 5000) + b"{}",
        "meta 4 GiB.ecdc": struct.pack("!4sBI", b"ECDC", 0, 0xFFFFFFFF) + b"{}",
        "truncated.ecdc": media["song"][:-100],
        "al 1e12.ecdc": synth.container_bytes({**m48, "al": 10**12}, bytes(10_000)),
        "nc 0.ecdc": synth.container_bytes({**m48, "nc": 0}, bytes(10_000)),
        "nc 99.ecdc": synth.container_bytes({**m48, "nc": 99}, bytes(10_000)),
        "model.ecdc": synth.container_bytes({**m48, "m": "encodec_1khz"}, bytes(10_000)),
        "types.ecdc": synth.container_bytes({**m48, "al": "48000", "lm": "yes"}, bytes(10_000)),
        # Two hours claimed, 100 bytes of payload: indexing fails within the first block.
        "lm 24k 2h.ecdc": synth.container_bytes(
            {"m": "encodec_24khz", "al": 7200 * 24_000, "nc": 4, "lm": True}, bytes(100)
        ),
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
    # Random bytes after a valid LM header: decodes to some audio or fails, never hangs.
    garbage = media["lm"][:lm_offset] + random.Random(0).randbytes(len(media["lm"]) - lm_offset)
    (src / "garbage lm.ecdc").write_bytes(garbage)
    (src / "folder.ecdc").mkdir()
    (src / "folder.ecdc" / "inner.ecdc").write_bytes(media["short"])
    (src / "good [1] ☃.ecdc").write_bytes(media["short"])
    with open(os.fsencode(src) + b"/bad \xff name.ecdc", "wb") as f:
        f.write(b"not audio")
    (src / "x.ecdc").write_bytes(media["short"])
    (src / "x.wav").write_bytes(b"a real wav")
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    try:
        listing = set(os.listdir(m.mnt))
        expected = {n[:-5] + ".wav" for n in bad} | {
            "garbage lm.wav",
            "folder.ecdc",
            "good [1] ☃.wav",
            "bad \udcff name.wav",
            "x.wav",
            "x.ecdc.wav",
        }
        assert listing == expected
        for name in [n[:-5] + ".wav" for n in bad] + ["bad \udcff name.wav"]:
            path = m.mnt / name
            size = os.stat(path).st_size
            assert size == (wav_size(7200 * 24_000 * 2) if name.startswith("lm 24k") else 0), name
            started = time.monotonic()
            done = subprocess.run(["cat", str(path)], capture_output=True, timeout=60)
            assert done.returncode != 0 and b"Input/output error" in done.stderr, name
            # (The LM-coded file loads the 24 kHz model and its LM first.)
            assert time.monotonic() - started < (30 if name.startswith("lm 24k") else 5), name
        # The garbage LM file: a full-length read, or EIO; in bounded time.
        started = time.monotonic()
        try:
            data = (m.mnt / "garbage lm.wav").read_bytes()
            assert len(data) == len(media["lm_wav"])
        except OSError as exc:
            assert exc.errno == errno.EIO
        assert time.monotonic() - started < 60
        # The rest of the mount is unaffected.
        assert (m.mnt / "good [1] ☃.wav").read_bytes() == media["short_wav"]
        assert (m.mnt / "folder.ecdc" / "inner.wav").read_bytes() == media["short_wav"]
        assert (m.mnt / "x.wav").read_bytes() == b"a real wav"
        assert (m.mnt / "x.ecdc.wav").read_bytes() == media["short_wav"]
        log = m.log_text()
        for name in [*bad, "bad \\xff name.ecdc"]:  # a name's bytes escaped in the log
            lines = [line for line in m.error_lines() if f"/{name}: " in line]
            assert len(lines) == 1, (name, m.error_lines())
        assert "Traceback" not in log
        assert m.proc.poll() is None
    finally:
        m.stop()


CORRUPT = {
    "magic.ecdc": b"NOPE" + synth.zero_codes()[4:],
    "truncated.ecdc": synth.zero_codes(48_000)[:-10],
    "version.ecdc": synth.zero_codes()[:4] + bytes([7]) + synth.zero_codes()[5:],
    "empty.ecdc": b"",
    "json.ecdc": struct.pack("!4sBI", b"ECDC", 0, 5) + b"{oops",
    "model.ecdc": synth.zero_codes()[:0]
    + struct.pack("!4sBI", b"ECDC", 0, 40)
    + b'{"m":"nope","al":1,"nc":1,"lm":false}   ',
}
