"""The FUSE-free core: WAV bytes of .ecdc files equal encodec's own decode, whatever the reads."""

from __future__ import annotations

import random
import wave
from io import BytesIO

import numpy as np
import pytest
from mutagen.wave import WAVE

import helpers
import synth
from ecdcfs.engine import Engine, Settings
from helpers import READ, read_all

CASES = [
    # (samples, kbps, lm): every bandwidth, then the edge lengths of the frame grid
    (150_000, 3, False),
    (150_000, 6, False),
    (150_000, 12, False),
    (150_000, 24, False),
    (30_000, 6, False),  # under one frame
    (47_521, 6, False),  # a stride + 1
    (48_000, 6, False),  # a stride + 480: the second frame is one overlap long
    (54_240, 6, False),  # upstream's float frame length fails here
    (100_000, 3, True),
    (54_240, 6, True),
    (30_000, 24, True),
]


@pytest.mark.parametrize(("samples", "kbps", "lm"), CASES)
def test_sequential_read_equals_encodec_decode(engine, tmp_path, samples, kbps, lm):
    data = synth.make_ecdc(samples=samples, kbps=kbps, lm=lm)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    expected = helpers.expected_wav(data)
    assert audio.size == len(expected)
    assert read_all(audio.reader()) == expected
    assert engine.scheduler.decoded_count == audio.layout.frame_count


