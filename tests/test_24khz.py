"""24 kHz files: chunked decoding equals encodec's whole-file decode, in bounded memory."""

from __future__ import annotations

import json
import random
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import synth
from ecdcfs.audiofile import Engine, Settings
from ecdcfs.causal import CHUNK_STEPS, CONTEXT_STEPS, ChunkGrid, packed_steps
from ecdcfs.container import MODELS, EcdcError, FrameLayout, unpack_codes

READ = 128 * 1024
SR = 24_000
HOP = 320
CHUNK = CHUNK_STEPS * HOP  # samples per chunk
ONE_MINUTE = 60 * SR


def read_all(reader, size: int = READ) -> bytes:
    out = bytearray()
    while chunk := reader.read(len(out), size):
        out += chunk
    return bytes(out)


def pcm_of(wav: bytes) -> np.ndarray:
    return np.frombuffer(wav[44:], "<i2").astype(np.int32)


def assert_within_one_lsb(wav: bytes, data: bytes) -> None:
    expected = synth.reference_pcm(data)[:, 0].astype(np.int32)
    actual = pcm_of(wav)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1
    assert expected.std() > 100  # not silence


def container(samples: int, nc: int, payload: bytes, lm: bool = False) -> bytes:
    meta = json.dumps({"m": "encodec_24khz", "al": samples, "nc": nc, "lm": lm}).encode()
    return struct.pack("!4sBI", b"ECDC", 0, len(meta)) + meta + payload


