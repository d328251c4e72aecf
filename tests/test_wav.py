"""WAV header layout (checked against the stdlib and ffprobe) and PCM conversion."""

import io
import struct
import wave

import numpy as np

from ecdcfs.wav import WavLayout, float_to_pcm16


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


def test_plain_header_is_44_bytes():
    assert len(WavLayout(channels=1, sample_rate=24_000, frames=5).header) == 44


def test_rf64_above_4_gib():
    layout = WavLayout(channels=2, sample_rate=48_000, frames=1_200_000_000)
    header = layout.header
    assert header[:4] == b"RF64" and header[8:16] == b"WAVEds64"
    riff_size, data_size, frames = struct.unpack_from("<QQQ", header, 20)
    assert (riff_size, data_size, frames) == (layout.size - 8, layout.data_bytes, 1_200_000_000)
    assert header[-8:] == b"data\xff\xff\xff\xff"


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