def test_encodec_stream_header_sets_rate_and_tags(engine, tmp_path):
    v0 = synth.make_ecdc(samples=60_000, kbps=6)
    tags = ("Sóng [live]", "https://example.org/x", "https://example.org/t.jpg")
    data = synth.to_v193(v0, sr=44_100, name=tags[0], source=tags[1], thumbnail=tags[2])
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    wav_bytes = read_all(audio.reader())
    assert wav_bytes == helpers.expected_wav(v0, 44_100, *tags)
    with wave.open(BytesIO(wav_bytes)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (44_100, 2, 60_000)
    id3 = WAVE(BytesIO(wav_bytes)).tags
    assert (id3["TIT2"].text, id3["WOAS"].url, id3["WXXX:thumbnail"].url) == ([tags[0]], *tags[1:])


def test_random_tail_first_and_past_eof_reads(engine, tmp_path):
    data = synth.make_ecdc(samples=150_000, kbps=6)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    expected = helpers.expected_wav(data)
    size = audio.size
    assert audio.read(size - 1000, 5000) == expected[-1000:]  # tail first, short at EOF
    assert audio.read(size, 10) == b"" and audio.read(size + 10**9, 10) == b""
    rng = random.Random(1)
    for _ in range(200):
        offset, length = rng.randrange(size), rng.choice([1, 2, 3, 4095, 4096, READ, 300_000])
        assert audio.read(offset, length) == expected[offset : offset + length]


def test_concurrent_readers_decode_each_frame_once(engine, tmp_path):
    data = synth.make_ecdc(samples=200_000, kbps=12)
    path = synth.write(tmp_path, "x.ecdc", data)
    expected = helpers.expected_wav(data)
    results = {}

    def run(n: int) -> None:
        audio = engine.open(path)
        reader = audio.reader()
        rng = random.Random(n)
        offsets = list(range(0, audio.size, 50_000))
        if n % 2:
            rng.shuffle(offsets)
        results[n] = {o: reader.read(o, 50_000) for o in offsets}
        reader.close()

    errors = helpers.run_in_threads(run, [(n,) for n in range(6)])
    assert not errors, errors[0]
    for chunks in results.values():
        assert all(chunk == expected[o : o + 50_000] for o, chunk in chunks.items())
    assert engine.scheduler.decoded_count == engine.open(path).layout.frame_count


def test_one_reader_shared_by_threads(engine, tmp_path):
    data = synth.make_ecdc(samples=150_000, kbps=6)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    expected, reader = helpers.expected_wav(data), audio.reader()
    offsets = list(range(0, audio.size, 4096))
    random.Random(3).shuffle(offsets)

    def run(part: list[int]) -> None:
        for offset in part:
            assert reader.read(offset, 4096) == expected[offset : offset + 4096], offset

    errors = helpers.run_in_threads(run, [(offsets[n::4],) for n in range(4)])
    assert not errors, errors[0]
    reader.close()


def test_tiny_cache_still_exact(torch_home, tmp_path):
    data = synth.make_ecdc(samples=150_000, kbps=6)
    engine = Engine(Settings(device="cpu", exact=True, cache_mb=1, cache_dir=None))
    try:
        audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
        assert read_all(audio.reader(), 4096 * 7) == helpers.expected_wav(data)
    finally:
        engine.close()


def test_24khz_short_file_equals_encodec_decode(engine, tmp_path):
    data = synth.make_ecdc(model="encodec_24khz", samples=40_000, kbps=6)
    audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
    expected = helpers.expected_wav(data, 24_000)
    assert read_all(audio.reader()) == expected
    assert audio.read(50_000, 999) == expected[50_000:50_999]
    assert np.frombuffer(expected[-1024 - 2 * 40_000 : -1024], "<i2").std() > 100  # not silence


@pytest.mark.parametrize(
    ("cache_mb", "bufsize", "frames_48k", "chunks_24k"),
    [(512, 1, 64, 64), (16, 1, 10, 8), (1, 1, 1, 1), (1, 3, 3, 3), (16, 20, 20, 20)],
)
def test_read_ahead_cap_is_a_quarter_of_the_cache_in_units(
    torch_home, tmp_path, cache_mb, bufsize, frames_48k, chunks_24k
):
    """The window never asks for more than a quarter of the cache, counted in the file's own
    units (a 48 kHz stereo frame is 384,000 bytes decoded, a 24 kHz chunk 480,000), never
    past 64 units, and never under bufsize."""
    engine = Engine(
        Settings(device="cpu", exact=True, cache_mb=cache_mb, bufsize=bufsize, cache_dir=None)
    )
    try:
        plain = engine.open(tmp_path / "a.ecdc", synth.make_ecdc(samples=4_800))
        chunked = engine.open(tmp_path / "b.ecdc", synth.container_24khz(320, 2, bytes(8)))
        assert plain.units.decoded_bytes == 2 * 48_000 * 4
        assert chunked.units.decoded_bytes == 375 * 320 * 4
        assert (plain.max_read_ahead, chunked.max_read_ahead) == (frames_48k, chunks_24k)
    finally:
        engine.close()


def test_read_ahead_opens_after_a_sequential_run_of_read_ahead_after_bytes(torch_home, tmp_path):
    """A scanner reads the first MiB or so of a file and closes it: a mount's reader starts
    read-ahead only once one sequential run has read more than that (a seek starts anew)."""
    engine = Engine(Settings(device="cpu", exact=True, bufsize=1, cache_dir=None))
    try:
        audio = engine.open(synth.write(tmp_path, "x.ecdc", synth.make_ecdc(samples=480_000)))
        frame_bytes = 47_520 * 4  # a 48 kHz frame's stride of stereo PCM
        reader, pcm = audio.reader(read_ahead_after=3 * frame_bytes), len(audio.wav.header)
        end = pcm + 3 * frame_bytes
        for offset in range(pcm, end, 65_536):  # three frames' worth, no more
            reader.read(offset, min(65_536, end - offset))
        assert reader.window == 0 and engine.scheduler.stats()["decodes_started"] <= 4
        reader.read(pcm + 3 * frame_bytes, 65_536)  # past it: read-ahead opens
        assert reader.window == 1
        reader.read(pcm + 7 * frame_bytes, 4096)  # a seek: a new run, read-ahead dropped
        assert reader.window == 1 and reader._ahead == []
        eager = audio.reader()  # read_ahead_after 0 (ecdcfs.open, ecdc-stream): at once
        eager.read(pcm, 4096)
        assert eager.window == 1 and eager._ahead == [1]
    finally:
        engine.close()


def test_units_share_a_decode_call_only_where_the_loaded_decoder_batches(engine, tmp_path):
    """GPU batching (Engine.batch): 48 kHz frames of one shape (codebooks, steps) share a
    decode call on a loaded decoder whose batch_size is over 1; never on the CPU's, never
    before the decoder is loaded, never for 24 kHz chunks (no batch group)."""
    from types import SimpleNamespace

    audio = engine.open(synth.write(tmp_path, "x.ecdc", synth.make_ecdc(samples=100_000)))
    spec, group = audio.header.model, audio.units.batch_group(0)
    assert group == audio.units.batch_group(1) != audio.units.batch_group(audio.unit_count - 1)
    assert engine.batch(spec, group, lambda: None) is None  # not loaded yet
    assert engine.decoder(spec).batch_size == 1  # the CPU: one at a time
    assert engine.batch(spec, group, lambda: None) is None
    gpu = SimpleNamespace(batch_size=8, decode_frames=lambda frames: [])
    engine._decoders[spec.name] = gpu
    batch = engine.batch(spec, group, inputs := (lambda: "codes"))
    assert batch is not None and batch.group == (spec.name, group) and batch.size == 8
    assert batch.inputs is inputs and batch.run is gpu.decode_frames
    assert engine.batch(spec, None, inputs) is None
