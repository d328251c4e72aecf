"""WAV layout: header bytes (RIFF or RF64, optional LIST/INFO) and float -> PCM s16le."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

BYTES_PER_SAMPLE = 2  # PCM s16le
_U32_MAX = 0xFFFFFFFF
_PCM_SCALE = np.float32(32767)


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


@dataclass(frozen=True)
class WavLayout:
    """Byte layout of the WAV file that presents ``frames`` samples of audio."""

    channels: int
    sample_rate: int
    frames: int  # samples per channel
    title: str | None = None
    source: str | None = None

    @property
    def block_align(self) -> int:
        return self.channels * BYTES_PER_SAMPLE

    @property
    def data_bytes(self) -> int:
        return self.frames * self.block_align

    @property
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
        info = _info_chunk({b"INAM": self.title or "", b"ISRC": self.source or ""})
        # Chunks after the RIFF/RF64 word: [ds64] fmt [LIST] data-header.
        small_riff = 4 + len(fmt) + len(info) + 8 + self.data_bytes
        if small_riff <= _U32_MAX:
            return (
                b"RIFF"
                + struct.pack("<I", small_riff)
                + b"WAVE"
                + fmt
                + info
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
            + info
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
