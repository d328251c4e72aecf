"""WAV header layout (checked against the stdlib, mutagen and ffprobe) and PCM conversion."""

import io
import json
import shutil
import struct
import subprocess
import wave

import numpy as np
import pytest
from mutagen.wave import WAVE

from ecdcfs.wav import MIN_PCM_OFFSET, WavLayout, float_to_pcm16

TITLE, SOURCE, THUMB = (
    "Test Song é ☃",
    "https://example.org/watch?v=x&t=1",
    "https://example.org/t.jpg",
)
COMMENT = f"{SOURCE}\n{THUMB}"
HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def tagged(channels: int = 2, frames: int = 1000, **tags: str) -> WavLayout:
    return WavLayout(channels=channels, sample_rate=44_100, frames=frames, **tags)


def chunks(header: bytes) -> dict[bytes, bytes]:
    """The chunks of a RIFF header up to ``data`` (id -> body), read independently."""
    found, offset = {}, 12
    while offset < len(header):
        tag, size = header[offset : offset + 4], struct.unpack_from("<I", header, offset + 4)[0]
        if tag == b"data":
            break
        found[tag] = header[offset + 8 : offset + 8 + size]
        offset += 8 + size + size % 2
    return found


def chunk_walk(data: bytes, pad: bool = True) -> list[tuple[bytes, int, int]]:
    """``(id, offset, size)`` of every chunk to the end, with the pad byte after an odd size
    skipped, or not (as minidlna walks); either walk ends at the file's end."""
    found, offset = [], 12
    while offset + 8 <= len(data):
        tag, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        found.append((tag, offset, size))
        offset += 8 + size + (size % 2 if pad else 0)
    assert offset == len(data)
    return found


def info_tags(data: bytes, walk: list[tuple[bytes, int, int]]) -> dict[bytes, str]:
    """The LIST/INFO sub-chunks a walk finds, read the way minidlna reads them (from size
    to size: each sub-chunk must be even-sized)."""
    found = {}
    for tag, at, size in walk:
        if tag != b"LIST":
            continue
        info, offset = data[at + 8 : at + 8 + size], 4
        assert info[:4] == b"INFO"
        while offset < len(info):
            key, length = info[offset : offset + 4], struct.unpack_from("<I", info, offset + 4)[0]
            assert length % 2 == 0
            found[key] = info[offset + 8 : offset + 8 + length].rstrip(b"\0").decode()
            offset += 8 + length
    return found


