"""Raw PCM at 48 kHz (s16le, 2 channels): what ``ecdc-stream -d`` writes and ``-e`` reads.

A file at another rate (an ``sr`` that is not 48,000, a 24 kHz model file) is resampled
with a streaming soxr resampler, mono goes to both channels; at 48 kHz the samples are
the decoder's own. No torch here (numpy and soxr).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .container import Header
from .wav import float_to_pcm16

if TYPE_CHECKING:
    from .audiofile import Reader
    from .settings import Settings

PCM_RATE = 48_000
PCM_CHANNELS = 2
PCM_BLOCK_ALIGN = PCM_CHANNELS * 2  # bytes of one sample of every channel (s16le)
PRE_ROLL_S = 0.05  # resampler warm-up decoded before a seek point


def output_length(header: Header) -> int:
    """Samples per channel of the 48 kHz output (soxr's length for a resampled file)."""
    rate, length = header.sample_rate, header.audio_length
    if rate == PCM_RATE:
        return length
    return (2 * length * PCM_RATE + rate) // (2 * rate)  # round half up, as soxr does


def source_units(header: Header, start: int, stop: int) -> range:
    """The decode units (48 kHz: frames; 24 kHz: the core's fixed chunks) that output
    samples ``[start, stop)`` come from."""
    from .units import decode_units  # the decoding side, not needed for the constants

    rate = header.sample_rate
    margin = 0 if rate == PCM_RATE else int(PRE_ROLL_S * rate) + 1
    first = max(0, start * rate // PCM_RATE - margin)
    last = min(header.audio_length, -(-stop * rate // PCM_RATE) + margin)
    return decode_units(header).covering(first, last)


def all_at_once(settings: Settings, header: Header, units: range) -> Settings:
    """``settings`` that decode every unit of ``units`` at once and keep them all until
    they are written (a read-ahead of the whole range, a cache that holds it)."""
    from .units import decode_units

    unit_bytes = decode_units(header).decoded_bytes
    return dataclasses.replace(
        settings,
        bufsize=max(1, len(units)),
        cache_mb=max(settings.cache_mb, len(units) * unit_bytes // 2**20 + 16),
    )


def pcm_chunks(reader: Reader, start: int, stop: int) -> Iterator[bytes]:
    """PCM of output samples ``[start, stop)``, in pieces of about one frame.

    At 48 kHz the samples are the decoder's own. Otherwise the file's samples go through
    a streaming soxr resampler started on a source sample whose time is also on the
    48 kHz grid, a little before the seek point, so every output sample is the one a
    resample of the whole file gives there (to float precision) wherever the seek lands.
    """
    header = reader.audio.header
    rate, length = header.sample_rate, header.audio_length
    chunk = header.model.stride or header.model.sample_rate
    if rate == PCM_RATE:
        position = start
        while position < stop:
            end = min(stop, (position // chunk + 1) * chunk)
            yield _pcm(reader.samples(position, end))
            position = end
        return
    import soxr

    period_in = rate // math.gcd(rate, PCM_RATE)  # source samples per grid-aligned step
    period_out = PCM_RATE // math.gcd(rate, PCM_RATE)
    first_source = start * rate // PCM_RATE - int(PRE_ROLL_S * rate)
    steps = max(0, first_source // period_in)
    position, skip = steps * period_in, start - steps * period_out
    remaining = stop - start
    resampler = soxr.ResampleStream(rate, PCM_RATE, header.model.channels, dtype="float32")
    while remaining > 0 and position < length:
        end = min(length, (position // chunk + 1) * chunk)
        samples = reader.samples(position, end)
        out = resampler.resample_chunk(np.ascontiguousarray(samples.T), last=end == length)
        position = end
        dropped = min(skip, len(out))
        out, skip = out[dropped:][:remaining], skip - dropped
        remaining -= len(out)
        if len(out):
            yield _pcm(out.T)


def _pcm(samples: np.ndarray) -> bytes:
    """float32 ``[channels, n]`` as interleaved stereo s16le (mono to both channels)."""
    if samples.shape[0] == 1:
        samples = np.repeat(samples, PCM_CHANNELS, axis=0)
    return float_to_pcm16(samples)
