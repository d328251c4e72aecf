"""``ecdc-stream -e``: encoding PCM or a WAV file from stdin, equal to encodec.compress; the
bitrate table."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import numpy as np
import pytest
import soxr
import torch
from encodec.compress import compress, decompress

import synth
from ecdcfs.encode import int16_to_float, parse_bitrate, plan_bitrate
from helpers import (
    SONG_TAGS,
    TerminalText,
    ecdc_stream,
    error_line,
    stream_run,
)

RATE = 48_000
_, SOURCE, THUMB = SONG_TAGS


def input_pcm(samples: int, seed: int = 7) -> np.ndarray:
    """int16 ``[2, samples]`` test input at 48 kHz, with one -32768 in it."""
    x = synth.synth_audio(RATE, 2, samples, seed=seed, amplitude=0.5)
    pcm = np.rint(np.clip(x, -1, 1) * 32767).astype(np.int16)
    pcm[1, samples // 3] = -32768
    return pcm


def read_ecdc(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    version, meta, offset = synth.parse_header(data)
    return version, meta, data[offset:]


def reference_encode(model_name: str, kbps: float, wav: torch.Tensor) -> bytes:
    model = synth.load_model(model_name)
    model.set_target_bandwidth(kbps)
    return compress(model, wav, use_lm=False)


def test_encode_equals_encodec_compress(tmp_path):
    """PCM through the console script's stdin: the payload is compress()'s, byte for byte,
    for int16 / 32767 (even with a -32768 in the input); decoding it gives encodec's decode."""
    pcm = input_pcm(60_000)  # two frames, the second 12,480 samples
    out = tmp_path / "e.ecdc"
    name = base64.b64encode('Ünïcode, "quoted" / long'.encode()).decode().rstrip("=")
    rc, stdout, err = ecdc_stream(
        "-b", "6k", "-n", " " + name, "-s", SOURCE, "-t", THUMB, "-e", str(out),
        input=pcm.T.tobytes(),
    )  # fmt: skip
    assert (rc, stdout, err) == (0, b"", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ecdc"]  # no temp files left
    version, meta, payload = read_ecdc(out)
    assert version == 0
    assert meta == {
        "m": "encodec_48khz",
        "al": 60_000,
        "nc": 4,
        "lm": False,
        "br": 6,
        "sr": 48_000,
        "n": 'Ünïcode, "quoted" / long',
        "s": SOURCE,
        "t": THUMB,
    }
    reference = reference_encode("encodec_48khz", 6, int16_to_float(pcm))
    assert payload == reference[synth.parse_header(reference)[2] :]
    expected = synth.reference_pcm(reference)
    rc, decoded, err = stream_run("-d", str(out))
    assert decoded == expected.astype("<i2").tobytes()
    wav, _ = decompress(out.read_bytes())  # upstream reads the version-0 header
    assert np.array_equal(synth.float_to_pcm16(wav.numpy()).T, expected)


def wav_file(pcm: np.ndarray, rate: int, streamed: bool = False, bits: int = 16) -> bytes:
    """A RIFF/WAVE file of int16 ``pcm`` ``[channels, samples]`` (``bits`` claimed), with
    a LIST chunk after its data; ``streamed``: sizes of 0xFFFFFFFF and nothing after the
    data, as ffmpeg writes to a pipe."""
    data = pcm.T.astype("<i2").tobytes()
    channels = pcm.shape[0]
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, bits)
    size = 0xFFFFFFFF if streamed else len(data)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    body += b"data" + struct.pack("<I", size) + data
    if not streamed:  # a pipe's WAV ends with its data
        body += b"LIST" + struct.pack("<I", 4) + b"INFO"
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF if streamed else len(body)) + body


