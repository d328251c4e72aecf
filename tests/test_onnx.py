"""The ONNX Runtime decoder (``--backend onnx``): close to encodec's decode, deterministic,
its graph cached per checkpoint and rebuilt when the cache cannot serve it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import synth
from ecdcfs import onnx_decoder
from ecdcfs.audiofile import Engine, Settings
from ecdcfs.cli import UsageError, parse_args
from ecdcfs.codec import CHECKPOINTS, Codec
from ecdcfs.container import MODELS, EncodedFrame, read_header
from ecdcfs.onnx_decoder import OnnxDecoder, snr_db
from ecdcfs.settings import checkpoint_dir
from ecdcfs.source import MemorySource, as_stream
from ecdcfs.units import decode_units

BANDWIDTHS = {"encodec_48khz": (3, 6, 12, 24), "encodec_24khz": (1.5, 3, 6, 12, 24)}
# 48 kHz: frames of 1 s, the short frame before the last, the tail; 24 kHz: chunk lengths.
LENGTHS = {"encodec_48khz": (1, 2, 149, 150), "encodec_24khz": (1, 75, 375, 450)}
CASES = [(name, kbps) for name, rates in BANDWIDTHS.items() for kbps in rates]
LOGGER = "ecdcfs"


@pytest.fixture(scope="module")
def graphs(torch_home, tmp_path_factory) -> Path:
    """A cache dir holding both models' graphs (exported once for the module)."""
    cache = tmp_path_factory.mktemp("graphs")
    for name in MODELS:
        Codec(MODELS[name], "cpu", "onnx", cache)
    return cache


@pytest.fixture(scope="module")
def codecs(graphs) -> dict[str, tuple[Codec, Codec]]:
    """Per model: (encodec's own decode, the ONNX Runtime decode from the cached graph)."""
    return {
        name: (Codec(spec, "cpu"), Codec(spec, "cpu", "onnx", graphs))
        for name, spec in MODELS.items()
    }


def real_frame(name: str, kbps: float, steps: int) -> EncodedFrame:
    """The first ``steps`` code steps (and scale) of a file of synthetic audio."""
    samples = 48_000 if name == "encodec_48khz" else 450 * 320
    source = MemorySource(synth.make_ecdc(name, samples, kbps))
    header = read_header(as_stream(source, block=1), source.size)
    codes = decode_units(header).code_source(source, None)
    if header.model.segment is None:
        return EncodedFrame(codes.steps(0, steps).astype(np.int64), None)
    frame = codes.frame(0)
    return EncodedFrame(frame.codes[:, :steps].astype(np.int64), frame.scale)


def assert_close(expected: np.ndarray, actual: np.ndarray) -> None:
    """Same shape, within 2 LSB as 16-bit PCM and at least 95 dB SNR."""
    assert actual.shape == expected.shape
    lsb = np.abs(synth.float_to_pcm16(actual).astype(np.int32) - synth.float_to_pcm16(expected))
    assert lsb.max() <= 2
    assert snr_db(expected, actual) >= 95


def graph_files(cache: Path) -> list[Path]:
    return sorted((cache / "graphs").glob("*.onnx"))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("name", "kbps"), CASES)
def test_decode_is_within_2_lsb_and_95_db_of_encodec(codecs, name, kbps):
    exact, onnx = codecs[name]
    assert onnx.onnx is not None
    for steps in LENGTHS[name]:
        frame = real_frame(name, kbps, steps)
        assert frame.codes.shape == (frame.codes.shape[0], steps)
        assert_close(exact.decode_frame(frame).audio, onnx.decode_frame(frame).audio)


@pytest.mark.parametrize("name", MODELS)
def test_embedding_is_the_quantizers_decode_bit_for_bit(codecs, name):
    import torch

    exact, onnx = codecs[name]
    for num_codebooks in (2, MODELS[name].max_codebooks):
        codes = np.random.default_rng(num_codebooks).integers(0, 1024, (num_codebooks, 150))
        with torch.no_grad():
            expected = exact.model.quantizer.decode(torch.from_numpy(codes)[:, None])[0]
        assert onnx.onnx.embedding(codes).tobytes() == expected.numpy().tobytes()


