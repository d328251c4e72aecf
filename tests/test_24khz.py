"""24 kHz files: chunked decoding equals encodec's whole-file decode, in bounded memory."""

from __future__ import annotations

import io
import os
import random
import struct
import threading
import time

import numpy as np
import pytest

import helpers
import synth
from ecdcfs.cache_dir import INDEX_SUFFIX
from ecdcfs.causal import CHUNK_STEPS, CONTEXT_STEPS, ChunkGrid, packed_steps
from ecdcfs.container import MODELS, EcdcError, EncodedFrame, unpack_codes
from ecdcfs.engine import Engine, Settings
from ecdcfs.index import CodeIndex
from ecdcfs.lm import decode_lm_steps, load_lm
from ecdcfs.lm_process import LanguageModel
from ecdcfs.units import Chunks
from helpers import READ, read_all
from mounting import wav_size

SR = 24_000
HOP = 320
CHUNK = CHUNK_STEPS * HOP  # samples per chunk
ONE_MINUTE = 60 * SR


def pcm_of(wav: bytes) -> np.ndarray:
    start = wav.index(b"data") + 8  # no tags: nothing else says "data"
    data_bytes = struct.unpack_from("<I", wav, start - 4)[0]
    return np.frombuffer(wav[start : start + data_bytes], "<i2").astype(np.int32)


def assert_within_one_lsb(wav: bytes, data: bytes) -> None:
    expected = synth.reference_pcm(data)[:, 0].astype(np.int32)
    actual = pcm_of(wav)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1
    assert expected.std() > 100  # not silence


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
    payload = synth.random_packed_24khz(steps * HOP, nc, seed=nc)
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
    (700, 6, True),  # LM-coded, three code steps
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
    assert len(wav) == audio.size == wav_size(2 * samples)
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
        first = Engine(Settings(device="cpu", exact=True, cache_dir=None))
        expected = read_all(first.open(path).reader())
        first.close()
    engine = Engine(Settings(device="cpu", exact=True, cache_dir=None))  # nothing decoded yet
    try:
        audio = engine.open(path)
        # The last chunk first, then reads from several threads in random order, each on a
        # handle of its own, of every size, some straddling the seams between chunks.
        end = audio.wav.pcm_end
        assert audio.read(end - 1000, 5000) == expected[end - 1000 : end + 4000]
        rng = random.Random(7)
        spans = [(len(audio.wav.header) + 2 * k * CHUNK - 10, 20) for k in range(1, 6)]
        for _ in range(24):
            spans.append((rng.randrange(audio.size), rng.choice([1, 3, 4096, READ, 3 * CHUNK])))
        rng.shuffle(spans)

        def worker(part):
            reader = audio.reader()
            for offset, size in part:
                assert reader.read(offset, size) == expected[offset : offset + size]

        errors = helpers.run_in_threads(worker, [(spans[i::4],) for i in range(4)])
        assert not errors, errors[0]
        # A chunk decoded again (as after an eviction) gives the same bytes.
        assert np.array_equal(audio.decode(3).audio, audio.request(3).result().audio)
    finally:
        engine.close()


# --- long files ---------------------------------------------------------------------------


def test_one_hour_file_seeks_in_bounded_memory_and_time(engine, tmp_path):
    samples, nc = 3600 * SR + 123, 2
    path = synth.write(
        tmp_path,
        "hour.ecdc",
        synth.container_24khz(samples, nc, synth.random_packed_24khz(samples, nc)),
    )
    audio = engine.open(path)
    assert audio.size == wav_size(2 * samples)
    codec = engine.decoder(MODELS["encodec_24khz"])
    codes = np.random.default_rng(1).integers(0, 1024, (nc, CHUNK_STEPS), dtype=np.int64)
    codec.decode_frame(EncodedFrame(codes[:, :10], None))  # warm the model
    started = time.perf_counter()
    codec.decode_frame(EncodedFrame(codes, None))  # baseline: 5 s of codes, a warm model
    baseline = time.perf_counter() - started

    measured = helpers.reset_peak_rss(os.getpid())
    rss_before = helpers.proc_kib(os.getpid(), "VmRSS")
    offset = len(audio.wav.header) + 2 * 45 * 60 * SR
    started = time.perf_counter()
    data = audio.reader().read(offset, 2 * SR)
    elapsed = time.perf_counter() - started
    assert len(data) == 2 * SR
    assert np.frombuffer(data, "<i2").std() > 0
    # One chunk with its warm-up: about 1.2x the baseline (generous: shared CPUs are noisy).
    assert engine.scheduler.decoded_count == 1
    assert elapsed < 6 * baseline + 1, (elapsed, baseline)
    if measured:
        growth_mb = (helpers.proc_kib(os.getpid(), "VmHWM") - rss_before) / 1024
        assert growth_mb < 400, growth_mb
    # The same bytes as when the chunk is reached from its neighbour.
    assert audio.read(offset - 10, 20)[10:] == data[:10]