@pytest.mark.parametrize("streamed", [False, True])
def test_encode_reads_a_wav_file_on_stdin_as_its_pcm(tmp_path, torch_home, streamed):
    """What `ecdc-stream -e out.ecdc < song.wav` asks for: the header is read, not encoded
    as audio, and nothing after the data chunk is (its size, where it has one)."""
    pcm = input_pcm(30_000)
    raw, wav = tmp_path / "raw.ecdc", tmp_path / "wav.ecdc"
    assert stream_run("-b", "6", "-e", str(raw), stdin=pcm.T.tobytes())[0] == 0
    rc, _, err = stream_run("-b", "6", "-e", str(wav), stdin=wav_file(pcm, RATE, streamed))
    assert (rc, err) == (0, "")
    assert read_ecdc(wav) == read_ecdc(raw)  # al 30,000: the header was not audio


def test_encode_takes_a_mono_wav_at_another_rate(tmp_path, torch_home):
    """Its rate is resampled to the model's; mono goes to both channels, as the same
    audio in a stereo WAV would."""
    mono = input_pcm(44_100)[:1]  # 1 s at 44.1 kHz
    outs = [tmp_path / "mono.ecdc", tmp_path / "stereo.ecdc"]
    for out, pcm in zip(outs, (mono, np.repeat(mono, 2, axis=0)), strict=True):
        rc, _, err = stream_run("-b", "6", "-e", str(out), stdin=wav_file(pcm, 44_100))
        assert (rc, err) == (0, "")
    _, meta, payload = read_ecdc(outs[0])
    assert (meta["m"], meta["sr"]) == ("encodec_48khz", 48_000)
    assert abs(meta["al"] - 48_000) <= 1  # resampled to the model's rate
    assert (meta, payload) == read_ecdc(outs[1])[1:]


def test_encode_reads_a_wave_format_extensible_header(tmp_path, torch_home):
    """WAVE_FORMAT_EXTENSIBLE with the PCM subformat, as some tools write 16-bit PCM."""
    pcm = input_pcm(9_600)
    plain = wav_file(pcm, RATE)
    fmt_at = plain.index(b"fmt ")
    extra = struct.pack("<HHI", 22, 16, 3) + b"\1\0\0\0\0\0\x10\0\x80\0\0\xaa\0\x38\x9b\x71"
    body = struct.pack("<HHIIHH", 0xFFFE, 2, RATE, RATE * 4, 4, 16) + extra
    extensible = plain[:fmt_at] + b"fmt " + struct.pack("<I", len(body)) + body
    extensible += plain[fmt_at + 8 + 16 :]
    extensible = b"RIFF" + struct.pack("<I", len(extensible) - 8) + extensible[8:]
    raw, out = tmp_path / "raw.ecdc", tmp_path / "ext.ecdc"
    assert stream_run("-b", "6", "-e", str(raw), stdin=pcm.T.tobytes())[0] == 0
    assert stream_run("-b", "6", "-e", str(out), stdin=extensible)[:3:2] == (0, "")
    assert read_ecdc(out) == read_ecdc(raw)


@pytest.mark.parametrize("bits", [24, 8])
def test_encode_refuses_a_wav_it_cannot_read_in_one_line(tmp_path, torch_home, bits):
    out = tmp_path / "e.ecdc"
    rc, _, err = stream_run("-e", str(out), stdin=wav_file(input_pcm(4_800), RATE, bits=bits))
    assert rc == 1
    (line,) = err.splitlines()
    assert f"{bits}-bit" in line and "-e takes 16-bit PCM of 1 or 2 channels" in line
    assert not out.exists()


