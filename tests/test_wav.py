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

from ecdcfs.wav import WavLayout, float_to_pcm16

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


def info_tags(header: bytes) -> dict[bytes, str]:
    """LIST/INFO sub-chunks as text."""
    body, found, offset = chunks(header)[b"LIST"], {}, 4
    assert body[:4] == b"INFO"
    while offset < len(body):
        tag, size = body[offset : offset + 4], struct.unpack_from("<I", body, offset + 4)[0]
        found[tag] = body[offset + 8 : offset + 8 + size].rstrip(b"\0").decode()
        offset += 8 + size + size % 2
    return found


def ffprobe_tags(path) -> dict:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(probe.stdout)["format"].get("tags", {})


def test_header_parses_with_stdlib_wave():
    layout = WavLayout(channels=2, sample_rate=44_100, frames=1000, title="Tïtle", source="u")
    data = layout.header + bytes(layout.data_bytes)
    assert len(data) == layout.size
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes(), w.getsampwidth()) == (
            2,
            44_100,
            1000,
            2,
        )
    assert b"LIST" in layout.header and "Tïtle".encode() + b"\0" in layout.header


def test_tags_read_by_mutagen():
    """ID3v2.4 in an ``id3 `` chunk before ``data``: UTF-8 title, source and thumbnail."""
    layout = tagged(title=TITLE, source=SOURCE, thumbnail=THUMB)
    wav = WAVE(io.BytesIO(layout.header + bytes(layout.data_bytes)))
    tags = wav.tags
    assert tags.version == (2, 4, 0)
    assert tags["TIT2"].text == [TITLE] and tags["TIT2"].encoding == 3
    assert tags["WOAS"].url == SOURCE
    assert tags["COMM::eng"].text == [COMMENT] and tags["COMM::eng"].desc == ""
    assert tags["WXXX:thumbnail"].url == THUMB
    assert sorted(tags.keys()) == ["COMM::eng", "TIT2", "WOAS", "WXXX:thumbnail"]
    assert (wav.info.channels, wav.info.sample_rate) == (2, 44_100)
    assert list(chunks(layout.header)) == [b"fmt ", b"LIST", b"id3 "]


def test_info_chunk_keeps_title_and_comment_for_older_readers():
    header = tagged(title=TITLE, source=SOURCE, thumbnail=THUMB).header
    assert info_tags(header) == {b"INAM": TITLE, b"ICMT": COMMENT}
    assert info_tags(tagged(thumbnail=THUMB).header) == {b"ICMT": THUMB}


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
    assert sorted(WAVE(io.BytesIO(layout.header + bytes(layout.data_bytes))).tags.keys()) == frames


def test_no_tags_no_chunks():
    assert list(chunks(tagged().header)) == [b"fmt "]
    assert list(chunks(tagged(title="", source="", thumbnail="").header)) == [b"fmt "]


def test_non_ascii_url_is_percent_encoded_in_url_frames():
    """URL frames are ISO-8859-1: a non-ASCII URL is written as its UTF-8 percent-encoding;
    the comment (UTF-8) keeps it as it is."""
    url = "https://example.org/pistes/é ☃?q=1%20x"
    layout = tagged(source=url)
    tags = WAVE(io.BytesIO(layout.header + bytes(layout.data_bytes))).tags
    assert tags["WOAS"].url == "https://example.org/pistes/%C3%A9%20%E2%98%83?q=1%20x"
    assert tags["COMM::eng"].text == [url]


@pytest.mark.parametrize("channels", [1, 2])
def test_odd_tags_keep_stdlib_wave_and_the_size_exact(channels):
    for title in ("a", "ab", "Tïtle ☃"):
        layout = tagged(channels=channels, frames=7, title=title, source="s", thumbnail="tt")
        data = layout.header + bytes(layout.data_bytes)
        assert len(data) == layout.size and struct.unpack_from("<I", data, 4)[0] == len(data) - 8
        with wave.open(io.BytesIO(data)) as w:
            assert (w.getnchannels(), w.getnframes()) == (channels, 7)
        assert WAVE(io.BytesIO(data)).tags["TIT2"].text == [title]


@pytest.mark.skipif(not HAVE_FFMPEG, reason="needs ffmpeg and ffprobe")
def test_ffprobe_shows_title_and_comment_and_ffmpeg_reads_the_audio(tmp_path):
    layout = tagged(title=TITLE, source=SOURCE, thumbnail=THUMB)
    pcm = np.random.default_rng(0).integers(-32768, 32768, layout.data_bytes // 2, "<i2")
    path = tmp_path / "t.wav"
    path.write_bytes(layout.header + pcm.tobytes())
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


def test_plain_header_is_44_bytes():
    assert len(WavLayout(channels=1, sample_rate=24_000, frames=5).header) == 44


@pytest.mark.parametrize("tags", [{}, {"title": TITLE, "source": SOURCE, "thumbnail": THUMB}])
def test_rf64_above_4_gib(tags):
    layout = WavLayout(channels=2, sample_rate=48_000, frames=1_200_000_000, **tags)
    header = layout.header
    assert header[:4] == b"RF64" and header[8:16] == b"WAVEds64"
    riff_size, data_size, frames = struct.unpack_from("<QQQ", header, 20)
    assert (riff_size, data_size, frames) == (layout.size - 8, layout.data_bytes, 1_200_000_000)
    assert header[-8:] == b"data\xff\xff\xff\xff"
    assert list(chunks(header)) == [b"ds64", b"fmt ", b"LIST", b"id3 "][: 2 + 2 * bool(tags)]


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
    tags = WAVE(io.BytesIO(layout.header + bytes(layout.data_bytes))).tags
    assert tags["TIT2"].text == ["a?b"] and tags["WOAS"].url == "https://x/?"
    assert tags["WXXX:thumbnail"].url == "t?" and tags["COMM::eng"].text == ["https://x/?\nt?"]
