"""Every length encodec writes: the frame layout, sizes and bytes at the edges of the grids.

A 48 kHz file of ``k * 47,520 + r`` samples ends with two short frames when ``r <= 160``
(the one before the last has 149 code steps), and for ``160 < r <= 320`` frame ``k - 1``
decodes past the last frame's end (encodec's own ``decode`` crashes there). The oracle is
always ``encodec.compress`` for the bytes and encodec's per-frame decode for the audio.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from encodec.compress import compress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import synth
from ecdcfs.causal import CHUNK_STEPS
from ecdcfs.container import SCALE, parse_header, unpack_codes
from helpers import READ, read_all
from mounting import wav_size

STRIDE = 47_520
REMAINDERS = [1, 160, 161, 320, 479, 480, 481, 47_519]
EDGE_LENGTHS_48K = [k * STRIDE + r for k in range(1, 5) for r in REMAINDERS]
SHORT_LENGTHS_48K = [1, 2, 160, 319, 320, 321, 479, 480, 481, 47_519, 47_520]


def data_pcm(audio, wav: bytes) -> np.ndarray:
    """The PCM of a WAV read back, as int16 ``[samples, channels]``."""
    header = len(audio.wav.header)
    pcm = wav[header : header + audio.wav.data_bytes]
    return np.frombuffer(pcm, "<i2").reshape(-1, audio.wav.channels)


def encoder_frames(samples: int, kbps: float, seed: int) -> tuple[bytes, list]:
    """``encodec.compress`` bytes and the encoder's own frames for the same audio."""
    wav = torch.from_numpy(synth.synth_audio(48_000, 2, samples, seed=seed))
    with synth.MODEL_LOCK, torch.no_grad():  # the model is shared: its bandwidth too
        model = synth.load_model("encodec_48khz")
        model.set_target_bandwidth(kbps)
        return compress(model, wav), model.encode(wav[None])


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    k=st.integers(0, 4),
    r=st.one_of(st.integers(1, 481), st.integers(1, STRIDE), st.integers(47_000, STRIDE)),
    kbps=st.sampled_from([3, 6, 12, 24]),
)
def test_layout_finds_every_frame_the_encoder_wrote(torch_home, k, r, kbps):
    samples = k * STRIDE + r
    data, frames = encoder_frames(samples, kbps, seed=samples)
    header = parse_header(data, len(data))
    layout = header.layout
    assert layout.frame_count == len(frames)
    assert layout.plain_payload_bytes() == len(data) - header.payload_offset
    for index, (codes, scale) in enumerate(frames):
        assert layout.code_steps(index) == codes.shape[-1]
        offset = header.payload_offset + layout.plain_frame_offset(index)
        raw = data[offset : offset + layout.plain_frame_bytes(index)]
        assert SCALE.unpack_from(raw)[0] == scale.item()
        unpacked = unpack_codes(raw[SCALE.size :], header.num_codebooks, codes.shape[-1], 10)
        assert np.array_equal(unpacked, codes[0].numpy())


@pytest.mark.parametrize("samples", EDGE_LENGTHS_48K + SHORT_LENGTHS_48K)
def test_48khz_edge_lengths_read_exactly(engine, tmp_path, samples):
    data = synth.make_ecdc(samples=samples, kbps=3)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    assert audio.size == wav_size(samples * 4)  # st_size: from the header
    wav = read_all(audio.reader())
    assert len(wav) == audio.size
    expected = synth.reference_pcm(data)
    assert np.array_equal(data_pcm(audio, wav), expected)  # 0 LSB on the CPU
    # Any order, any size: the same bytes (the short frames decoded out of order).
    rng = random.Random(samples)
    reader = audio.reader()
    for _ in range(8):
        offset = rng.randrange(audio.size)
        size = rng.choice([1, 3, 4096, READ])
        assert reader.read(offset, size) == wav[offset : offset + size]


@pytest.mark.parametrize(
    ("samples", "kbps", "lm"),
    [
        (STRIDE + 1, 24, False),  # nc 16: whole-byte frames
        (2 * STRIDE + 160, 12, False),
        (2 * STRIDE + 320, 6, False),
        (STRIDE + 160, 6, True),  # LM-coded frames of 149 steps
        (STRIDE + 320, 3, True),  # LM-coded, the frame before the last reaches further
    ],
)
def test_48khz_edge_lengths_every_bandwidth_and_lm(engine, tmp_path, samples, kbps, lm):
    data = synth.make_ecdc(samples=samples, kbps=kbps, lm=lm)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    wav = read_all(audio.reader())
    assert len(wav) == audio.size
    assert np.array_equal(data_pcm(audio, wav), synth.reference_pcm(data))


def test_reference_decodes_lengths_encodec_cannot(torch_home):
    """The oracle itself: where encodec's decode works, the padded blend is the same."""
    from encodec.compress import decompress

    for samples in (STRIDE + 481, 2 * STRIDE + 1):
        data = synth.make_ecdc(samples=samples, kbps=3)
        wav, _ = decompress(data)
        assert torch.equal(synth.decompress_fixed(data)[0], wav)
    with pytest.raises(RuntimeError):
        decompress(synth.make_ecdc(samples=STRIDE + 320, kbps=3))


CHUNK_24K = CHUNK_STEPS * 320  # samples per 24 kHz decode chunk
EDGE_LENGTHS_24K = [
    1,
    319,
    320,
    321,  # around one code step
    CHUNK_24K - 1,
    CHUNK_24K,  # exactly one chunk
    CHUNK_24K + 1,  # a chunk, then a chunk of one step
    CHUNK_24K + 320,
    2 * CHUNK_24K + 1,
]


@pytest.mark.parametrize("samples", EDGE_LENGTHS_24K)
def test_24khz_edge_lengths_read_within_one_lsb(engine, tmp_path, samples):
    data = synth.make_ecdc(model="encodec_24khz", samples=samples, kbps=6, seed=5)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    assert audio.size == wav_size(samples * 2)
    wav = read_all(audio.reader())
    assert len(wav) == audio.size
    actual = data_pcm(audio, wav).astype(np.int32)
    expected = synth.reference_pcm(data).astype(np.int32)
    if samples <= CHUNK_24K:  # one chunk: encodec's own whole-file decode
        assert np.array_equal(actual, expected)
    else:
        assert np.abs(actual - expected).max() <= 1
    # The last samples first, then a read across each seam between chunks.
    fresh = audio.reader()
    end = audio.wav.pcm_end
    assert fresh.read(end - 2, 2) == wav[end - 2 : end]
    for seam in range(1, audio.unit_count):
        offset = len(audio.wav.header) + 2 * seam * CHUNK_24K - 6
        assert fresh.read(offset, 12) == wav[offset : offset + 12]
