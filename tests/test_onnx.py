"""The default decoder, encodec's decoder on ONNX Runtime: close to encodec's decode,
deterministic, torch-free, its graph built from the checkpoint once, cached, and rebuilt
when the cache cannot serve it."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import helpers
import synth
from ecdcfs import graph_store, onnx_decoder
from ecdcfs.container import MODELS, EncodedFrame, read_header
from ecdcfs.decoder import overlap_add_weights
from ecdcfs.engine import Engine, Settings
from ecdcfs.graph import GRAPH_FORMAT, DecoderGraph, GraphUnusable
from ecdcfs.graph_store import GraphStore
from ecdcfs.interrupts import Interrupts
from ecdcfs.onnx_decoder import OnnxDecoder, pad_steps, snr_db
from ecdcfs.source import MemorySource, as_stream
from ecdcfs.torch_decoder import TorchDecoder
from ecdcfs.units import decode_units

BANDWIDTHS = {"encodec_48khz": (3, 6, 12, 24), "encodec_24khz": (1.5, 3, 6, 12, 24)}
# 48 kHz: frames of 1 s, the short frame before the last, the tail; 24 kHz: chunk lengths.
LENGTHS = {"encodec_48khz": (1, 2, 149, 150), "encodec_24khz": (1, 75, 375, 450)}
CASES = [(name, kbps) for name, rates in BANDWIDTHS.items() for kbps in rates]
LOGGER = "ecdcfs"


@pytest.fixture(scope="module")
def codecs(graph_cache) -> dict[str, tuple[TorchDecoder, OnnxDecoder]]:
    """Per model: (encodec's own decode, the ONNX Runtime decode from the cached graph)."""
    return {
        name: (TorchDecoder(spec, "cpu"), helpers.load_onnx_decoder(name, graph_cache))
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


def graph_of(cache: Path, name: str) -> Path:
    (path,) = (cache / "graphs").glob(f"{name}-*.npz")
    return path


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def forbid_building(monkeypatch) -> None:
    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(graph_store, "build_graph", no_build)


@pytest.mark.parametrize(("name", "kbps"), CASES)
def test_decode_is_within_2_lsb_and_95_db_of_encodec(codecs, name, kbps):
    exact, onnx = codecs[name]
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
        embedding = onnx_decoder.embedding(onnx.codebooks, codes)
        assert embedding.tobytes() == expected.numpy().tobytes()


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_padding_is_encodecs_pad1d_bit_for_bit(mode):
    import torch
    from encodec.modules.conv import pad1d

    rng = np.random.default_rng(3)
    for steps in range(1, 12):
        for padding in ((3, 3), (6, 0), (0, 2), (4, 1)):
            emb = rng.standard_normal((5, steps)).astype(np.float32)
            expected = pad1d(torch.from_numpy(emb)[None], padding, mode=mode)[0].numpy()
            assert pad_steps(emb, padding, mode).tobytes() == expected.tobytes()


def test_overlap_add_weights_are_encodecs_bit_for_bit_at_every_frame_length():
    import torch

    for length in [*range(320, 48_001, 320), 1, 2, 3, 47_520]:  # every frame length, and more
        t = torch.linspace(0, 1, length + 2, dtype=torch.float32)[1:-1]
        expected = (0.5 - (t - 0.5).abs()).numpy()  # encodec's _linear_overlap_add
        actual = overlap_add_weights(length)
        assert actual.dtype == np.float32 and actual.tobytes() == expected.tobytes(), length


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


def test_same_bytes_whatever_the_order_concurrency_or_session(codecs, graph_cache):
    _, onnx = codecs["encodec_48khz"]
    frames = [real_frame("encodec_48khz", kbps, steps) for kbps in (6, 24) for steps in (3, 150)]
    alone = [onnx.decode_frame(frame).audio.tobytes() for frame in frames]
    assert len(set(alone)) == len(frames)
    reversed_ = [d.audio.tobytes() for d in onnx.decode_frames(frames[::-1])][::-1]
    concurrent: dict[int, bytes] = {}

    def decode(i: int) -> None:
        for _ in range(2):
            concurrent[i] = onnx.decode_frame(frames[i]).audio.tobytes()

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(frames))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other = helpers.load_onnx_decoder("encodec_48khz", graph_cache)  # a remount
    elsewhere = [d.audio.tobytes() for d in other.decode_frames(frames)]
    assert alone == reversed_ == [concurrent[i] for i in range(len(frames))] == elsewhere
    # One thread a decode: decodes run side by side instead.
    threads_used = [d.session.get_session_options().intra_op_num_threads for d in (onnx, other)]
    assert threads_used == [onnx_decoder.THREADS] * 2


THREAD_SWEEP = {
    "encodec_48khz": [*range(1, 151, 7), 149, 150],
    "encodec_24khz": [*range(1, 451, 37), 449, 450],
}


@pytest.mark.parametrize("name", MODELS)
def test_same_bytes_whatever_the_intra_op_thread_count(graph_cache, name):
    """However ONNX Runtime splits a decode between threads, its samples stay the same."""
    decoders = [helpers.load_onnx_decoder(name, graph_cache, threads) for threads in (1, 2, 3, 4)]
    rng = np.random.default_rng(5)
    for steps in THREAD_SWEEP[name]:
        codes = rng.integers(0, 1024, (MODELS[name].max_codebooks, steps))
        one, *more = (decoder.decode_codes(codes) for decoder in decoders)
        for threads, audio in zip((2, 3, 4), more, strict=True):
            assert np.array_equal(audio, one), (steps, threads)


def test_an_interrupted_decode_raises_and_the_next_one_is_whole(codecs):
    _, onnx = codecs["encodec_48khz"]
    frame = real_frame("encodec_48khz", 6, 150)
    expected = onnx.decode_frame(frame).audio.tobytes()
    interrupts, thread = onnx.interrupts, threading.get_ident()
    interrupts.interrupt(thread)
    with pytest.raises(Exception, match="terminate"):
        onnx.decode_frame(frame)
    interrupts.clear(thread)
    assert onnx.decode_frame(frame).audio.tobytes() == expected


def test_second_engine_loads_the_cached_graph_without_building(default_cache, monkeypatch, caplog):
    path = graph_of(default_cache, "encodec_24khz")
    mtime = path.stat().st_mtime_ns
    forbid_building(monkeypatch)
    caplog.set_level(logging.INFO, logger=LOGGER)
    engine = Engine(Settings(device="cpu", cache_dir=default_cache))
    try:
        codec = engine.decoder(MODELS["encodec_24khz"])
    finally:
        engine.close()
    assert isinstance(codec, OnnxDecoder)
    assert f"loaded the decoder graph {path}" in caplog.messages
    assert path.stat().st_mtime_ns == mtime and not warnings_of(caplog)


def damage_truncate(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_garbage(path: Path, other: Path) -> None:
    path.write_bytes(b"\x00not a graph" * 100)


def damage_one_byte(path: Path, other: Path) -> None:
    """A bit flipped inside the graph's weights: the zip member's CRC-32 no longer holds."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


def damage_other_model(path: Path, other: Path) -> None:
    shutil.copyfile(other, path)  # a whole graph, but the other model's


def damage_other_checkpoint(path: Path, other: Path) -> None:
    graph = DecoderGraph.load(path)
    graph.checkpoint_sha = "0" * 64
    with open(path, "wb") as f:
        graph.save(f)


def damage_unrunnable(path: Path, other: Path) -> None:
    """Intact bytes, but not a graph ONNX Runtime can load."""
    graph = DecoderGraph.load(path)
    graph.graph = b"\x08\x01not onnx"
    with open(path, "wb") as f:
        graph.save(f)


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncate,
        damage_garbage,
        damage_one_byte,
        damage_other_model,
        damage_other_checkpoint,
        damage_unrunnable,
    ],
)
def test_unusable_cached_graph_is_rebuilt_with_one_warning(codecs, default_cache, damage, caplog):
    path, other = (graph_of(default_cache, name) for name in MODELS)
    good = DecoderGraph.load(path)
    data = path.read_bytes()
    path.unlink()  # a copy of its own: the session's graph behind the hard link stays intact
    path.write_bytes(data)
    damage(path, other)
    caplog.set_level(logging.INFO, logger=LOGGER)
    codec = helpers.load_onnx_decoder("encodec_48khz", default_cache)
    (warning,) = warnings_of(caplog)
    assert "unusable" in warning and "rebuilding" in warning
    rebuilt = DecoderGraph.load(path)
    assert rebuilt.checkpoint_sha == good.checkpoint_sha
    assert rebuilt.graph == good.graph  # built again, the same bytes
    assert rebuilt.codebooks.tobytes() == good.codebooks.tobytes()
    frame = real_frame("encodec_48khz", 6, 150)
    expected = codecs["encodec_48khz"][1].decode_frame(frame).audio
    assert codec.decode_frame(frame).audio.tobytes() == expected.tobytes()


def test_unwritable_cache_dir_keeps_the_graph_in_memory_for_the_engine(
    codecs, tmp_path, monkeypatch, caplog
):
    blocker = synth.write(tmp_path, "not-a-dir", b"")
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = GraphStore(blocker / "cache")
    spec = MODELS["encodec_24khz"]
    codec = store.load(spec, lambda g: OnnxDecoder(spec, g, Interrupts()))
    (warning,) = warnings_of(caplog)
    assert "keeping it in memory" in warning
    frame = real_frame("encodec_24khz", 6, 75)
    expected = codecs["encodec_24khz"][1].decode_frame(frame).audio
    assert codec.decode_frame(frame).audio.tobytes() == expected.tobytes()
    forbid_building(monkeypatch)  # a second load of the same engine reuses it
    again = store.load(spec, lambda g: OnnxDecoder(spec, g, Interrupts()))
    assert again.decode_frame(frame).audio.tobytes() == expected.tobytes()
    assert len(warnings_of(caplog)) == 1


def test_no_cache_dir_builds_the_same_graph_in_memory(codecs, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    codec = helpers.load_onnx_decoder("encodec_24khz", None)
    assert not warnings_of(caplog)
    assert any("stays in memory" in message for message in caplog.messages)
    frame = real_frame("encodec_24khz", 12, 375)
    cached = codecs["encodec_24khz"][1]
    assert codec.decode_frame(frame).audio.tobytes() == cached.decode_frame(frame).audio.tobytes()


def test_saving_a_graph_deletes_the_stale_ones_of_its_model(default_cache):
    current = graph_of(default_cache, "encodec_24khz")
    current.unlink()
    stale = [
        default_cache / "graphs" / "encodec_24khz-0123456789abcdef-g2-ort1.32.0.npz",
        current.with_name(current.name.replace(f"-g{GRAPH_FORMAT}", "")),
        current.with_name(current.name.replace(f"-g{GRAPH_FORMAT}", "-g1")),
    ]
    other_model = default_cache / "graphs" / "encodec_48khz-0123456789abcdef-g1.npz"
    for path in [*stale, other_model]:
        path.write_bytes(b"old")
    helpers.load_onnx_decoder("encodec_24khz", default_cache)
    assert current.exists() and other_model.exists()
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("failure", [GraphUnusable("no graph"), RuntimeError("a bug")])
def test_a_failed_build_decodes_with_torch_after_one_warning(
    codecs, tmp_path, monkeypatch, caplog, failure
):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(graph_store, "build_graph", fail)
    caplog.set_level(logging.INFO, logger=LOGGER)
    engine = Engine(Settings(device="cpu", cache_dir=tmp_path / "cache"))
    try:
        codec = engine.decoder(MODELS["encodec_24khz"])
    finally:
        engine.close()
    (warning,) = warnings_of(caplog)
    assert str(failure) in warning and "decoding with encodec's torch model" in warning
    frame = real_frame("encodec_24khz", 3, 75)
    exact = codecs["encodec_24khz"][0].decode_frame(frame).audio
    assert isinstance(codec, TorchDecoder)
    assert codec.decode_frame(frame).audio.tobytes() == exact.tobytes()


@pytest.mark.parametrize(
    ("name", "samples", "kbps", "lm"),
    [
        ("encodec_48khz", 2 * 47_520 + 100, 6, False),  # a 149-step frame, then a short one
        ("encodec_48khz", 30_000, 3, True),  # the LM stays on torch
        ("encodec_24khz", 24_000 * 11 + 123, 3, False),  # three chunks, the last short
        ("encodec_24khz", 24_000 * 6, 6, True),
    ],
)
def test_whole_file_is_within_2_lsb_and_the_same_whatever_the_threads(
    default_cache, tmp_path, name, samples, kbps, lm
):
    data = synth.make_ecdc(name, samples, kbps, lm=lm)
    path = synth.write(tmp_path, "x.ecdc", data)
    results = []
    for threads in (1, 2, 3):
        engine = Engine(Settings(device="cpu", cache_dir=default_cache, threads=threads))
        try:
            audio = engine.open(path)
            assert isinstance(engine.decoder(MODELS[name]), OnnxDecoder)
            reader = audio.reader()
            offsets = list(range(0, audio.size, 8192))
            np.random.default_rng(threads).shuffle(offsets)
            pieces = dict.fromkeys(offsets, b"")

            def read(part: list[int], reader=reader, pieces=pieces) -> None:
                pieces.update({offset: reader.read(offset, 8192) for offset in part})

            errors = helpers.run_in_threads(read, [(offsets[n::3],) for n in range(3)])
            assert not errors, errors[0]
            results.append(b"".join(pieces[o] for o in sorted(pieces)))
        finally:
            engine.close()
    assert results[0] == results[1] == results[2]
    expected = synth.reference_pcm(data)
    pcm = results[0][len(audio.wav.header) : audio.wav.pcm_end]
    pcm = np.frombuffer(pcm, "<i2").reshape(expected.shape)
    assert np.abs(pcm.astype(np.int32) - expected).max() <= 2


def test_a_process_decoding_files_with_cached_graphs_never_imports_torch(default_cache, tmp_path):
    """Plain files, and LM-coded ones (their LM runs in a child process)."""
    files = {
        "a.ecdc": synth.make_ecdc("encodec_48khz", 60_000, 6),
        "b.ecdc": synth.make_ecdc("encodec_24khz", 30_000, 3),
        "c.ecdc": synth.make_ecdc("encodec_48khz", 60_000, 6, lm=True),
        "d.ecdc": synth.make_ecdc("encodec_24khz", 30_000, 3, lm=True),
    }
    for name, data in files.items():
        synth.write(tmp_path, name, data)
    code = (
        "import sys; from pathlib import Path; from ecdcfs.engine import Engine, Settings\n"
        "engine = Engine(Settings(cache_dir=Path(sys.argv[1])))\n"
        "engine.warm_up()\n"
        "for name in sys.argv[2:]:\n"
        "    audio = engine.open(Path(name)); sys.stdout.buffer.write(audio.read(0, audio.size))\n"
        "assert 'torch' not in sys.modules and 'encodec' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(default_cache), *(str(tmp_path / n) for n in files)],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    engine = Engine(Settings(device="cpu", cache_dir=default_cache))
    try:
        expected = b"".join(
            (audio := engine.open(tmp_path / name)).read(0, audio.size) for name in files
        )
    finally:
        engine.close()
    assert done.stdout == expected  # and the same bytes as in this process


def test_exact_engines_decode_one_unit_at_a_time(torch_home):
    for settings, workers in ((Settings(exact=True, threads=4), 1), (Settings(threads=3), 3)):
        engine = Engine(settings)
        try:
            assert engine.scheduler.workers == workers
        finally:
            engine.close()


def test_loading_one_model_never_waits_for_another(default_cache, monkeypatch):
    """A model's graph loads under its own lock: while the 24 kHz graph is being built,
    the 48 kHz decoder loads (and decodes) at once."""
    (graph_of(default_cache, "encodec_24khz")).unlink()
    building, release = threading.Event(), threading.Event()
    real = graph_store.build_graph

    def slow_build(spec, state):
        building.set()
        assert release.wait(60)
        return real(spec, state)

    monkeypatch.setattr(graph_store, "build_graph", slow_build)
    engine = Engine(Settings(device="cpu", cache_dir=default_cache))
    try:
        other = threading.Thread(target=engine.decoder, args=(MODELS["encodec_24khz"],))
        other.start()
        assert building.wait(60)
        frame = real_frame("encodec_48khz", 6, 150)
        assert engine.decoder(MODELS["encodec_48khz"]).decode_frame(frame).audio.shape == (
            2,
            48_000,
        )
        assert other.is_alive()  # still building: the 48 kHz decode did not wait for it
        release.set()
        other.join(60)
        assert isinstance(engine.loaded_decoder(MODELS["encodec_24khz"]), OnnxDecoder)
    finally:
        release.set()
        engine.close()


# Every 48 kHz frame length, and 24 kHz lengths across the chunk grid with its edges.
SWEEP = {
    "encodec_48khz": range(1, 151),
    "encodec_24khz": sorted({*range(1, 451, 23), 74, 75, 76, 374, 375, 376, 449, 450}),
}


@pytest.mark.parametrize("name", MODELS)
def test_one_graph_decodes_every_length_to_its_hop_multiple(codecs, name):
    """The graph is traced at 8 steps: every other length must come out whole, and close
    to encodec (checked against it at every 10th length and the largest)."""
    exact, onnx = codecs[name]
    rng = np.random.default_rng(11)
    lengths = list(SWEEP[name])
    for i, steps in enumerate(lengths):
        frame = EncodedFrame(rng.integers(0, 1024, (2, steps)), None)
        audio = onnx.decode_frame(frame).audio
        assert audio.shape == (MODELS[name].channels, steps * 320), steps
        if i % 10 == 0 or steps == lengths[-1]:
            assert_close(exact.decode_frame(frame).audio, audio)