def random_packed(samples: int, nc: int, seed: int = 0) -> bytes:
    """Bit-packed random codes for a 24 kHz file of ``samples`` (no encoder needed)."""
    steps = -(-samples // HOP)
    codes = np.random.default_rng(seed).integers(0, 1024, steps * nc, dtype=np.uint16)
    bits = ((codes[:, None] >> np.arange(10, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


# --- the grid and the codes of a step range (no model) ----------------------------------


def test_grid_covers_samples_with_chunks():
    grid = ChunkGrid(steps=2 * CHUNK_STEPS + 3, hop=HOP)
    assert grid.count == 3
    assert grid.span(0) == (0, 0, CHUNK_STEPS)
    assert grid.span(1) == (CHUNK_STEPS - CONTEXT_STEPS, CHUNK_STEPS, 2 * CHUNK_STEPS)
    assert grid.span(2) == (2 * CHUNK_STEPS - CONTEXT_STEPS, 2 * CHUNK_STEPS, grid.steps)
    assert grid.covering(0, 1) == range(1)
    assert grid.covering(CHUNK - 1, CHUNK + 1) == range(2)
    assert grid.covering(CHUNK, 2 * CHUNK) == range(1, 2)
    assert grid.covering(0, 10**9) == range(3)
    assert grid.covering(5, 5) == range(0)
    assert ChunkGrid(steps=0, hop=HOP).covering(0, 1) == range(0)


@pytest.mark.parametrize("nc", [1, 2, 3, 8, 32])
def test_step_ranges_unpack_like_the_whole_frame(nc):
    steps = 101
    payload = random_packed(steps * HOP, nc, seed=nc)
    whole = unpack_codes(payload, nc, steps, 10)
    rng = random.Random(nc)
    for _ in range(50):
        start = rng.randrange(steps)
        stop = rng.randrange(start + 1, steps + 1)
        read = lambda offset, size: payload[offset : offset + size]  # noqa: E731
        assert np.array_equal(packed_steps(read, nc, 10, start, stop), whole[:, start:stop])


# --- exactness against encodec.decompress ------------------------------------------------

CASES = [
    # (samples, kbps, lm)
    (700, 6, False),  # three code steps: encodec's left-edge padding sees the future
    (CHUNK + 321, 24, False),  # a chunk, then a two-step chunk (its warm-up is longer)
    (ONE_MINUTE, 1.5, False),  # six chunks
    (30_007, 24, True),  # LM-coded, one chunk
    (CHUNK + 20_000, 1.5, True),  # LM-coded, two chunks
]


@pytest.fixture(scope="module")
def sequential_wavs():
    return {}  # (samples, kbps, lm) -> bytes of a sequential read, shared with later tests


@pytest.mark.parametrize(("samples", "kbps", "lm"), CASES)
def test_sequential_read_within_one_lsb_of_encodec(
    engine, tmp_path, sequential_wavs, samples, kbps, lm
):
    data = synth.make_ecdc(model="encodec_24khz", samples=samples, kbps=kbps, lm=lm, seed=3)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    wav = read_all(audio.reader())
    assert len(wav) == audio.size == 44 + 2 * samples
    assert_within_one_lsb(wav, data)
    if samples <= CHUNK:  # one chunk is encodec's own whole-file decode
        assert np.array_equal(pcm_of(wav), synth.reference_pcm(data)[:, 0])
    assert engine.scheduler.decoded_count == -(-samples // CHUNK)
    sequential_wavs[samples, kbps, lm] = wav


def test_random_and_concurrent_reads_equal_a_sequential_read(torch_home, tmp_path, sequential_wavs):
    key = (ONE_MINUTE, 1.5, False)
    data = synth.make_ecdc(model="encodec_24khz", samples=key[0], kbps=key[1], seed=3)
    path = synth.write(tmp_path, "x.ecdc", data)
    expected = sequential_wavs.get(key)
    if expected is None:  # run on its own
        first = Engine(Settings(device="cpu", cache_dir=None))
        expected = read_all(first.open(path).reader())
        first.close()
    engine = Engine(Settings(device="cpu", cache_dir=None))  # nothing decoded yet
    try:
        audio = engine.open(path)
        # The last chunk first, then reads from several threads in random order, each on a
        # handle of its own, of every size, some straddling the seams between chunks.
        assert audio.read(audio.size - 1000, 5000) == expected[-1000:]
        rng = random.Random(7)
        spans = [(44 + 2 * k * CHUNK - 10, 20) for k in range(1, 6)]
        for _ in range(24):
            spans.append((rng.randrange(audio.size), rng.choice([1, 3, 4096, READ, 3 * CHUNK])))
        rng.shuffle(spans)
        errors: list[BaseException] = []

        def worker(part):
            try:
                reader = audio.reader()
                for offset, size in part:
                    assert reader.read(offset, size) == expected[offset : offset + size]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(spans[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        # A chunk decoded again (as after an eviction) gives the same bytes.
        assert np.array_equal(audio._decode_chunk(3).audio, audio.frame(3).result().audio)
    finally:
        engine.close()


# --- long files ---------------------------------------------------------------------------


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def test_one_hour_file_seeks_in_bounded_memory_and_time(engine, tmp_path):
    samples, nc = 3600 * SR + 123, 2
    path = synth.write(tmp_path, "hour.ecdc", container(samples, nc, random_packed(samples, nc)))
    audio = engine.open(path)
    assert audio.size == 44 + 2 * samples
    codec = engine.codec(MODELS["encodec_24khz"])
    codes = np.random.default_rng(1).integers(0, 1024, (nc, CHUNK_STEPS), dtype=np.int64)
    codec.decode_frame(codes[:, :10], None)  # warm the model
    started = time.perf_counter()
    codec.decode_frame(codes, None)  # baseline: a chunk of codes (5 s) with a warm model
    baseline = time.perf_counter() - started

    measured = _reset_peak_rss()
    rss_before = _kib("VmRSS")
    offset = 44 + 2 * 45 * 60 * SR
    started = time.perf_counter()
    data = audio.reader().read(offset, 2 * SR)
    elapsed = time.perf_counter() - started
    assert len(data) == 2 * SR
    assert pcm_of(b"\0" * 44 + data).std() > 0
    # One chunk with its warm-up: about 1.2x the baseline (generous: shared CPUs are noisy).
    assert engine.scheduler.decoded_count == 1
    assert elapsed < 6 * baseline + 1, (elapsed, baseline)
    if measured:
        growth_mb = (_kib("VmHWM") - rss_before) / 1024
        assert growth_mb < 400, growth_mb
    # The same bytes as when the chunk is reached from its neighbour.
    assert audio.read(offset - 10, 20)[10:] == data[:10]


def test_long_lm_24khz_file_is_refused_at_open(engine, tmp_path):
    samples = 61 * SR
    with pytest.raises(EcdcError, match="LM-coded encodec_24khz files longer than 60 s"):
        engine.open(synth.write(tmp_path, "long.ecdc", container(samples, 2, bytes(1000), lm=True)))
    plain = FrameLayout(MODELS["encodec_24khz"], samples, 2).plain_payload_bytes()
    assert engine.open(synth.write(tmp_path, "plain.ecdc", container(samples, 2, bytes(plain))))
