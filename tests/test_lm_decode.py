"""LM-coded payloads: ecdcfs's fast entropy decoding gives the codes encodec encoded.

``decode_lm_steps`` builds every codebook's quantized CDF of a step in one call and finds
each symbol with one ``searchsorted``; these tests hold both to encodec's own per-codebook
``build_stable_quantized_cdf`` and ``ArithmeticDecoder.pull``, and the decoded codes to
the codes encodec's encoder produced, at every bandwidth of both models.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from encodec.quantization.ac import ArithmeticDecoder, build_stable_quantized_cdf

import synth
from ecdcfs.container import MODELS, ContainerError, parse_header
from ecdcfs.lm import load_lm, pull_symbol, stable_quantized_cdfs
from ecdcfs.source import MemorySource
from ecdcfs.units import Chunks, decode_units

RANGE_BITS = 24  # encodec's ArithmeticCoder default, which compress uses

# (model, kbps, samples): every bandwidth; short last frames (48 kHz: a second frame of one
# step, or of 16 steps the last one partial; 24 kHz: 76 steps, the last partial, or two).
CASES = [
    ("encodec_48khz", 3, 100_000),
    ("encodec_48khz", 6, 47_521),
    ("encodec_48khz", 12, 47_521),
    ("encodec_48khz", 24, 100_000),
    ("encodec_24khz", 1.5, 24_001),
    ("encodec_24khz", 3, 24_001),
    ("encodec_24khz", 6, 400),
    ("encodec_24khz", 12, 24_001),
    ("encodec_24khz", 24, 24_001),
]


def encoded_frames(model: str, samples: int, kbps: float) -> list[tuple[float | None, np.ndarray]]:
    """(scale, codes ``[codebooks, steps]``) of each frame encodec's encoder gives for
    ``synth.make_ecdc``'s audio: what ``encodec.compress`` arithmetic-codes."""
    sr, channels = synth.model_params(model)
    encodec_model = synth.load_model(model)
    encodec_model.set_target_bandwidth(kbps)
    wav = torch.from_numpy(synth.synth_audio(sr, channels, samples, seed=0))
    with torch.no_grad():
        frames = encodec_model.encode(wav[None])
    return [(None if s is None else s.item(), codes[0].numpy()) for codes, s in frames]


@pytest.mark.parametrize(("model", "kbps", "samples"), CASES)
def test_lm_codes_are_the_codes_encodec_encoded(engine, monkeypatch, model, kbps, samples):
    # 40-step index blocks: the decoder and LM state carry over blocks of a 24 kHz file.
    monkeypatch.setattr(Chunks, "chunk_steps", 40)
    monkeypatch.setattr(Chunks, "context_steps", 40)
    data = synth.make_ecdc(model, samples, kbps, lm=True)
    units = decode_units(parse_header(data, len(data)))
    lm = load_lm(MODELS[model])
    scanned = [(scale, codes) for _, scale, codes, _ in units.scan_lm(lm, MemorySource(data), 0, 0)]
    if model == "encodec_24khz":  # one frame, in blocks
        scanned = [(None, np.concatenate([codes for _, codes in scanned], axis=1))]
    expected = encoded_frames(model, samples, kbps)
    assert [scale for scale, _ in scanned] == [scale for scale, _ in expected]
    for (_, got), (_, codes) in zip(scanned, expected, strict=True):
        assert np.array_equal(got, codes)


def assert_cdfs_are_encodecs(probas: torch.Tensor) -> None:
    """``stable_quantized_cdfs`` equals encodec's CDF of each codebook of ``probas``."""
    fast = stable_quantized_cdfs(probas, RANGE_BITS)
    assert fast.shape == (probas.shape[2], probas.shape[1])
    for k in range(probas.shape[2]):
        cdf = build_stable_quantized_cdf(probas[0, :, k, 0], RANGE_BITS, check=False)
        assert np.array_equal(fast[k], cdf.numpy()), f"codebook {k}"