# --- LM-coded files: one arithmetic-coded stream, indexed in blocks of one chunk ----------

SMALL_CHUNK = 40  # steps; small chunks make short LM-coded files span many chunks


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks (and index blocks) of 40 steps with 40 warm-up steps."""
    monkeypatch.setattr(Chunks, "chunk_steps", SMALL_CHUNK)
    monkeypatch.setattr(Chunks, "context_steps", SMALL_CHUNK)


def lm_and_plain(engine, samples: int, nc: int, seed: int = 0) -> tuple[bytes, bytes]:
    """The same random codes as an LM-coded and as a bit-packed 24 kHz file."""
    plain = synth.random_packed_24khz(samples, nc, seed)
    steps = -(-samples // HOP)
    codes = unpack_codes(plain, nc, steps, 10)
    lm = load_lm(MODELS["encodec_24khz"])
    lm_coded = synth.lm_encode(lm, codes)
    return (
        synth.container_24khz(samples, nc, lm_coded, lm=True),
        synth.container_24khz(samples, nc, plain),
    )


class GatedBlocks:
    """Stands in for the LM pass (``LanguageModel.scan``, patched by :meth:`patch`): passes
    on ``open_blocks`` blocks, then waits for the gate."""

    def __init__(self, open_blocks: int) -> None:
        self.open_blocks = open_blocks
        self.gate = threading.Event()
        self.yielded = 0
        self.scan = LanguageModel.scan

    def patch(self, monkeypatch) -> GatedBlocks:
        monkeypatch.setattr(LanguageModel, "scan", lambda lm, *args: self.gated(lm, *args))
        return self

    def gated(self, lm, *args):
        for number, unit in enumerate(self.scan(lm, *args)):
            if number >= self.open_blocks:
                assert self.gate.wait(60)
            self.yielded += 1
            yield unit


def test_lm_file_reads_like_the_plain_file_of_its_codes(engine, small_chunks, tmp_path):
    samples, nc = 205 * HOP - 17, 2  # 6 chunks, the last one 5 steps long
    lm_data, plain_data = lm_and_plain(engine, samples, nc)
    expected = read_all(engine.open(synth.write(tmp_path, "plain.ecdc", plain_data)).reader())
    path = synth.write(tmp_path, "lm.ecdc", lm_data)
    audio = engine.open(path)
    assert audio.size == len(expected) == wav_size(2 * samples)
    rng = random.Random(3)
    spans = [(rng.randrange(audio.size), rng.choice([1, 100, 4096, 3 * SMALL_CHUNK * HOP]))]
    spans += [
        (len(audio.wav.header) + 2 * k * SMALL_CHUNK * HOP - 7, 14) for k in range(1, 6)
    ]  # the seams
    rng.shuffle(spans)
    for offset, size in spans:
        assert audio.read(offset, size) == expected[offset : offset + size]
    assert read_all(audio.reader()) == expected
    index = audio.code_index()
    assert len(index) == index.unit_count == 6
    assert [c.shape for c in index.codes] == [(nc, SMALL_CHUNK)] * 5 + [(nc, 5)]

    # Persisted whole: a second engine reads it without running the LM.
    engine.close()
    second = Engine(engine.settings)
    try:
        with pytest.MonkeyPatch.context() as mp:
            GatedBlocks(0).patch(mp)  # would wait forever
            assert read_all(second.open(path).reader()) == expected
    finally:
        second.close()


def test_lm_reads_wait_only_for_the_blocks_they_need(engine, small_chunks, tmp_path, monkeypatch):
    samples, nc = 160 * HOP, 2  # 4 chunks
    lm_data, plain_data = lm_and_plain(engine, samples, nc, seed=1)
    expected = read_all(engine.open(synth.write(tmp_path, "plain.ecdc", plain_data)).reader())
    gated = GatedBlocks(open_blocks=1).patch(monkeypatch)
    audio = engine.open(synth.write(tmp_path, "lm.ecdc", lm_data))
    reader = audio.reader()
    first_chunk = len(audio.wav.header) + 2 * SMALL_CHUNK * HOP
    assert reader.read(0, first_chunk) == expected[:first_chunk]  # block 0 only
    assert len(audio.code_index()) == 1
    done = threading.Event()
    last = []
    thread = threading.Thread(
        target=lambda: (last.append(audio.read(audio.wav.pcm_end - 10, 10)), done.set())
    )
    thread.start()
    assert not done.wait(0.5)  # the last chunk waits for its block
    gated.gate.set()
    thread.join(60)
    assert last == [expected[audio.wav.pcm_end - 10 : audio.wav.pcm_end]]
    assert read_all(reader) == expected


def test_partial_lm_index_serves_its_blocks_while_the_rest_is_rebuilt(
    engine, small_chunks, tmp_path, monkeypatch
):
    samples, nc = 160 * HOP, 2
    lm_data, plain_data = lm_and_plain(engine, samples, nc, seed=2)
    expected = read_all(engine.open(synth.write(tmp_path, "plain.ecdc", plain_data)).reader())
    path = synth.write(tmp_path, "lm.ecdc", lm_data)
    full = engine.open(path)
    assert read_all(full.reader()) == expected
    # What a daemon stopped after two blocks leaves in the cache directory.
    complete = full.code_index()
    partial = CodeIndex(complete.unit_count)
    for unit in range(2):
        partial.append(None, complete.codes[unit], 0)
    cache = engine.settings.cache_dir
    partial.save(cache / f"{full.identity}{INDEX_SUFFIX}")
    engine.close()

    gated = GatedBlocks(open_blocks=0).patch(monkeypatch)  # the rebuild (from 0) waits
    second = Engine(engine.settings)
    try:
        audio = second.open(path)
        two_chunks = len(audio.wav.header) + 2 * 2 * SMALL_CHUNK * HOP
        assert audio.read(0, two_chunks) == expected[:two_chunks]  # served from the index
        assert gated.yielded == 0
        gated.gate.set()
        assert read_all(audio.reader()) == expected
        assert gated.yielded == 4  # decoded from the start; blocks 0 and 1 were skipped
    finally:
        second.close()


def test_long_lm_file_opens_with_its_exact_size_and_fails_only_where_damaged(engine, tmp_path):
    samples = 2 * 3600 * SR + 5  # two hours claimed, 64 bytes of payload
    path = synth.write(
        tmp_path, "long.ecdc", synth.container_24khz(samples, 2, bytes(range(64)), lm=True)
    )
    audio = engine.open(path)
    assert audio.size == wav_size(2 * samples)
    assert audio.read(0, len(audio.wav.header)) == audio.wav.header
    assert engine.decoder(MODELS["encodec_24khz"]) and engine.lm(MODELS["encodec_24khz"])
    # (loaded: not counted below)
    rss_before = helpers.proc_kib(os.getpid(), "VmRSS")
    with pytest.raises(EcdcError):
        audio.read(audio.wav.pcm_end - 10, 10)
    assert (helpers.proc_kib(os.getpid(), "VmRSS") - rss_before) / 1024 < 100


def test_lm_blocks_do_not_keep_the_decoders_symbol_log(engine, monkeypatch):
    """encodec's ArithmeticDecoder logs every symbol it pulls; a 24 kHz file is one stream
    (one decoder for the whole file), so the log must not live as long as the decoder."""
    import encodec.quantization.ac as ac

    decoders = []

    class Recorded(ac.ArithmeticDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            decoders.append(self)

    monkeypatch.setattr(ac, "ArithmeticDecoder", Recorded)
    nc, steps = 2, 100
    codes = np.random.default_rng(5).integers(0, 1024, (nc, steps))
    lm = load_lm(MODELS["encodec_24khz"])
    stream = io.BytesIO(synth.lm_encode(lm, codes))
    blocks = []
    for block in decode_lm_steps(lm, stream, nc, steps, 40):
        assert decoders[0]._dbg == decoders[0]._dbg2 == []
        blocks.append(block)
    assert [b.shape[1] for b in blocks] == [40, 40, 20]
    assert np.array_equal(np.concatenate(blocks, axis=1), codes)


def test_truncated_lm_file_reads_up_to_the_damage(engine, small_chunks, tmp_path):
    samples, nc = 160 * HOP, 2
    lm_data, plain_data = lm_and_plain(engine, samples, nc, seed=4)
    expected = read_all(engine.open(synth.write(tmp_path, "plain.ecdc", plain_data)).reader())
    audio = engine.open(synth.write(tmp_path, "lm.ecdc", lm_data[: len(lm_data) // 2]))
    assert audio.read(0, 1000) == expected[:1000]
    with pytest.raises(EcdcError, match="truncated"):
        audio.read(audio.wav.pcm_end - 10, 10)
    with pytest.raises(EcdcError, match="truncated"):  # again, at once
        audio.read(audio.wav.pcm_end - 10, 10)
    assert audio.read(0, 1000) == expected[:1000]
