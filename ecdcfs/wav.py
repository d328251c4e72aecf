"""WAV layout: header bytes (RIFF or RF64, optional tags) and float -> PCM s16le.

Tags go in twice, before ``data``: an ID3v2.4 tag in an ``id3 `` chunk (UTF-8 frames, which
ffmpeg, TagLib, mutagen, MediaInfo and ExifTool read) and LIST/INFO for older readers
(UTF-8 too, but INFO has no charset, so some show a non-ASCII title as Latin-1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote

import numpy as np

BYTES_PER_SAMPLE = 2  # PCM s16le
_U32_MAX = 0xFFFFFFFF
_PCM_SCALE = np.float32(32767)
_UTF8 = b"\x03"  # ID3v2.4 text encoding 3
# Language of the comment frame: what taggers write (players that filter by one expect it).
_COMMENT_LANGUAGE = b"eng"
_THUMBNAIL_DESCRIPTION = "thumbnail"
# URL frames are ISO-8859-1: printable ASCII stays, the rest is percent-encoded (as UTF-8).
_URL_SAFE = "".join(map(chr, range(0x21, 0x7F)))


def _chunk(tag: bytes, body: bytes) -> bytes:
    """A RIFF chunk, padded to an even length."""
    pad = b"\0" if len(body) % 2 else b""
    return tag + struct.pack("<I", len(body)) + body + pad


def _info_chunk(tags: dict[bytes, str]) -> bytes:
    """LIST/INFO chunk with NUL-terminated UTF-8 strings; empty when there is nothing to say."""
    body = b"".join(
        _chunk(tag, text.encode("utf-8", "replace") + b"\0") for tag, text in tags.items() if text
    )
    return _chunk(b"LIST", b"INFO" + body) if body else b""


def _syncsafe(size: int) -> bytes:
    """An ID3v2.4 size: 28 bits in four bytes of 7 (metadata is far below 256 MiB)."""
    return bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))


def _id3_text(text: str) -> bytes:
    """A NUL-terminated UTF-8 string (as mutagen and ffmpeg write them)."""
    return text.encode("utf-8", "replace") + b"\0"


def _id3_url(url: str) -> bytes:
    """A NUL-terminated URL in ISO-8859-1 (ASCII after percent-encoding)."""
    return quote(url, safe=_URL_SAFE, errors="replace").encode("ascii") + b"\0"


def _id3_chunk(title: str, comment: str, source: str, thumbnail: str) -> bytes:
    """``id3 `` chunk with an ID3v2.4 tag: TIT2 title, COMM comment, WOAS source and WXXX
    thumbnail; empty when there is nothing to say."""
    frames = []
    if title:
        frames.append((b"TIT2", _UTF8 + _id3_text(title)))
    if comment:
        frames.append((b"COMM", _UTF8 + _COMMENT_LANGUAGE + b"\0" + _id3_text(comment)))
    if source:
        frames.append((b"WOAS", _id3_url(source)))
    if thumbnail:
        frames.append((b"WXXX", _UTF8 + _id3_text(_THUMBNAIL_DESCRIPTION) + _id3_url(thumbnail)))
    if not frames:
        return b""
    body = b"".join(tag + _syncsafe(len(data)) + b"\0\0" + data for tag, data in frames)
    return _chunk(b"id3 ", b"ID3\x04\x00\x00" + _syncsafe(len(body)) + body)


@dataclass(frozen=True)
class WavLayout:
    """Byte layout of the WAV file that presents ``frames`` samples of audio."""

    channels: int
    sample_rate: int
    frames: int  # samples per channel
    title: str | None = None
    source: str | None = None
    thumbnail: str | None = None

    @property
    def block_align(self) -> int:
        return self.channels * BYTES_PER_SAMPLE

    @property
    def data_bytes(self) -> int:
        return self.frames * self.block_align

    @property
    def comment(self) -> str:
        """The comment tag: the source URL and the thumbnail URL, a line each."""
        return "\n".join(url for url in (self.source, self.thumbnail) if url)

    @cached_property
    def header(self) -> bytes:
        """Every byte before the PCM data."""
        fmt = _chunk(
            b"fmt ",
            struct.pack(
                "<HHIIHH",
                1,
                self.channels,
                self.sample_rate,
                self.sample_rate * self.block_align,
                self.block_align,
                8 * BYTES_PER_SAMPLE,
            ),
        )
        comment = self.comment
        tags = _info_chunk({b"INAM": self.title or "", b"ICMT": comment}) + _id3_chunk(
            self.title or "", comment, self.source or "", self.thumbnail or ""
        )
        # Chunks after the RIFF/RF64 word: [ds64] fmt [LIST] [id3] data-header.
        small_riff = 4 + len(fmt) + len(tags) + 8 + self.data_bytes
        if small_riff <= _U32_MAX:
            return (
                b"RIFF"
                + struct.pack("<I", small_riff)
                + b"WAVE"
                + fmt
                + tags
                + b"data"
                + struct.pack("<I", self.data_bytes)
            )
        ds64 = _chunk(b"ds64", struct.pack("<QQQI", 0, self.data_bytes, self.frames, 0))
        riff_size = small_riff + len(ds64)
        ds64 = _chunk(b"ds64", struct.pack("<QQQI", riff_size, self.data_bytes, self.frames, 0))
        return (
            b"RF64"
            + struct.pack("<I", _U32_MAX)
            + b"WAVE"
            + ds64
            + fmt
            + tags
            + b"data"
            + struct.pack("<I", _U32_MAX)
        )

    @property
    def size(self) -> int:
        """Exact size of the whole WAV file in bytes."""
        return len(self.header) + self.data_bytes

    def samples_for_bytes(self, start: int, stop: int) -> tuple[int, int]:
        """Sample range ``[first, last)`` whose PCM covers data bytes ``[start, stop)``."""
        return start // self.block_align, -(-stop // self.block_align)


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """Interleave float32 ``[channels, samples]`` as s16le: ``round(x * 32767)``, clipped."""
    clipped = np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0)
    return np.rint(clipped * _PCM_SCALE).astype("<i2").T.tobytes()