@pytest.mark.parametrize("name", MODELS)
def test_every_short_length_decodes_to_its_hop_multiple(codecs, name):
    """1 to 8 steps take the first padding's zero-extension branch (outside the graph)."""
    exact, onnx = codecs[name]
    rng = np.random.default_rng(7)
    scale = 0.1 if name == "encodec_48khz" else None
    for steps in range(1, 9):
        frame = EncodedFrame(rng.integers(0, 1024, (MODELS[name].max_codebooks, steps)), scale)
        audio = onnx.decode_frame(frame).audio
        assert audio.shape == (MODELS[name].channels, steps * 320)
        assert_close(exact.decode_frame(frame).audio, audio)


def test_same_bytes_whatever_the_order_batch_or_session(codecs, graphs):
    _, onnx = codecs["encodec_48khz"]
    frames = [real_frame("encodec_48khz", 6, 150), real_frame("encodec_48khz", 24, 150)]
    alone = [onnx.decode_frame(frame).audio.tobytes() for frame in frames]
    assert alone[0] != alone[1]
    together = [d.audio.tobytes() for d in onnx.decode_frames(frames)]
    reversed_ = [d.audio.tobytes() for d in onnx.decode_frames(frames[::-1])][::-1]
    again = [onnx.decode_frame(frame).audio.tobytes() for frame in frames]
    checkpoint = checkpoint_dir() / CHECKPOINTS["encodec_48khz"]
    other = OnnxDecoder(onnx.model, "encodec_48khz", checkpoint, graphs)  # another mount's
    elsewhere = [d.audio.tobytes() for d in other.decode_frames(frames)]
    assert alone == together == reversed_ == again == elsewhere
    # The thread count changes some frames' samples: it is fixed.
    threads = [d.session.get_session_options().intra_op_num_threads for d in (onnx.onnx, other)]
    assert threads == [onnx_decoder.THREADS] * 2


def test_second_engine_loads_the_cached_graph_without_exporting(
    graphs, tmp_path, monkeypatch, caplog
):
    shutil.copytree(graphs / "graphs", tmp_path / "graphs")
    (path,) = [p for p in graph_files(tmp_path) if p.name.startswith("encodec_24khz-")]
    mtime = path.stat().st_mtime_ns

    def no_export(decoder):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_decoder, "export_graph", no_export)
    caplog.set_level(logging.INFO, logger=LOGGER)
    engine = Engine(Settings(device="cpu", cache_dir=tmp_path, backend="onnx"))
    try:
        codec = engine.codec(MODELS["encodec_24khz"])
    finally:
        engine.close()
    assert codec.onnx is not None and codec.onnx.path == path
    assert f"loaded the ONNX decoder graph {path}" in caplog.messages
    assert path.stat().st_mtime_ns == mtime and not warnings_of(caplog)