def ffprobe_tags(path) -> dict:
    """ffprobe's format tags, at Jellyfin's log level: it must have nothing to say."""
    probe = subprocess.run(
        ["ffprobe", "-v", "warning", "-show_format", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stderr == ""
    return json.loads(probe.stdout)["format"].get("tags", {})


def test_header_parses_with_stdlib_wave():
    layout = WavLayout(channels=2, sample_rate=44_100, frames=1000, title="Tïtle", source="u")
    data = layout.wrap(bytes(layout.data_bytes))
    assert len(data) == layout.size
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes(), w.getsampwidth()) == (
            2,
            44_100,
            1000,
            2,
        )


def test_tags_read_by_mutagen():
    """ID3v2.4 in an ``id3 `` chunk before ``data``: UTF-8 title, source and thumbnail."""
    layout = tagged(title=TITLE, source=SOURCE, thumbnail=THUMB)
    wav = WAVE(io.BytesIO(layout.wrap(bytes(layout.data_bytes))))
    tags = wav.tags
    assert tags.version == (2, 4, 0)
    assert tags["TIT2"].text == [TITLE] and tags["TIT2"].encoding == 3
    assert tags["WOAS"].url == SOURCE
    assert tags["COMM::eng"].text == [COMMENT] and tags["COMM::eng"].desc == ""
    assert tags["WXXX:thumbnail"].url == THUMB
    assert sorted(tags.keys()) == ["COMM::eng", "TIT2", "WOAS", "WXXX:thumbnail"]
    assert (wav.info.channels, wav.info.sample_rate) == (2, 44_100)
    assert list(chunks(layout.header)) == [b"fmt ", b"id3 ", b"JUNK"]


@pytest.mark.parametrize("title", ["a", "ab", TITLE, "x" * 5000])
@pytest.mark.parametrize("frames", [0, 7, 1023, 48_000])
def test_info_only_for_walkers_that_skip_no_pad_byte(title, frames):
    """One set of tags for readers that skip the pad byte after an odd chunk, as RIFF says
    (ffmpeg 5 drops an ID3 tag found beside LIST/INFO, with a warning; MediaInfo reads INFO
    as Latin-1): they find ID3 only. minidlna skips no pad byte and reads INFO only: its walk
    finds LIST/INFO, inside a JUNK chunk of the others' walk, then the same data chunk."""
    layout = tagged(frames=frames, title=title, source=SOURCE, thumbnail=THUMB)
    data = layout.wrap(bytes(layout.data_bytes))
    padded, unpadded = chunk_walk(data), chunk_walk(data, pad=False)
    assert [tag for tag, _, _ in padded] == [b"fmt ", b"id3 ", *[b"JUNK"] * 3, b"data", b"JUNK"]
    assert info_tags(data, padded) == {}
    assert [tag for tag, _, _ in unpadded][-3:-1] == [b"LIST", b"data"]
    assert unpadded[-2:] == padded[-2:]
    assert info_tags(data, unpadded) == {b"INAM": title, b"ICMT": COMMENT}
    assert WAVE(io.BytesIO(data)).tags["TIT2"].text == [title]


def test_no_info_without_tags():
    data = tagged().wrap(bytes(tagged().data_bytes))
    assert chunk_walk(data, pad=False) == chunk_walk(data)


@pytest.mark.parametrize("title", ["a", "ab", TITLE])
def test_riff_info_holds_title_and_comment_in_even_chunks(title):
    """``riff_info`` (for GStreamer 1.22): LIST/INFO in every walk, UTF-8, NUL-terminated,
    each sub-chunk padded with NULs to an even size."""
    layout = WavLayout(2, 44_100, 10, title, SOURCE, THUMB, riff_info=True)
    data = layout.wrap(bytes(layout.data_bytes))
    for walk in (chunk_walk(data), chunk_walk(data, pad=False)):
        assert [tag for tag, _, _ in walk] == [b"fmt ", b"LIST", b"id3 ", b"JUNK", b"data", b"JUNK"]
        assert info_tags(data, walk) == {b"INAM": title, b"ICMT": COMMENT}
    assert WAVE(io.BytesIO(data)).tags["TIT2"].text == [title]
    assert b"LIST" not in WavLayout(2, 44_100, 10, riff_info=True).header  # no tags: none


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("frames", [0, 1, 7, 1023, 1024, 1025, 48_000, 1_000_001])
@pytest.mark.parametrize("title", [None, "a", "ab", "Tïtle ☃", "x" * 5000, "é" * 9000])
def test_pcm_from_8_kib_to_a_4_kib_boundary(channels, frames, title):
    """JUNK before ``data`` puts the PCM at 8 KiB at least (after long tags: the first
    offset that fits) and ends it at a 4 KiB boundary; 1 KiB of JUNK follows. Walked with
    pad bytes or without, the file's chunks end at its end."""
    layout = WavLayout(channels, 48_000, frames, title, "https://e.org/s" if title else None)
    data = layout.wrap(bytes(layout.data_bytes))
    walk = chunk_walk(data)
    tags = [b"id3 ", b"JUNK", b"JUNK"] if title else []
    assert [tag for tag, _, _ in walk] == [b"fmt ", *tags, b"JUNK", b"data", b"JUNK"]
    assert chunk_walk(data, pad=False)[-2:] == walk[-2:]
    pcm_start, pcm_end = len(layout.header), layout.pcm_end
    assert walk[-2][1:] == (pcm_start - 8, layout.data_bytes)
    assert pcm_start >= MIN_PCM_OFFSET and pcm_end % 4096 == 0
    filler = walk[2 if title else 1]  # the JUNK that could be shorter (odd with INFO: 1+)
    earliest = max(MIN_PCM_OFFSET, pcm_start - (filler[2] - (1 if title else 0)))
    assert pcm_start - earliest < 4096
    assert walk[-1] == (b"JUNK", pcm_end, 1024 - 8) and len(data) == pcm_end + 1024
    assert len(data) == layout.size and struct.unpack_from("<I", data, 4)[0] == len(data) - 8


@pytest.mark.parametrize(
    ("tags", "frames"),
    [
        ({"title": TITLE}, ["TIT2"]),
        ({"source": SOURCE}, ["COMM::eng", "WOAS"]),
        ({"thumbnail": THUMB}, ["COMM::eng", "WXXX:thumbnail"]),
    ],
)
def test_only_the_tags_there_are(tags, frames):
    layout = tagged(**tags)
    assert sorted(WAVE(io.BytesIO(layout.wrap(bytes(layout.data_bytes)))).tags.keys()) == frames


def test_no_tags_no_chunks():
    assert list(chunks(tagged().header)) == [b"fmt ", b"JUNK"]
    assert list(chunks(tagged(title="", source="", thumbnail="").header)) == [b"fmt ", b"JUNK"]


def test_non_ascii_url_is_percent_encoded_in_url_frames():
    """URL frames are ISO-8859-1: a non-ASCII URL is written as its UTF-8 percent-encoding;
    the comment (UTF-8) keeps it as it is."""
    url = "https://example.org/pistes/é ☃?q=1%20x"
    layout = tagged(source=url)
    tags = WAVE(io.BytesIO(layout.wrap(bytes(layout.data_bytes)))).tags
    assert tags["WOAS"].url == "https://example.org/pistes/%C3%A9%20%E2%98%83?q=1%20x"
    assert tags["COMM::eng"].text == [url]


@pytest.mark.parametrize("channels", [1, 2])
def test_odd_tags_keep_stdlib_wave_and_the_size_exact(channels):
    for title in ("a", "ab", "Tïtle ☃"):
        layout = tagged(channels=channels, frames=7, title=title, source="s", thumbnail="tt")
        data = layout.wrap(bytes(layout.data_bytes))
        assert len(data) == layout.size and struct.unpack_from("<I", data, 4)[0] == len(data) - 8
        with wave.open(io.BytesIO(data)) as w:
            assert (w.getnchannels(), w.getnframes()) == (channels, 7)
        assert WAVE(io.BytesIO(data)).tags["TIT2"].text == [title]


@pytest.mark.skipif(not HAVE_FFMPEG, reason="needs ffmpeg and ffprobe")
def test_ffprobe_shows_title_and_comment_and_ffmpeg_reads_the_audio(tmp_path):
    layout = tagged(title=TITLE, source=SOURCE, thumbnail=THUMB)
    pcm = np.random.default_rng(0).integers(-32768, 32768, layout.data_bytes // 2, "<i2")
    path = tmp_path / "t.wav"
    path.write_bytes(layout.wrap(pcm.tobytes()))
    tags = ffprobe_tags(path)
    assert tags["title"] == TITLE and tags["comment"] == COMMENT
    decoded = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-"],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    assert decoded == pcm.tobytes()


@pytest.mark.skipif(not HAVE_FFMPEG, reason="needs ffmpeg and ffprobe")
def test_rf64_keeps_the_tags(tmp_path):
    layout = tagged(frames=1_200_000_000, title=TITLE, source=SOURCE, thumbnail=THUMB)
    path = tmp_path / "big.wav"
    with open(path, "wb") as f:  # sparse: only the header is written
        f.write(layout.header)
        f.truncate(layout.size)
    assert layout.header[:4] == b"RF64"
    tags = ffprobe_tags(path)
    assert tags["title"] == TITLE and tags["comment"] == COMMENT


def test_plain_header_is_8_kib_and_a_bit():
    assert len(WavLayout(channels=1, sample_rate=24_000, frames=5).header) == 8192 + 4086


@pytest.mark.parametrize("tags", [{}, {"title": TITLE, "source": SOURCE, "thumbnail": THUMB}])
def test_rf64_above_4_gib(tags):
    layout = WavLayout(channels=2, sample_rate=48_000, frames=1_200_000_000, **tags)
    header = layout.header
    assert header[:4] == b"RF64" and header[8:16] == b"WAVEds64"
    riff_size, data_size, frames = struct.unpack_from("<QQQ", header, 20)
    assert (riff_size, data_size, frames) == (layout.size - 8, layout.data_bytes, 1_200_000_000)
    assert header[-8:] == b"data\xff\xff\xff\xff"
    assert list(chunks(header)) == [b"ds64", b"fmt ", *([b"id3 "] if tags else []), b"JUNK"]


def test_samples_for_bytes_rounds_outward():
    layout = WavLayout(channels=2, sample_rate=48_000, frames=100)
    assert layout.samples_for_bytes(0, 4) == (0, 1)
    assert layout.samples_for_bytes(3, 9) == (0, 3)


def test_float_to_pcm16_rounds_and_clips():
    audio = np.array([[0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 1 / 32767 / 2]], dtype=np.float32)
    expected = [0, 16384, -16384, 32767, -32767, 32767, -32767, 0]
    assert list(np.frombuffer(float_to_pcm16(audio), "<i2")) == expected


def test_float_to_pcm16_interleaves_channels():
    audio = np.array([[0.1, 0.2], [-0.1, -0.2]], dtype=np.float32)
    assert list(np.frombuffer(float_to_pcm16(audio), "<i2")) == [3277, -3277, 6553, -6553]


def test_tags_that_are_not_valid_unicode_are_replaced():
    """JSON may hold lone surrogates: they become "?" rather than failing the listing."""
    layout = tagged(title="a\ud800b", source="https://x/\udfff", thumbnail="t\ud800")
    tags = WAVE(io.BytesIO(layout.wrap(bytes(layout.data_bytes)))).tags
    assert tags["TIT2"].text == ["a?b"] and tags["WOAS"].url == "https://x/?"
    assert tags["WXXX:thumbnail"].url == "t?" and tags["COMM::eng"].text == ["https://x/?\nt?"]


@pytest.mark.parametrize("riff_info", [False, True])
def test_players_read_exactly_the_pcm_and_none_of_the_junk(tmp_path, riff_info):
    """soundfile (libsndfile), sox and GStreamer's wavparse, like ffmpeg and ``wave``, read
    the PCM between the JUNK chunks, every sample and nothing else."""
    import soundfile

    for tool in ("sox", "gst-launch-1.0"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/setup --test"
    layout = WavLayout(2, 48_000, 48_001, TITLE, SOURCE, riff_info=riff_info)
    pcm = np.random.default_rng(1).integers(-3000, 3000, (48_001, 2)).astype("<i2")
    path = tmp_path / "t.wav"
    path.write_bytes(layout.wrap(pcm.tobytes()))
    samples, rate = soundfile.read(path, dtype="int16")
    assert rate == 48_000 and np.array_equal(samples, pcm)
    sox = subprocess.run(["sox", str(path), "-t", "raw", "-"], capture_output=True, check=True)
    assert sox.stdout == pcm.tobytes() and sox.stderr == b""
    out = tmp_path / "gst.raw"
    pipeline = ["filesrc", f"location={path}", "!", "wavparse", "!", "filesink", f"location={out}"]
    subprocess.run(["gst-launch-1.0", "-q", *pipeline], capture_output=True, check=True)
    assert out.read_bytes() == pcm.tobytes()