@pytest.mark.parametrize("model", ["encodec_48khz", "encodec_24khz"])
def test_stable_quantized_cdfs_are_encodecs_per_codebook(engine, model):
    lm = load_lm(MODELS[model])
    rng = np.random.default_rng(7)
    states, offset = None, 0
    previous = torch.zeros(1, lm.n_q, 1, dtype=torch.long)
    with torch.inference_mode():  # as decode_lm_steps runs it
        for _ in range(300):  # past the 24 kHz LM's 262-step attention window
            probas, states, offset = lm(previous, states, offset)
            assert_cdfs_are_encodecs(probas)
            previous = torch.from_numpy(rng.integers(1, lm.card + 1, (1, lm.n_q, 1)))
        for sharpness in (1.0, 30.0, 300.0):  # contiguous, and far peakier than the LM's
            logits = torch.from_numpy(rng.standard_normal((1, lm.card, lm.n_q, 1), np.float32))
            assert_cdfs_are_encodecs(torch.softmax(sharpness * logits, dim=1))


def outcome(pull, decoder: ArithmeticDecoder, cdf: np.ndarray) -> int | str:
    """A symbol, or "truncated" / "corrupt" for the ways a pull can fail."""
    try:
        symbol = pull(decoder, cdf)
    except RuntimeError as exc:  # encodec's "Binary search failed"
        assert "Binary search failed" in str(exc)
        return "corrupt"
    except ContainerError as exc:
        return "truncated" if "truncated" in str(exc) else "corrupt"
    return "truncated" if symbol is None else symbol


def state(decoder: ArithmeticDecoder) -> tuple[int, int, int, int]:
    return decoder.low, decoder.high, decoder.current, decoder.max_bit


def test_pull_symbol_is_encodecs_pull_on_any_bytes():
    rng = np.random.default_rng(3)
    pulls = 0
    for _ in range(20):
        payload = rng.bytes(int(rng.integers(0, 400)))
        ours, theirs = (ArithmeticDecoder(io.BytesIO(payload)) for _ in range(2))
        while True:
            logits = torch.from_numpy(rng.standard_normal(1024, np.float32))
            pdf = torch.softmax(float(rng.uniform(0.5, 8)) * logits, dim=0)
            cdf = build_stable_quantized_cdf(pdf, RANGE_BITS, check=False).numpy()
            expected = outcome(ArithmeticDecoder.pull, theirs, cdf)
            assert outcome(pull_symbol, ours, cdf) == expected
            if isinstance(expected, str):
                break
            assert state(ours) == state(theirs)
            assert ours.unpacker.fo.tell() == theirs.unpacker.fo.tell()
            pulls += 1
    assert pulls > 1000


def test_a_code_in_no_symbols_range_is_a_corrupt_payload_as_in_encodec():
    """With a range 1.5 x 2**24 wide, symbol 0 of this CDF ends at floor((2**23 - 1) * 1.5),
    symbol 1 starts at 2**23 * 1.5 and ends at floor((2**24 - 1) * 1.5), one below the top:
    the code between the two and the top code are no symbol's."""
    cdf = np.array([1 << 23, 1 << 24])
    high = 3 * (1 << 23) - 1
    gap = ((1 << 23) - 1) * 3 // 2 + 1

    def decoder_at(current: int) -> ArithmeticDecoder:
        decoder = ArithmeticDecoder(io.BytesIO(b""))  # wide enough: reads no bits
        decoder.low, decoder.high, decoder.current, decoder.max_bit = 0, high, current, 24
        return decoder

    cases = {0: 0, gap - 1: 0, gap: "corrupt", gap + 1: 1, high - 1: 1, high: "corrupt"}
    for current, expected in cases.items():
        ours, theirs = decoder_at(current), decoder_at(current)
        assert outcome(ArithmeticDecoder.pull, theirs, cdf) == expected
        assert outcome(pull_symbol, ours, cdf) == expected
        assert state(ours) == state(theirs)
