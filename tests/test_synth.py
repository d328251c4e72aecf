"""Sanity checks of the test fixtures themselves (tests/synth/, tests/conftest.py)."""

from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import pytest
import torch

import synth
from synth.container import plain_payload_bytes


def _payload_codes(v0: bytes) -> list[np.ndarray]:
    """Codes ``[nc, frames]`` per segment of a non-LM v0 file, parsed independently."""
    from encodec import binary

    fo = io.BytesIO(v0)
    meta = binary.read_ecdc_header(fo)
    sr, _ = synth.model_params(meta["m"])
    seg = sr if meta["m"] == "encodec_48khz" else meta["al"]
    stride = int(0.99 * seg) if meta["m"] == "encodec_48khz" else meta["al"]
    out = []
    for offset in range(0, meta["al"], stride):
        n = min(meta["al"] - offset, seg)
        if meta["m"] == "encodec_48khz":
            fo.read(4)
        unpacker = binary.BitUnpacker(10, fo)
        frames = -(-n // 320)
        codes = [[unpacker.pull() for _ in range(meta["nc"])] for _ in range(frames)]
        out.append(np.array(codes).T)
    assert fo.read() == b""
    return out


def test_torch_home_fixture(torch_home):
    assert os.environ["TORCH_HOME"] == str(torch_home)
    d = torch_home / "hub" / "checkpoints"
    for name in synth.CHECKPOINT_FILES:
        assert (d / name).stat().st_size > 1_000_000
    assert torch.hub.get_dir() == str(torch_home / "hub")


def test_checkpoints_load_with_upstream_loaders(torch_home):
    from encodec.model import EncodecModel

    for ctor, name, n_q in (
        (EncodecModel.encodec_model_48khz, "encodec_48khz", 16),
        (EncodecModel.encodec_model_24khz, "encodec_24khz", 32),
    ):
        model = ctor()  # pretrained=True: loads $TORCH_HOME/hub/checkpoints/<name>-<hash>.th
        assert model.name == name
        assert model.quantizer.n_q == n_q
        for layer in model.quantizer.vq.layers:
            assert bool(layer._codebook.inited)
            assert layer._codebook.embed.abs().sum() > 0
        lm = model.get_lm_model()
        assert lm.n_q == n_q


@pytest.mark.parametrize(
    "model,samples,kbps,nc",
    [
        ("encodec_48khz", 48000, 6, 4),
        ("encodec_48khz", 4800, 3, 2),
        ("encodec_48khz", 4800, 24, 16),
        ("encodec_24khz", 24000, 6, 8),
        ("encodec_24khz", 2400, 1.5, 2),
        ("encodec_24khz", 2400, 24, 32),
    ],
)
def test_make_ecdc_header_and_size(torch_home, model, samples, kbps, nc):
    data = synth.make_ecdc(model, samples, kbps)
    assert data == synth.make_ecdc(model, samples, kbps)
    version, meta, off = synth.parse_header(data)
    assert version == 0
    assert meta == {"m": model, "al": samples, "nc": nc, "lm": False}
    # What encodec wrote is what the tests' hand-built files (synth.zero_codes) size.
    assert len(data) - off == plain_payload_bytes(model, samples, nc)


@pytest.mark.parametrize("model", ["encodec_48khz", "encodec_24khz"])
def test_reference_pcm_sane(torch_home, model):
    sr, channels = synth.model_params(model)
    data = synth.make_ecdc(model, sr, 6)
    pcm = synth.reference_pcm(data)
    assert pcm.dtype == np.int16
    assert pcm.shape == (sr, channels)
    peak = int(np.abs(pcm.astype(np.int32)).max())
    assert peak > 0.03 * 32767
    assert np.mean(np.abs(pcm.astype(np.int32)) >= 32767) < 0.01  # not (all) clipped
    # Upstream decode, converted independently, matches.
    from encodec.compress import decompress

    wav, got_sr = decompress(data)
    assert got_sr == sr
    x = wav.numpy().astype(np.float32)
    assert np.array_equal(pcm, np.rint(np.clip(x, -1, 1) * np.float32(32767)).astype(np.int16).T)
    # Codes vary (random-init codebooks are initialised, not all zero).
    codes = np.concatenate(_payload_codes(data), axis=1)
    for k in range(codes.shape[0]):
        assert len(np.unique(codes[k])) > 10, (k, codes[k][:20])


def test_make_ecdc_is_deterministic_and_seeded(torch_home):
    a = synth.make_ecdc("encodec_48khz", 9600, 6, seed=1)
    b = synth.make_ecdc("encodec_48khz", 9600, 6, seed=2)
    assert a != b
    assert synth.encode_uncached("encodec_48khz", 9600, 6, False, 1) == a
    assert synth.make_ecdc("encodec_48khz", 9600, 6, seed=1) == a


def test_float_to_pcm16():
    x = np.array([0.0, 1.0, -1.0, 2.0, -2.0, 0.5 / 32767, 1.5 / 32767, -0.5 / 32767], np.float32)
    assert synth.float_to_pcm16(x).tolist() == [0, 32767, -32767, 32767, -32767, 0, 2, 0]


def test_v193_header(torch_home):
    v0 = synth.make_ecdc("encodec_48khz", 48000, 6)
    v193 = synth.to_v193(v0, 48000, name="Tëst", source="https://x/y", thumbnail="t.jpg")
    magic, version, size = struct.unpack("!4sBI", v193[:9])
    assert (magic, version) == (b"ECDC", 193)
    meta = json.loads(v193[9 : 9 + size].decode("utf-8"))
    assert meta == {
        "m": "encodec_48khz",
        "al": 48000,
        "nc": 4,
        "lm": False,
        "br": 6.0,
        "sr": 48000,
        "n": "Tëst",
        "s": "https://x/y",
        "t": "t.jpg",
    }
    _, _, off0 = synth.parse_header(v0)
    assert v193[9 + size :] == v0[off0:]
    assert synth.to_v0(v193) == v0
    v192 = synth.to_v193(v0, 48000, br=6, version=192)
    magic, version, size = struct.unpack("!4sBI", v192[:9])
    assert (magic, version) == (b"ECDC", 192)
    assert json.loads(v192[9 : 9 + size]) == {
        "m": "encodec_48khz",
        "al": 48000,
        "nc": 4,
        "lm": False,
        "br": 6,
        "sr": 48000,
    }
    assert np.array_equal(synth.reference_pcm(v193), synth.reference_pcm(v0))


def test_upstream_frame_length_bug_54240(torch_home):
    from encodec.compress import decompress

    data = synth.make_ecdc("encodec_48khz", 54240, 6)
    with pytest.raises(EOFError):
        decompress(data)  # encodec 0.1.1: ceil(6720 / 48000 * 150) == 22, not 21
    pcm = synth.reference_pcm(data)
    assert pcm.shape == (54240, 2)
    # The fixed decoder agrees with upstream where upstream works.
    ok = synth.make_ecdc("encodec_48khz", 54000, 6)
    wav, _ = decompress(ok)
    fixed, _ = synth.decompress_fixed(ok)
    assert torch.equal(wav, fixed)


@pytest.mark.parametrize("model", ["encodec_48khz", "encodec_24khz"])
def test_lm_roundtrip(torch_home, model):
    # The LM only changes the entropy coding: same codes, same audio as without LM.
    sr, _ = synth.model_params(model)
    samples = int(0.4 * sr)
    plain = synth.make_ecdc(model, samples, 6)
    coded = synth.make_ecdc(model, samples, 6, lm=True)
    assert synth.parse_header(coded)[1]["lm"] is True
    assert coded != plain
    assert np.array_equal(synth.reference_pcm(coded), synth.reference_pcm(plain))
