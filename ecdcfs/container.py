"""The ECDC container: header, metadata, frame layout and code unpacking (no torch).

An ``.ecdc`` file is ``struct '!4sBI'`` (magic ``ECDC``, version byte, big-endian JSON
length), UTF-8 JSON metadata, then one payload frame per model segment. Each frame of a
normalising model (48 kHz) starts with a big-endian float32 scale; its codes follow either
bit-packed (10 bits, LSB first, time-major, flushed to a byte per frame) or, with
``lm: true``, arithmetic-coded with Encodec's language model (also flushed per frame).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import numpy as np

MAGIC = b"ECDC"
HEADER = struct.Struct("!4sBI")
SCALE = struct.Struct("!f")
# Upstream encodec writes 0; Encodec-Stream writes 192/193 (with extra metadata keys).
SUPPORTED_VERSIONS = (0, 192, 193)
# Real metadata is a few hundred bytes; a thumbnail URL can be long, but never megabytes.
MAX_METADATA_BYTES = 1 << 20
# An arithmetic-coded frame is at least its scale plus the 24 bits the coder always emits.
MIN_LM_FRAME_BYTES = 4 + 3
# Upper bounds of an LM-coded payload (see Header.payload_bound): bytes per code, per frame.
MAX_LM_CODE_BYTES = 4
MAX_LM_FRAME_BYTES = 16


class EcdcError(Exception):
    """Base of every error ecdcfs raises about a file or a decode."""


class ContainerError(EcdcError):
    """The file is not a valid, supported ECDC container."""


class EncodedFrame(NamedTuple):
    """One frame's codes, int ``[codebooks, steps]``, and its scale (None: not normalised).

    The order is encodec's own ``EncodedFrame``.
    """

    codes: np.ndarray
    scale: float | None


@dataclass(frozen=True)
class ModelSpec:
    """An Encodec model: what the container layout needs, and its decoder's architecture.

    The architecture is encodec's ``SEANetDecoder`` with its defaults (``_get_model``
    changes only ``channels``, ``norm`` and ``causal``): :mod:`ecdcfs.graph` builds the
    decoder from a checkpoint's weights by these numbers, and the tests hold them to
    encodec's own model.
    """

    name: str
    sample_rate: int
    channels: int
    segment: int | None  # samples per segment; None: the whole file is one frame
    stride: int | None  # samples between segment starts
    bits: int  # bits per code
    max_codebooks: int
    normalize: bool  # frames carry a float32 scale
    norm: str  # "time_group_norm" (a GroupNorm after each convolution) or "weight_norm"
    causal: bool  # causal convolutions: padding on the left only
    dimension: int = 128  # the embedding's dimension (the codebooks' width)
    n_filters: int = 32  # channels of the last upsampling stage
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # upsampling strides, in decoding order
    kernel_size: int = 7  # of the first convolution
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    n_residual_layers: int = 1
    compress: int = 2  # a residual branch's channels: the block's divided by this
    lstm_layers: int = 2
    trim_right_ratio: float = 1.0  # of a causal transposed convolution's trimming
    pad_mode: str = "reflect"

    @property
    def hop(self) -> int:
        """Samples per code step: the product of the upsampling strides."""
        return math.prod(self.ratios)

    @property
    def bins(self) -> int:
        """Entries of each codebook."""
        return 1 << self.bits

    def code_steps(self, samples: int) -> int:
        """Code steps of a frame covering ``samples`` (integer ceil, unlike encodec 0.1.1)."""
        return -(-samples // self.hop)


MODELS: dict[str, ModelSpec] = {
    "encodec_48khz": ModelSpec(
        name="encodec_48khz",
        sample_rate=48_000,
        channels=2,
        segment=48_000,
        stride=47_520,
        bits=10,
        max_codebooks=16,
        normalize=True,
        norm="time_group_norm",
        causal=False,
    ),
    "encodec_24khz": ModelSpec(
        name="encodec_24khz",
        sample_rate=24_000,
        channels=1,
        segment=None,
        stride=None,
        bits=10,
        max_codebooks=32,
        normalize=False,
        norm="weight_norm",
        causal=True,
    ),
}


@dataclass(frozen=True)
class Header:
    """Parsed and validated ECDC header."""

    version: int
    model: ModelSpec
    audio_length: int  # samples per channel
    num_codebooks: int
    use_lm: bool
    payload_offset: int  # byte offset of the first frame
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        """Rate the decoded samples are meant to be played at (``sr`` when present)."""
        return int(self.metadata.get("sr") or self.model.sample_rate)

    @property
    def title(self) -> str | None:
        return _optional_str(self.metadata, "n")

    @property
    def source(self) -> str | None:
        return _optional_str(self.metadata, "s")

    @property
    def thumbnail(self) -> str | None:
        return _optional_str(self.metadata, "t")

    @property
    def layout(self) -> FrameLayout:
        return FrameLayout(self.model, self.audio_length, self.num_codebooks)

    @property
    def payload_bound(self) -> int:
        """Bytes of a file with this header that can matter: anything after is never read.

        Bit-packed frames have a known size. An arithmetic-coded code costs about 23 bits
        at most (encodec's coder gives every symbol at least 2 of 2**24; 32 are allowed)
        and a frame's flush a few bytes, so an LM-coded payload is bounded too: a huge
        file costs no memory either way.
        """
        layout = self.layout
        if not self.use_lm:
            return self.payload_offset + layout.plain_payload_bytes()
        code_bytes = layout.code_steps(0) * layout.num_codebooks * MAX_LM_CODE_BYTES
        return self.payload_offset + layout.frame_count * (MAX_LM_FRAME_BYTES + code_bytes)


def _optional_str(metadata: dict[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    return value if isinstance(value, str) and value else None


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ContainerError(reason)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(prefix: bytes, file_size: int) -> Header:
    """Parse the header from the first bytes of a file of ``file_size`` bytes.

    ``prefix`` must hold the whole header (see :func:`read_header`); validation is
    arithmetic only, so an absurd header costs no memory.
    """
    _require(len(prefix) >= HEADER.size, f"file too short for an ECDC header ({file_size} bytes)")
    magic, version, meta_size = HEADER.unpack_from(prefix)
    _require(magic == MAGIC, f"not an ECDC file (magic {magic!r})")
    _require(version in SUPPORTED_VERSIONS, f"unsupported ECDC version {version}")
    _require(meta_size <= MAX_METADATA_BYTES, f"metadata length {meta_size} is implausible")
    payload_offset = HEADER.size + meta_size
    _require(payload_offset <= file_size, f"metadata length {meta_size} runs past the end")
    _require(len(prefix) >= payload_offset, "header truncated")
    try:
        metadata = json.loads(prefix[HEADER.size : payload_offset].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContainerError(f"metadata is not valid JSON: {exc}") from None
    _require(isinstance(metadata, dict), "metadata is not a JSON object")
    model_name = metadata.get("m")
    _require(isinstance(model_name, str) and model_name in MODELS, f"unknown model {model_name!r}")
    model = MODELS[model_name]
    audio_length, num_codebooks, use_lm = metadata.get("al"), metadata.get("nc"), metadata.get("lm")
    _require(_is_int(audio_length) and audio_length >= 0, f"bad audio length {audio_length!r}")
    _require(
        _is_int(num_codebooks) and 1 <= num_codebooks <= model.max_codebooks,
        f"bad codebook count {num_codebooks!r} for {model_name}",
    )
    _require(isinstance(use_lm, bool), f"bad lm flag {use_lm!r}")
    rate = metadata.get("sr")
    _require(rate is None or (_is_int(rate) and 0 < rate < 1 << 31), f"bad sample rate {rate!r}")
    for key in ("n", "s", "t"):
        _require(
            metadata.get(key) is None or isinstance(metadata[key], str),
            f"metadata {key!r} is not a string",
        )
    header = Header(version, model, audio_length, num_codebooks, use_lm, payload_offset, metadata)
    _check_payload_size(header, file_size - payload_offset)
    return header


def _check_payload_size(header: Header, payload_bytes: int) -> None:
    """Reject headers whose claims the payload cannot back (before anything is allocated)."""
    layout = header.layout
    if not header.use_lm:
        expected = layout.plain_payload_bytes()
        _require(
            payload_bytes >= expected,
            f"payload truncated: {payload_bytes} bytes, header needs {expected}",
        )
    elif header.model.normalize:
        needed = layout.frame_count * MIN_LM_FRAME_BYTES
        _require(
            payload_bytes >= needed,
            f"payload truncated: {payload_bytes} bytes cannot hold {layout.frame_count} frames",
        )


def read_header(f: Any, file_size: int) -> Header:
    """Read and validate the header of an open binary file (positioned anywhere)."""
    f.seek(0)
    prefix = f.read(HEADER.size)
    if len(prefix) == HEADER.size and prefix[:4] == MAGIC:
        meta_size = HEADER.unpack(prefix)[2]
        if HEADER.size + meta_size <= min(file_size, HEADER.size + MAX_METADATA_BYTES):
            prefix += f.read(meta_size)
    return parse_header(prefix, file_size)


@dataclass(frozen=True)
class FrameLayout:
    """Where each frame's samples lie, derived from the header alone."""

    model: ModelSpec
    audio_length: int
    num_codebooks: int

    @property
    def stride(self) -> int:
        return self.model.stride or max(self.audio_length, 1)

    @property
    def segment(self) -> int:
        return self.model.segment or max(self.audio_length, 1)

    @property
    def frame_count(self) -> int:
        return -(-self.audio_length // self.stride)

    def frame_start(self, index: int) -> int:
        """First output sample of frame ``index``."""
        return index * self.stride

    def frame_samples(self, index: int) -> int:
        """Input samples the encoder saw for frame ``index``."""
        return min(self.audio_length - index * self.stride, self.segment)

    def code_steps(self, index: int) -> int:
        return self.model.code_steps(self.frame_samples(index))

    def decoded_length(self, index: int) -> int:
        """Samples the decoder produces for frame ``index`` (a whole number of hops)."""
        return self.code_steps(index) * self.model.hop

    def frames_covering(self, start: int, stop: int) -> range:
        """Frames whose decoded samples overlap output samples ``[start, stop)``."""
        if stop <= start or self.frame_count == 0:
            return range(0)
        first = max(0, (start - self.segment) // self.stride + 1)
        last = min(self.frame_count - 1, (stop - 1) // self.stride)
        return range(first, last + 1)

    def plain_frame_bytes(self, index: int) -> int:
        """Size of a bit-packed (non-LM) frame: scale plus packed codes."""
        scale = SCALE.size if self.model.normalize else 0
        return scale + -(-self.code_steps(index) * self.num_codebooks * self.model.bits // 8)

    @property
    def whole_frames(self) -> int:
        """Frames that cover a whole segment: all but the last one or two."""
        return max(0, (self.audio_length - self.segment) // self.stride + 1)

    def plain_frame_offset(self, index: int) -> int:
        """Byte offset of a bit-packed frame relative to the payload start.

        Frames before :attr:`whole_frames` all have the size of frame 0. After them come
        at most two short ones: when the audio ends at most one overlap past a stride
        (``k * stride + r``, ``r <= segment - stride``), the frame before the last is
        short too (149 of 150 steps at 48 kHz for ``r <= 160``).
        """
        whole = min(index, self.whole_frames)
        tail = sum(self.plain_frame_bytes(i) for i in range(whole, index))
        return whole * self.plain_frame_bytes(0) + tail

    def plain_payload_bytes(self) -> int:
        count = self.frame_count
        if count == 0:
            return 0
        return self.plain_frame_offset(count - 1) + self.plain_frame_bytes(count - 1)


def unpack_codes(
    data: bytes, num_codebooks: int, steps: int, bits: int, bit_offset: int = 0
) -> np.ndarray:
    """Unpack LSB-first, time-major packed codes into an int64 array ``[codebooks, steps]``.

    The codes start ``bit_offset`` bits into ``data`` (a step range of a 24 kHz frame
    need not start on a byte boundary).
    """
    count = num_codebooks * steps
    needed = math.ceil((bit_offset + count * bits) / 8)
    if len(data) < needed:
        raise ContainerError(f"frame truncated: {len(data)} of {needed} code bytes")
    raw = np.unpackbits(np.frombuffer(data, np.uint8, needed), bitorder="little")
    raw = raw[bit_offset : bit_offset + count * bits]
    values = raw.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits))
    return values.reshape(steps, num_codebooks).T.copy()


def read_scale(stream: BinaryIO) -> float:
    """The float32 scale that starts each frame of a normalizing (48 kHz) model."""
    raw = stream.read(SCALE.size)
    if len(raw) < SCALE.size:
        raise ContainerError("payload truncated before a frame scale")
    return SCALE.unpack(raw)[0]