@pytest.mark.parametrize(("kbps", "rate", "version"), [("1.5", 24_000, 0), ("2", 32_000, 193)])
def test_encode_24khz_model(tmp_path, torch_home, kbps, rate, version):
    """Below 3 kbps: mono, resampled (streaming soxr) to sr, the 24 kHz model at 1.5 kbps."""
    pcm = input_pcm(RATE // 2)
    out = tmp_path / "e.ecdc"
    stderr = TerminalText()  # a terminal: progress is shown
    rc, _, err = stream_run(
        "-b", kbps, "-e", str(out), stdin=pcm.T.tobytes() + b"\1\2\3", stderr=stderr
    )
    assert rc == 0
    assert "ignoring 3 trailing bytes" in err and " s [" in err  # warning, tqdm
    version_read, meta, payload = read_ecdc(out)
    assert version_read == version
    assert (meta["m"], meta["sr"], meta["br"], meta["nc"]) == (
        "encodec_24khz",
        rate,
        float(kbps),
        2,
    )
    mono = int16_to_float(pcm).mean(dim=0, keepdim=True)
    wav = torch.from_numpy(soxr.resample(mono.T.numpy(), RATE, rate).T.copy())
    assert meta["al"] == wav.shape[-1] == rate // 2
    reference = reference_encode("encodec_24khz", 1.5, wav)
    assert payload == reference[synth.parse_header(reference)[2] :]
    rc, decoded, err = stream_run("-d", str(out))
    assert (rc, err) == (0, "")
    assert len(decoded) == RATE // 2 * 4  # back at 48 kHz, as long as the input


def test_encode_at_a_scaled_rate(tmp_path, torch_home):
    """9 kbps: 6 kbps of the 48 kHz model over audio resampled to 72 kHz (version 193)."""
    pcm = input_pcm(RATE // 2)
    out = tmp_path / "e.ecdc"
    rc, _, err = stream_run("-b", "9", "-e", str(out), stdin=pcm.T.tobytes())
    assert (rc, err) == (0, "")
    version, meta, payload = read_ecdc(out)
    assert version == 193
    assert (meta["m"], meta["sr"], meta["br"], meta["nc"], meta["al"]) == (
        "encodec_48khz", 72_000, 9, 4, 36_000
    )  # fmt: skip
    wav = torch.from_numpy(soxr.resample(int16_to_float(pcm).T.numpy(), RATE, 72_000).T.copy())
    reference = reference_encode("encodec_48khz", 6, wav)
    assert payload == reference[synth.parse_header(reference)[2] :]
    rc, decoded, err = stream_run("-d", str(out))
    assert len(decoded) == (RATE // 2) * 4


def test_encode_failure_leaves_nothing(tmp_path, torch_home):
    out = tmp_path / "e.ecdc"
    out.write_bytes(b"old")
    rc, _, err = stream_run("-b", "1.5", "-e", str(out), stdin=b"")
    assert rc == 1 and "no audio" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ecdc"]
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize(
    ("text", "model", "bandwidth", "rate", "stored"),
    [
        ("24", "encodec_48khz", 24, 48_000, 24),
        ("6", "encodec_48khz", 6, 48_000, 6),
        ("6k", "encodec_48khz", 6, 48_000, 6),
        ("3", "encodec_48khz", 3, 48_000, 3),
        ("12K", "encodec_48khz", 12, 48_000, 12),
        ("4", "encodec_48khz", 3, 64_000, 4),
        ("9", "encodec_48khz", 6, 72_000, 9),
        ("48", "encodec_48khz", 24, 96_000, 48),
        ("192", "encodec_48khz", 24, 384_000, 192),
        ("2.9", "encodec_24khz", 1.5, 46_400, 2.9),
        ("2", "encodec_24khz", 1.5, 32_000, 2),
        ("1.5", "encodec_24khz", 1.5, 24_000, 1.5),
        ("1", "encodec_24khz", 1.5, 16_000, 1),
        ("0.25", "encodec_24khz", 1.5, 4_000, 0.25),
    ],
)
def test_bitrate_mapping(text, model, bandwidth, rate, stored):
    kbps = parse_bitrate(text)
    assert kbps == stored and type(kbps) is type(stored)
    plan = plan_bitrate(kbps)
    assert (plan.model.name, plan.bandwidth, plan.sample_rate) == (model, bandwidth, rate)
    assert plan.version == (0 if rate == plan.model.sample_rate else 193)
