"""The ECDC container parser: layout arithmetic, code unpacking, rejection of bad headers."""

import contextlib
import io
import json
import struct

import numpy as np
import pytest
from encodec.binary import BitPacker
from hypothesis import given, settings
from hypothesis import strategies as st

from ecdcfs.container import (
    MODELS,
    ContainerError,
    FrameLayout,
    parse_header,
    read_header,
    unpack_codes,
)
from synth.container import plain_payload_bytes

M48 = MODELS["encodec_48khz"]


def ecdc_bytes(meta: dict, payload: bytes = b"", version: int = 0) -> bytes:
    body = json.dumps(meta).encode()
    return struct.pack("!4sBI", b"ECDC", version, len(body)) + body + payload


def plain_file(samples: int, nc: int = 2, version: int = 0, **extra) -> bytes:
    meta = {"m": "encodec_48khz", "al": samples, "nc": nc, "lm": False, **extra}
    return ecdc_bytes(meta, bytes(FrameLayout(M48, samples, nc).plain_payload_bytes()), version)


def parse(data: bytes):
    return parse_header(data, len(data))


@pytest.mark.parametrize(
    ("samples", "frames", "last_steps"),
    [
        (1, 1, 1),
        (30_000, 1, 94),
        (48_000, 2, 2),
        (47_521, 2, 1),
        (48_000 + 47_520, 3, 2),
        (54_240, 2, 21),
        (47_520 * 10, 10, 149),
    ],
)
def test_layout_uses_integer_frame_lengths(samples, frames, last_steps):
    layout = FrameLayout(M48, samples, 4)
    assert layout.frame_count == frames
    assert layout.code_steps(frames - 1) == last_steps
    assert layout.code_steps(0) == min(150, -(-samples // 320))


def test_frames_covering_matches_brute_force():
    layout = FrameLayout(M48, 300_000, 2)
    spans = [
        (layout.frame_start(i), layout.frame_start(i) + layout.decoded_length(i))
        for i in range(layout.frame_count)
    ]
    for start, stop in [
        (0, 1),
        (47_519, 47_521),
        (47_520, 48_000),
        (48_000, 48_001),
        (100_000, 200_000),
        (299_999, 300_000),
        (0, 300_000),
    ]:
        expected = [i for i, (a, b) in enumerate(spans) if a < stop and start < b]
        assert list(layout.frames_covering(start, stop)) == expected


@pytest.mark.parametrize("bits", [10])
@pytest.mark.parametrize(("nc", "steps"), [(1, 1), (2, 150), (4, 7), (16, 150), (3, 5)])
def test_unpack_codes_inverts_encodec_bitpacker(bits, nc, steps):
    rng = np.random.default_rng(nc * 1000 + steps)
    codes = rng.integers(0, 1 << bits, size=(nc, steps))
    out = io.BytesIO()
    packer = BitPacker(bits, out)
    for t in range(steps):
        for k in range(nc):
            packer.push(int(codes[k, t]))
    packer.flush()
    np.testing.assert_array_equal(unpack_codes(out.getvalue(), nc, steps, bits), codes)


@pytest.mark.parametrize("model", ["encodec_48khz", "encodec_24khz"])
@pytest.mark.parametrize("nc", [1, 2, 4, 32])
def test_payload_size_agrees_with_the_tests_writer(model, nc):
    """FrameLayout's payload size equals synth's, written from the format, at every length
    around frame and step boundaries."""
    for samples in [*range(1, 700), *range(47_000, 48_700), *range(95_000, 96_100, 7)]:
        expected = plain_payload_bytes(model, samples, nc)
        assert FrameLayout(MODELS[model], samples, nc).plain_payload_bytes() == expected


def test_plain_header_and_payload_size():
    data = plain_file(100_000, nc=4)
    header = parse(data)
    assert (header.version, header.audio_length, header.num_codebooks) == (0, 100_000, 4)
    assert header.sample_rate == 48_000
    assert header.payload_offset + header.layout.plain_payload_bytes() == len(data)


def test_encodec_stream_header_metadata():
    data = plain_file(48_000, version=193, sr=44_100, n="Song", s="http://x/y", br=6.0)
    header = parse(data)
    assert (header.version, header.sample_rate, header.title, header.source) == (
        193,
        44_100,
        "Song",
        "http://x/y",
    )


def test_read_header_from_file_object():
    data = plain_file(48_000)
    assert read_header(io.BytesIO(data), len(data)) == parse(data)


BAD = {
    "empty": b"",
    "short": b"ECDC\0",
    "magic": b"RIFF" + plain_file(1000)[4:],
    "version": plain_file(1000, version=7),
    "json": struct.pack("!4sBI", b"ECDC", 0, 5) + b"{nope",
    "not object": ecdc_bytes([1, 2]),
    "meta past end": struct.pack("!4sBI", b"ECDC", 0, 1000) + b"{}",
    "meta near 4 GiB": struct.pack("!4sBI", b"ECDC", 0, 0xFFFFFFF0) + b"{}",
    "model": ecdc_bytes({"m": "encodec_96khz", "al": 10, "nc": 2, "lm": False}),
    "al type": ecdc_bytes({"m": "encodec_48khz", "al": "10", "nc": 2, "lm": False}),
    "al bool": ecdc_bytes({"m": "encodec_48khz", "al": True, "nc": 2, "lm": False}),
    "al negative": ecdc_bytes({"m": "encodec_48khz", "al": -1, "nc": 2, "lm": False}),
    "nc zero": ecdc_bytes({"m": "encodec_48khz", "al": 10, "nc": 0, "lm": False}),
    "nc too big": ecdc_bytes({"m": "encodec_48khz", "al": 10, "nc": 17, "lm": False}),
    "lm type": ecdc_bytes({"m": "encodec_48khz", "al": 10, "nc": 2, "lm": 1}),
    "sr type": plain_file(1000, version=193, sr="fast"),
    "name type": plain_file(1000, version=193, n=5),
    "truncated": plain_file(100_000)[:-1],
    "al 1e12": ecdc_bytes({"m": "encodec_48khz", "al": 10**12, "nc": 2, "lm": False}, b"\0" * 99),
    "al 1e12 lm": ecdc_bytes({"m": "encodec_48khz", "al": 10**12, "nc": 2, "lm": True}, b"\0" * 99),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_headers_raise_container_error(name):
    with pytest.raises(ContainerError):
        parse(BAD[name])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzzed_files_only_raise_container_error(data):
    original = bytearray(plain_file(60_000, version=193, sr=44_100, n="x"))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    with contextlib.suppress(ContainerError):
        parse(bytes(original[:cut]))