def damage_truncate(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_garbage(path: Path, other: Path) -> None:
    path.write_bytes(b"\x00not a graph" * 100)


def damage_other_model(path: Path, other: Path) -> None:
    shutil.copyfile(other, path)  # loads fine, decodes something else


@pytest.mark.parametrize("damage", [damage_truncate, damage_garbage, damage_other_model])
def test_unusable_cached_graph_is_rebuilt_with_one_warning(
    codecs, graphs, tmp_path, damage, caplog
):
    shutil.copytree(graphs / "graphs", tmp_path / "graphs")
    (path,), (other,) = (
        [p for p in graph_files(tmp_path) if p.name.startswith(f"{name}-")]
        for name in ("encodec_48khz", "encodec_24khz")
    )
    good = path.read_bytes()
    damage(path, other)
    caplog.set_level(logging.INFO, logger=LOGGER)
    codec = Codec(MODELS["encodec_48khz"], "cpu", "onnx", tmp_path)
    (warning,) = warnings_of(caplog)
    assert "unusable" in warning and "rebuilding" in warning
    assert path.read_bytes() == good  # the same export, saved again
    frame = real_frame("encodec_48khz", 6, 150)
    assert codec.decode_frame(frame).audio.tobytes() == (
        codecs["encodec_48khz"][1].decode_frame(frame).audio.tobytes()
    )


def test_unwritable_cache_dir_keeps_the_graph_in_memory(codecs, tmp_path, caplog):
    blocker = synth.write(tmp_path, "not-a-dir", b"")
    caplog.set_level(logging.INFO, logger=LOGGER)
    codec = Codec(MODELS["encodec_24khz"], "cpu", "onnx", blocker / "cache")
    (warning,) = warnings_of(caplog)
    assert "keeping it in memory" in warning
    frame = real_frame("encodec_24khz", 6, 75)
    assert codec.onnx is not None
    assert_close(
        codecs["encodec_24khz"][0].decode_frame(frame).audio, codec.decode_frame(frame).audio
    )


def test_no_cache_dir_exports_the_same_graph_in_memory(codecs, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    codec = Codec(MODELS["encodec_24khz"], "cpu", "onnx", None)
    assert not warnings_of(caplog)
    assert any("stays in memory" in message for message in caplog.messages)
    frame = real_frame("encodec_24khz", 12, 375)
    cached = codecs["encodec_24khz"][1]
    assert codec.decode_frame(frame).audio.tobytes() == cached.decode_frame(frame).audio.tobytes()


def test_saving_a_graph_deletes_the_stale_ones_of_its_model(graphs, tmp_path):
    shutil.copytree(graphs / "graphs", tmp_path / "graphs")
    (current,) = [p for p in graph_files(tmp_path) if p.name.startswith("encodec_24khz-")]
    current.unlink()
    stale = tmp_path / "graphs" / "encodec_24khz-0123456789abcdef-ort0.0.onnx"
    other_model = tmp_path / "graphs" / "encodec_48khz-0123456789abcdef-ort0.0.onnx"
    stale.write_bytes(b"old")
    other_model.write_bytes(b"old")
    Codec(MODELS["encodec_24khz"], "cpu", "onnx", tmp_path)
    assert current.exists() and not stale.exists() and other_model.exists()


def test_failed_export_decodes_with_torch_after_one_warning(codecs, monkeypatch, caplog):
    def broken(decoder):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(onnx_decoder, "export_graph", broken)
    caplog.set_level(logging.INFO, logger=LOGGER)
    codec = Codec(MODELS["encodec_24khz"], "cpu", "onnx", None)
    (warning,) = warnings_of(caplog)
    assert "exporter broke" in warning and "decoding with torch" in warning
    frame = real_frame("encodec_24khz", 3, 75)
    exact = codecs["encodec_24khz"][0].decode_frame(frame).audio
    assert codec.onnx is None and codec.decode_frame(frame).audio.tobytes() == exact.tobytes()


@pytest.mark.parametrize(
    ("name", "samples", "kbps", "lm"),
    [
        ("encodec_48khz", 2 * 47_520 + 100, 6, False),  # a 149-step frame, then a short one
        ("encodec_48khz", 30_000, 3, True),  # the LM stays on torch
        ("encodec_24khz", 24_000 * 11 + 123, 3, False),  # three chunks, the last short
    ],
)
def test_whole_file_through_audiofile_is_within_2_lsb(graphs, tmp_path, name, samples, kbps, lm):
    data = synth.make_ecdc(name, samples, kbps, lm=lm)
    engine = Engine(Settings(device="cpu", cache_dir=graphs, backend="onnx"))
    try:
        audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
        raw = audio.read(0, audio.size)
        assert engine.codec(MODELS[name]).onnx is not None
    finally:
        engine.close()
    expected = synth.reference_pcm(data)
    pcm = np.frombuffer(raw[len(audio.wav.header) :], "<i2").reshape(expected.shape)
    assert np.abs(pcm.astype(np.int32) - expected).max() <= 2


def test_onnx_backend_decodes_on_the_cpu_whatever_the_device(graphs, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    engine = Engine(Settings(device="cuda", cache_dir=graphs, backend="onnx"))
    try:
        codec = engine.codec(MODELS["encodec_24khz"])
    finally:
        engine.close()
    assert codec.device == "cpu" and codec.onnx is not None and codec.batch_size == 1
    (warning,) = warnings_of(caplog)
    assert "device cuda is not used" in warning


def test_backend_option_long_and_o_forms():
    assert parse_args(["a", "b"]).backend == "torch"
    assert parse_args(["a", "b", "--backend", "onnx"]).backend == "onnx"
    assert parse_args(["a", "b", "-o", "backend=onnx"]).backend == "onnx"
    with pytest.raises(UsageError, match="backend"):
        parse_args(["a", "b", "-o", "backend=tensorrt"])
