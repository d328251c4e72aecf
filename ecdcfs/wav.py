"""WAV layout (RIFF or RF64) and float -> PCM s16le.

The file is ``RIFF|RF64 WAVE [ds64] fmt [id3 ] JUNK [JUNK JUNK] data <PCM> JUNK``:

- Tags are one ID3v2.4 tag in an ``id3 `` chunk (UTF-8 frames, which ffmpeg, TagLib,
  mutagen, MediaInfo and ExifTool read). Readers that find LIST/INFO too misread: ffmpeg 5
  drops the ID3 tag with a warning, MediaInfo reads INFO as Latin-1. minidlna reads only
  LIST/INFO, and walks the chunks without skipping the pad byte after an odd size: the
  same tags as LIST/INFO (UTF-8) sit where that walk, and only that one, finds them (see
  :func:`_unpadded_walkers_only`). ``riff_info`` writes LIST/INFO for every reader, for
  GStreamer 1.22, which reads nothing else.
- A ``JUNK`` chunk before ``data`` puts the PCM at 8 KiB at least (:data:`MIN_PCM_OFFSET`:
  scanners read the header in buffers of up to 8 KiB, ExifTool's, and ask for no audio
  then) and ends the PCM at a 4 KiB boundary (:data:`PCM_END_ALIGN`): glibc reads a
  ``FILE`` from a block boundary after a seek, so a chunk walker (TagLib) that looks for the
  chunk after the PCM, or a tag reader that looks at the file's last bytes, reads none of
  the audio.
- A ``JUNK`` chunk of :data:`TRAILER_BYTES` follows the PCM: scanners look for ID3v1 and
  APE tags in the last bytes of a file (mutagen the last 160, TagLib the last KiB) and
  find no audio there either.
- Every chunk but the JUNK before that LIST/INFO has an even size, and the whole layout
  follows from the header's fields alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote

import numpy as np

BYTES_PER_SAMPLE = 2  # PCM s16le
_U32_MAX = 0xFFFFFFFF
MIN_PCM_OFFSET = 8192  # where the PCM starts, at least (see the module doc)
PCM_END_ALIGN = 4096  # where it ends: a multiple of this
TRAILER_BYTES = 1024  # the JUNK chunk after the PCM, its header included
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
    """LIST/INFO chunk with NUL-terminated UTF-8 strings, each padded with NULs to an even
    size; empty when there is nothing to say."""
    body = b""
    for tag, text in tags.items():
        if text:
            data = text.encode("utf-8", "replace") + b"\0"
            body += _chunk(tag, data + b"\0" * (len(data) % 2))
    return _chunk(b"LIST", b"INFO" + body) if body else b""


def _unpadded_walkers_only(info: bytes) -> bytes:
    """``info`` placed for readers that skip no pad byte after an odd-sized chunk (minidlna)
    and hidden from those that do: the pad byte of an odd JUNK chunk, an empty JUNK chunk,
    then a JUNK chunk whose body holds ``info`` where the unpadded walk lands.

    The unpadded walk reads the pad byte and the empty chunk's ``JUNK`` as a chunk id and
    ``K\0\0\0`` as its size (75), which puts it 66 bytes into the third chunk's body; after
    ``info`` both walks meet again at the chunk that follows.
    """
    lands_at = 8 + ord("K") - 17  # from the pad byte: 8 + 75 on; the body: 1 + 8 + 8 on
    return b"\0" + _chunk(b"JUNK", b"") + _chunk(b"JUNK", bytes(lands_at) + info)


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
    body += b"\0" * (len(body) % 2)  # ID3 padding: an even chunk, no RIFF pad byte
    return _chunk(b"id3 ", b"ID3\x04\x00\x00" + _syncsafe(len(body)) + body)


def _ds64(riff_size: int, data_size: int, frames: int) -> bytes:
    """The RF64 sizes chunk (its 32-bit fields say 0xFFFFFFFF)."""
    return _chunk(b"ds64", struct.pack("<QQQI", riff_size, data_size, frames, 0))


def pcm_offset(chunks_end: int, data_bytes: int) -> int:
    """Where ``data_bytes`` of PCM start after chunks that end at ``chunks_end`` (the JUNK
    chunk's and the data chunk's headers included): at :data:`MIN_PCM_OFFSET` or after the
    chunks, and so that the PCM ends at a multiple of :data:`PCM_END_ALIGN`."""
    start = max(MIN_PCM_OFFSET, chunks_end)
    return start + -(start + data_bytes) % PCM_END_ALIGN


@dataclass(frozen=True)
class WavLayout:
    """Byte layout of the WAV file that presents ``frames`` samples of audio."""

    channels: int
    sample_rate: int
    frames: int  # samples per channel
    title: str | None = None
    source: str | None = None
    thumbnail: str | None = None
    riff_info: bool = False  # the tags as LIST/INFO too (see the module doc)

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
        """Every byte before the PCM: ``len(header)`` is where the PCM starts."""
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
        tags = _id3_chunk(self.title or "", self.comment, self.source or "", self.thumbnail or "")
        info = _info_chunk({b"INAM": self.title or "", b"ICMT": self.comment})
        hidden = b""
        if self.riff_info:
            tags = info + tags
        elif info:
            hidden = _unpadded_walkers_only(info)
        # ``hidden`` starts at the pad byte of the JUNK before it: that JUNK is odd-sized, so
        # at least 1 byte long.
        min_junk = 1 if hidden else 0
        # WAVE, the chunks, the JUNK and data headers, and the JUNK's shortest body
        chunks = 4 + len(fmt) + len(tags) + len(hidden) + 16 + min_junk
        ds64 = b""
        if self._riff_size(chunks) > _U32_MAX:  # RF64: the sizes go in a ds64 chunk up front
            ds64 = _ds64(
                self._riff_size(chunks + len(_ds64(0, 0, 0))), self.data_bytes, self.frames
            )
            chunks += len(ds64)
        if ds64:
            head, data_size = b"RF64" + struct.pack("<I", _U32_MAX), _U32_MAX
        else:
            head, data_size = b"RIFF" + struct.pack("<I", self._riff_size(chunks)), self.data_bytes
        # The JUNK's body fills up to the PCM's offset.
        size = pcm_offset(8 + chunks, self.data_bytes) - 8 - chunks + min_junk
        junk = b"JUNK" + struct.pack("<I", size) + bytes(size) + hidden
        return head + b"WAVE" + ds64 + fmt + tags + junk + b"data" + struct.pack("<I", data_size)

    def _riff_size(self, chunks: int) -> int:
        """The RIFF size (the file less 8 bytes) with ``chunks`` bytes before the PCM."""
        return pcm_offset(8 + chunks, self.data_bytes) - 8 + self.data_bytes + TRAILER_BYTES

    @property
    def pcm_end(self) -> int:
        return len(self.header) + self.data_bytes

    @cached_property
    def trailer(self) -> bytes:
        """Every byte after the PCM: a JUNK chunk (see the module doc)."""
        return _chunk(b"JUNK", bytes(TRAILER_BYTES - 8))

    @property
    def size(self) -> int:
        """Exact size of the whole WAV file in bytes."""
        return self.pcm_end + TRAILER_BYTES

    def wrap(self, pcm: bytes) -> bytes:
        """The whole WAV file around ``pcm`` (``data_bytes`` of it)."""
        return self.header + pcm + self.trailer

    def samples_for_bytes(self, start: int, stop: int) -> tuple[int, int]:
        """Sample range ``[first, last)`` whose PCM covers data bytes ``[start, stop)``."""
        return start // self.block_align, -(-stop // self.block_align)


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """Interleave float32 ``[channels, samples]`` as s16le: ``round(x * 32767)``, clipped."""
    clipped = np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0)
    return np.rint(clipped * _PCM_SCALE).astype("<i2").T.tobytes()
