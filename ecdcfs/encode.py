"""Encoding PCM to .ecdc as a stream, in memory that does not grow with the input.

The 48 kHz model encodes one segment at a time exactly as ``EncodecModel.encode`` cuts
them (48,000 samples every 47,520), and each frame's codes are bit-packed to a payload
file as soon as they exist, so the output is byte for byte what
``encodec.compress.compress(model, wav, use_lm=False)`` writes for the same audio, apart
from the header. The header's audio length is known only at the end of the input, so the
header and the payload are put together then.

Bitrates follow Encodec-Stream (see :func:`plan_bitrate`); :func:`encode_pcm` is the whole
of ``ecdc-stream -e``: raw PCM (:mod:`ecdcfs.pcm`) in, an .ecdc file out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from .container import HEADER, MAGIC, MODELS, SCALE, EcdcError, ModelSpec
from .pcm import PCM_CHANNELS, PCM_RATE

log = logging.getLogger(__name__)

# int16 -> float as Encodec-Stream does it (x * (1 / 32767), the inverse of the decoder's
# round(x * 32767)); see int16_to_float.
INT16_SCALE = 1 / 32767
# Bitrates whose sample rate stays within [4 kHz, 384 kHz] (0.25 to 192 kbps).
MIN_RATE, MAX_RATE = 4_000, 384_000
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)  # what both models support, kbps
DEFAULT_BITRATE = 24  # kbps, as Encodec-Stream's -b


class BitrateError(ValueError):
    """A bitrate that cannot be encoded."""


WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE = 1, 0xFFFE
STREAMED_SIZES = (0, 0xFFFFFFFF)  # a data size a WAV written to a pipe may carry: to EOF


@dataclass
class PcmInput:
    """16-bit PCM on a stream: raw s16le, 2 channels, 48 kHz, or the data chunk of a
    RIFF/WAVE file (its own rate, 1 or 2 channels), found by :meth:`open`."""

    stream: BinaryIO
    rate: int = PCM_RATE
    channels: int = PCM_CHANNELS
    remaining: int | None = None  # bytes of the WAV's data chunk left; None: to EOF
    pending: bytes = b""  # read while looking for a WAV header, not yet returned

    @classmethod
    def open(cls, stream: BinaryIO) -> PcmInput:
        """The PCM of ``stream``: a WAV header is read (EcdcError for a WAV that is not
        16-bit PCM of 1 or 2 channels), anything else is raw PCM."""
        head = _read_exactly(stream, 12)
        if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return cls(stream, pending=head)
        form = None
        while True:
            chunk = _read_exactly(stream, 8)
            if len(chunk) < 8:
                raise EcdcError("stdin is a WAV file without a data chunk")
            kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if kind == b"data":
                break
            body = _read_exactly(stream, size + size % 2)
            if kind == b"fmt " and len(body) >= 16:
                form = struct.unpack("<HHIIHH", body[:16])
        if form is None:
            raise EcdcError("stdin is a WAV file without a fmt chunk before its data")
        tag, channels, rate, _, _, bits = form
        pcm = tag == WAVE_FORMAT_PCM or (tag == WAVE_FORMAT_EXTENSIBLE and body[24:26] == b"\1\0")
        if not (pcm and bits == 16 and channels in (1, 2) and MIN_RATE <= rate <= MAX_RATE):
            raise EcdcError(
                f"stdin is a WAV of {channels} channel(s) at {rate} Hz, {bits}-bit, format "
                f"{tag:#x}: -e takes 16-bit PCM of 1 or 2 channels (ffmpeg -i IN -f s16le "
                "-ac 2 -ar 48k - | ecdc-stream -e OUT)"
            )
        remaining = None if size in STREAMED_SIZES or kind != b"data" else size
        return cls(stream, rate, channels, remaining)

    @property
    def block_align(self) -> int:
        return 2 * self.channels

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of PCM; b"" at its end."""
        if self.remaining is not None:
            size = min(size, self.remaining)
        data, self.pending = self.pending + self.stream.read(max(0, size - len(self.pending))), b""
        if self.remaining is not None:
            self.remaining -= len(data)
        return data


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes of ``stream``, fewer only at its end (a pipe returns pieces)."""
    data = b""
    while len(data) < size and (piece := stream.read(size - len(data))):
        data += piece
    return data


@dataclass(frozen=True)
class Plan:
    """How a requested bitrate is encoded."""

    bitrate: float | int  # as requested, kbps (stored as ``br``)
    model: ModelSpec
    bandwidth: float  # the model's target bandwidth, kbps
    sample_rate: int  # the rate the audio is resampled to before encoding (``sr``)

    @property
    def version(self) -> int:
        """0 (upstream's header) when ``sr`` is the model's rate, else Encodec-Stream's 193."""
        return 0 if self.sample_rate == self.model.sample_rate else 193


def parse_bitrate(text: str) -> float | int:
    """``"6"``, ``"6k"``, ``"1.5"`` -> kbps (an int when whole, as Encodec-Stream stores it)."""
    value = text.strip()
    if value[-1:] in ("k", "K"):
        value = value[:-1]
    try:
        kbps = float(value)
    except ValueError:
        raise BitrateError(f"bad bitrate {text!r} (kbps, e.g. 6 or 6k)") from None
    if not math.isfinite(kbps) or kbps <= 0:
        raise BitrateError(f"bad bitrate {text!r} (kbps, e.g. 6 or 6k)")
    return int(kbps) if kbps == int(kbps) else kbps


def plan_bitrate(kbps: float) -> Plan:
    """Encodec-Stream's mapping from a bitrate to a model, bandwidth and sample rate.

    From 3 kbps up the 48 kHz model is used, below it the 24 kHz one. The bitrate is
    split into a supported bandwidth ``3 * 2**floor(log2(kbps / 3))`` (clamped to 1.5..24)
    and a sample-rate factor (the rest): the audio is resampled to ``model rate * factor``
    and encoded at that bandwidth, so one second of it carries ``kbps`` kilobits. E.g. 6
    -> 48 kHz model at 6 kbps, sr 48000; 9 -> 6 kbps at sr 72000; 2 -> 24 kHz model at 1.5
    kbps, sr 32000; 48 -> 24 kbps at sr 96000. Decoding resamples back to 48 kHz.
    """
    model = MODELS["encodec_48khz" if kbps >= 3 else "encodec_24khz"]
    octave = math.log2(kbps / 3)
    bandwidth = 3 * 2 ** (octave // 1)
    factor = 2 ** (octave % 1)
    if bandwidth < BANDWIDTHS[0]:
        factor *= bandwidth / BANDWIDTHS[0]
        bandwidth = BANDWIDTHS[0]
    elif bandwidth > BANDWIDTHS[-1]:
        factor *= bandwidth / BANDWIDTHS[-1]
        bandwidth = BANDWIDTHS[-1]
    rate = int(round(model.sample_rate * factor))
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BitrateError(
            f"bitrate {kbps} kbps is out of range (0.25 to 192 kbps: sample rate {rate} Hz)"
        )
    return Plan(kbps, model, float(bandwidth), rate)


def int16_to_float(pcm: np.ndarray) -> Any:
    """int16 samples ``[channels, n]`` as the float32 tensor Encodec-Stream encodes.

    Encodec-Stream divides by 32767 (by 32768 if the whole input holds a -32768, which a
    stream cannot know in advance; here -32768 maps to -1.00003 instead).
    """
    import torch

    wav = torch.from_numpy(np.array(pcm, dtype=np.int16, order="C")).to(torch.float32)
    wav *= INT16_SCALE
    return wav


class FrameWriter:
    """Encodes audio at the model's rate, pushed in pieces, into a bit-packed payload.

    Frames are cut like ``EncodecModel.encode``: for the 48 kHz model a frame starts every
    ``stride`` samples and covers up to ``segment`` of them, so a full frame is encoded as
    soon as its samples are in and only the overlap is kept; the 24 kHz model's single
    frame is the whole input (encoded at :meth:`finish`).
    """

    def __init__(self, model: Any, spec: ModelSpec, payload: BinaryIO) -> None:
        import torch

        self.model = model
        self.spec = spec
        self.payload = payload
        self.length = 0  # samples pushed
        self.frames = 0
        self.num_codebooks: int | None = None
        self._device = next(model.parameters()).device
        self._pending = torch.zeros(spec.channels, 0)  # samples from the next frame's start
        self._parts: list[Any] = []

    def push(self, wav: Any) -> None:
        """Append float32 audio ``[channels, n]``."""
        import torch

        if wav.shape[-1] == 0:
            return
        self.length += wav.shape[-1]
        if self.spec.segment is None:
            self._parts.append(wav)
            return
        self._pending = torch.cat([self._pending, wav], dim=-1)
        segment, stride = self.spec.segment, self.spec.stride
        assert stride is not None
        while self._pending.shape[-1] >= segment:
            self._encode(self._pending[:, :segment])
            self._pending = self._pending[:, stride:]

    def finish(self) -> None:
        """Encode what is left once the input has ended."""
        import torch

        if self.spec.segment is None:
            if self._parts:
                self._encode(torch.cat(self._parts, dim=-1))
                self._parts = []
            return
        assert self.spec.stride is not None
        # The frames encode() starts in the last (partial) segment: every stride up to the end.
        while self._pending.shape[-1] > 0 and self.frames * self.spec.stride < self.length:
            self._encode(self._pending[:, : self.spec.segment])
            self._pending = self._pending[:, self.spec.stride :]

    def _encode(self, segment: Any) -> None:
        import torch
        from encodec.binary import BitPacker

        with torch.no_grad():
            codes, scale = self.model._encode_frame(segment[None].to(self._device))
        if scale is not None:
            self.payload.write(SCALE.pack(scale.cpu().item()))
        codes = codes[0].cpu()  # [codebooks, steps]
        self.num_codebooks = codes.shape[0]
        packer = BitPacker(self.spec.bits, self.payload)
        for value in codes.T.reshape(-1).tolist():  # time-major, as encodec writes them
            packer.push(value)
        packer.flush()
        self.frames += 1


def header_bytes(metadata: dict[str, Any], version: int) -> bytes:
    """An ECDC header: upstream's JSON layout for version 0, compact JSON otherwise
    (as Encodec-Stream writes 192/193)."""
    if version == 0:
        dumped = json.dumps(metadata).encode("utf-8")
    else:
        dumped = json.dumps(metadata, separators=(",", ":")).encode("utf-8")
    return HEADER.pack(MAGIC, version, len(dumped)) + dumped


class Tags(NamedTuple):
    """What Encodec-Stream's header says about the audio besides its codes."""

    name: str | None = None  # the title ("n")
    source: str | None = None  # the source URL ("s")
    thumbnail: str | None = None  # the thumbnail URL ("t")


NO_TAGS = Tags()


def metadata_for(
    plan: Plan, audio_length: int, num_codebooks: int, tags: Tags = NO_TAGS
) -> dict[str, Any]:
    """Header metadata in Encodec-Stream's key order (``n``, ``s``, ``t`` when non-empty)."""
    metadata: dict[str, Any] = {
        "m": plan.model.name,
        "al": audio_length,
        "nc": num_codebooks,
        "lm": False,
        "br": plan.bitrate,
        "sr": plan.sample_rate,
    }
    for key, value in zip(("n", "s", "t"), tags, strict=True):
        if value:
            metadata[key] = value
    return metadata


class AtomicOutput:
    """The payload in a temp file next to ``path``; the header and payload land in
    ``path`` in one rename at :meth:`commit`, so a failed encode leaves no half file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.payload_path = self._create(".payload")
        self.payload = open(self.payload_path, "r+b")  # noqa: SIM115 (closed in close())

    def _create(self, suffix: str) -> Path:
        directory = self.path.parent
        for attempt in range(100):
            candidate = directory / f".{self.path.name}.{os.getpid()}-{attempt}{suffix}"
            try:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            return candidate
        raise FileExistsError(f"cannot create a temporary file in {directory}")

    def commit(self, header: bytes) -> None:
        final = self._create(".tmp")
        try:
            with open(final, "wb") as out:
                out.write(header)
                self.payload.flush()
                self.payload.seek(0)
                while chunk := self.payload.read(1 << 20):
                    out.write(chunk)
            os.replace(final, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(final)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Drop the temp payload (after a commit, or instead of one)."""
        if not self.payload.closed:
            self.payload.close()
        with contextlib.suppress(OSError):
            os.unlink(self.payload_path)


def encode_pcm(
    pcm: BinaryIO,
    path: Path,
    plan: Plan,
    device: str | None = None,
    *,
    tags: Tags = NO_TAGS,
    progress: Callable[[int], None] = lambda samples: None,
    warn: Callable[[str], None] = log.warning,
) -> dict[str, Any]:
    """Encode PCM (s16le, 2 channels, 48 kHz, or a 16-bit WAV file of 1 or 2 channels at
    any rate) read from ``pcm`` until EOF into ``path`` as ``plan`` says; the header
    metadata written.

    The input is read a second at a time and ``progress`` gets the samples (at 48 kHz) of
    each read;
    ``path`` is replaced atomically at the end (a failure leaves it as it was). ``warn``
    gets the message about trailing bytes that are not a whole stereo sample. ``device``:
    a torch device, None for CUDA when available, else the CPU. Raises
    :class:`EcdcError` (no audio in the input, an output that cannot be written).
    """
    from .torch_decoder import TorchDecoder, default_device, require_torch

    require_torch("encoding")
    pcm_input = PcmInput.open(pcm)
    spec = plan.model
    model = TorchDecoder(spec, device or default_device()).model
    model.set_target_bandwidth(plan.bandwidth)
    resampler = None
    if plan.sample_rate != pcm_input.rate:
        import soxr

        resampler = soxr.ResampleStream(pcm_input.rate, plan.sample_rate, spec.channels, "float32")
    try:
        output = AtomicOutput(path)
    except OSError as exc:
        raise EcdcError(f"cannot write next to {path}: {exc.strerror or exc}") from None
    try:
        writer = FrameWriter(model, spec, output.payload)
        trailing = _push_pcm(pcm_input, writer, resampler, progress)
        if trailing:
            warn(f"ignoring {trailing} trailing bytes (not a whole stereo sample)")
        writer.finish()
        if writer.frames == 0 or writer.num_codebooks is None:
            raise EcdcError("no audio on stdin: nothing to encode")
        metadata = metadata_for(plan, writer.length, writer.num_codebooks, tags)
        output.commit(header_bytes(metadata, plan.version))
    except BaseException:
        output.close()
        raise
    return metadata


def _push_pcm(
    pcm: PcmInput, writer: FrameWriter, resampler: Any, progress: Callable[[int], None]
) -> int:
    """Push PCM from ``pcm`` until EOF into ``writer`` (through ``resampler``, a soxr
    stream, unless None); the number of trailing bytes left over."""
    import torch

    pending = b""
    while True:
        chunk = pcm.read(pcm.rate * pcm.block_align)  # a second at a time
        data = pending + chunk
        usable = len(data) - len(data) % pcm.block_align
        pending = data[usable:]
        samples = np.frombuffer(data[:usable], "<i2").reshape(-1, pcm.channels).T
        wav = int16_to_float(samples)
        if writer.spec.channels == 1 and pcm.channels == 2:
            wav = wav.mean(dim=0, keepdim=True)
        elif writer.spec.channels == 2 and pcm.channels == 1:
            wav = wav.expand(2, -1)  # mono on both channels, as the decoder plays it back
        if resampler is not None:
            wav = torch.from_numpy(
                resampler.resample_chunk(wav.T.contiguous().numpy(), last=not chunk).T.copy()
            )
        writer.push(wav)
        progress(samples.shape[1] * PCM_RATE // pcm.rate)
        if not chunk:
            return len(pending)
