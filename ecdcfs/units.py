"""Decode units: the pieces a file's audio is decoded in, each decoded once and cached.

A 48 kHz file decodes frame by frame (1 s segments every 47,520 samples) and its frames
blend with encodec's triangular overlap-add (:class:`Frames`). A 24 kHz file is one frame,
decoded in the fixed chunks of :mod:`ecdcfs.causal` and laid end to end (:class:`Chunks`).
Both answer the same questions — how many units, which cover a sample range, what a unit
decodes from, how decoded units assemble into samples, how an LM-coded file's codes are
scanned into its index — so :class:`~ecdcfs.audiofile.AudioFile` never asks which kind
it has.

A unit's codes come from a :class:`CodeSource`: the payload itself for bit-packed files
(:class:`PackedCodes`, located from the header alone), or the code index of an LM-coded
file (:class:`IndexedCodes`), which holds the same units (a 24 kHz index: blocks of one
chunk's code steps).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from typing import Any, Protocol

import numpy as np

from .causal import CHUNK_STEPS, CONTEXT_STEPS, ChunkGrid, decode_chunk, packed_steps
from .container import SCALE, ContainerError, EncodedFrame, Header, read_scale, unpack_codes
from .decoder import DecodedFrame, FrameDecoder, overlap_add_weights
from .index import CodeIndex, Unit
from .lm import decode_lm_steps
from .source import ByteSource, as_stream


class CodeSource(Protocol):
    """The codes of a file: a whole frame, or a range of code steps of a one-frame file."""

    def frame(self, index: int) -> EncodedFrame:
        """Codes ``[codebooks, steps]`` and scale of frame ``index``."""
        ...

    def steps(self, start: int, stop: int) -> np.ndarray:
        """Codes ``[codebooks, stop - start]`` of steps ``[start, stop)`` of frame 0."""
        ...


class PackedCodes:
    """Codes of a bit-packed file, read from the payload at offsets the header gives."""

    def __init__(self, header: Header, source: ByteSource) -> None:
        self._header = header
        self._layout = header.layout
        self._source = source

    def frame(self, index: int) -> EncodedFrame:
        layout, model = self._layout, self._header.model
        offset = self._header.payload_offset + layout.plain_frame_offset(index)
        raw = self._source.read(offset, layout.plain_frame_bytes(index))
        scale = None
        if model.normalize:
            if len(raw) < SCALE.size:
                raise ContainerError(f"frame {index} truncated")
            (scale,) = SCALE.unpack_from(raw)
            raw = raw[SCALE.size :]
        codes = unpack_codes(raw, layout.num_codebooks, layout.code_steps(index), model.bits)
        return EncodedFrame(codes, scale)

    def steps(self, start: int, stop: int) -> np.ndarray:
        base = self._header.payload_offset
        return packed_steps(
            lambda offset, size: self._source.read(base + offset, size),
            self._layout.num_codebooks,
            self._header.model.bits,
            start,
            stop,
        )


class IndexedCodes:
    """Codes of an LM-coded file, from its code index (waiting for the units needed)."""

    def __init__(self, index: CodeIndex, block_steps: int | None) -> None:
        self._index = index
        self._block_steps = block_steps  # steps per unit of a one-frame file's index

    def frame(self, index: int) -> EncodedFrame:
        return self._index.get(index)

    def steps(self, start: int, stop: int) -> np.ndarray:
        block = self._block_steps
        assert block is not None, "the index holds frames, not blocks of steps"
        blocks = range(start // block, (stop - 1) // block + 1)
        codes = np.concatenate([self._index.get(b).codes for b in blocks], axis=1)
        return codes[:, start - blocks.start * block : stop - blocks.start * block]


class DecodeUnits(ABC):
    """How the audio of a file with this header splits into decode units."""

    tag: str  # tells units of different kinds apart in the shared cache
    noun: str  # what the units are called in messages
    index_block_steps: int | None = None  # code steps per unit of a one-frame file's index

    def __init__(self, header: Header) -> None:
        self.header = header
        self.layout = header.layout

    @property
    @abstractmethod
    def count(self) -> int:
        """Number of units of the file."""

    @property
    @abstractmethod
    def decoded_bytes(self) -> int:
        """Bytes of one decoded unit at most (what read-ahead budgets with)."""

    @abstractmethod
    def covering(self, start: int, stop: int) -> range:
        """Units whose decoded output overlaps output samples ``[start, stop)``."""

    @abstractmethod
    def inputs(self, index: int, codes: CodeSource) -> EncodedFrame:
        """What unit ``index`` decodes from (checked)."""

    @abstractmethod
    def decode(self, codec: FrameDecoder, index: int, codes: CodeSource) -> DecodedFrame:
        """Decode unit ``index``."""

    @abstractmethod
    def assemble(
        self, codec: FrameDecoder, decoded: dict[int, DecodedFrame], start: int, stop: int
    ) -> np.ndarray:
        """Samples ``[start, stop)``, float32 ``[channels, n]``, from the units covering them
        (which ``codec`` decoded)."""

    @abstractmethod
    def lm_steps(self, unit: int) -> int:
        """Code steps that unit ``unit`` of an LM-coded file's index holds."""

    @abstractmethod
    def scan_lm(self, lm: Any, source: ByteSource, first: int, offset: int) -> Iterator[Unit]:
        """Entropy-decode an LM-coded file's units from ``first`` (at payload ``offset``)."""

    def batch_group(self, index: int) -> Hashable | None:
        """Units of one group may share one (GPU) decode call; None: never batched."""
        return None

    def code_source(self, source: ByteSource, index: CodeIndex | None) -> CodeSource:
        """Where this file's codes come from: its payload, or its LM code index."""
        if index is None:
            return PackedCodes(self.header, source)
        return IndexedCodes(index, self.index_block_steps)


class Frames(DecodeUnits):
    """A normalising (48 kHz) file's frames, blended with encodec's overlap-add."""

    tag, noun = "frame", "frames"

    @property
    def count(self) -> int:
        return self.layout.frame_count

    @property
    def decoded_bytes(self) -> int:
        return self.header.model.channels * self.layout.segment * 4

    def covering(self, start: int, stop: int) -> range:
        return self.layout.frames_covering(start, stop)

    def inputs(self, index: int, codes: CodeSource) -> EncodedFrame:
        frame = codes.frame(index)
        if frame.scale is not None and not math.isfinite(frame.scale):
            raise ContainerError(f"frame {index} has a non-finite scale {frame.scale}")
        return EncodedFrame(frame.codes.astype(np.int64), frame.scale)

    def decode(self, codec: FrameDecoder, index: int, codes: CodeSource) -> DecodedFrame:
        return codec.decode_frame(self.inputs(index, codes))

    def batch_group(self, index: int) -> Hashable:
        return (self.layout.num_codebooks, self.layout.code_steps(index))

    def assemble(
        self, codec: FrameDecoder, decoded: dict[int, DecodedFrame], start: int, stop: int
    ) -> np.ndarray:
        """encodec's ``_linear_overlap_add`` restricted to ``[start, stop)``, same float order.

        The output covers every frame, unlike encodec's, which is sized from the last
        frame alone (and crashes when the frame before it decodes further).
        """
        weights = overlap_add_weights(self.layout.decoded_length(0))
        out = np.zeros((self.header.model.channels, stop - start), dtype=np.float32)
        weight_sum = np.zeros(stop - start, dtype=np.float32)
        for i, frame in sorted(decoded.items()):
            frame_start = self.layout.frame_start(i)
            lo = max(start, frame_start)
            hi = min(stop, frame_start + frame.audio.shape[-1])
            span = slice(lo - frame_start, hi - frame_start)
            out[:, lo - start : hi - start] += weights[span] * frame.audio[:, span]
            weight_sum[lo - start : hi - start] += weights[span]
        return out / weight_sum

    def lm_steps(self, unit: int) -> int:
        return self.layout.code_steps(unit)

    def scan_lm(self, lm: Any, source: ByteSource, first: int, offset: int) -> Iterator[Unit]:
        """Frames from ``first`` on: each frame's codes are a stream of their own."""
        base, layout = self.header.payload_offset, self.layout
        stream = as_stream(source, base + offset)
        for frame in range(first, layout.frame_count):
            scale = read_scale(stream) if self.header.model.normalize else None
            steps = layout.code_steps(frame)
            (codes,) = decode_lm_steps(lm, stream, layout.num_codebooks, steps, steps)
            yield Unit(frame, scale, codes, stream.tell() - base)


class Chunks(DecodeUnits):
    """A one-frame (24 kHz) file's fixed chunks, each with its warm-up (see ``causal``)."""

    tag, noun = "chunk", "chunks"
    chunk_steps, context_steps = CHUNK_STEPS, CONTEXT_STEPS  # the grid (see ``causal``)

    def __init__(self, header: Header, chunk_steps: int | None = None) -> None:
        super().__init__(header)
        steps, hop = self.layout.code_steps(0), header.model.hop
        chunk_steps = chunk_steps or self.chunk_steps
        self.grid = ChunkGrid(steps, hop, chunk_steps, self.context_steps)
        self.index_block_steps = self.grid.chunk_steps

    @property
    def count(self) -> int:
        return self.grid.count

    @property
    def decoded_bytes(self) -> int:
        return self.header.model.channels * self.grid.chunk_steps * self.grid.hop * 4

    def covering(self, start: int, stop: int) -> range:
        return self.grid.covering(start, stop)

    def inputs(self, index: int, codes: CodeSource) -> EncodedFrame:
        first, _, stop = self.grid.span(index)
        return EncodedFrame(codes.steps(first, stop).astype(np.int64), None)

    def decode(self, codec: FrameDecoder, index: int, codes: CodeSource) -> DecodedFrame:
        first, kept, _ = self.grid.span(index)
        return decode_chunk(codec, self.inputs(index, codes).codes, kept - first)

    def assemble(
        self, codec: FrameDecoder, decoded: dict[int, DecodedFrame], start: int, stop: int
    ) -> np.ndarray:
        pieces = []
        for i, chunk in sorted(decoded.items()):  # consecutive, no overlap
            first = self.grid.start_sample(i)
            pieces.append(chunk.audio[:, max(start, first) - first : stop - first])
        return np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]

    def lm_steps(self, unit: int) -> int:
        _, kept, stop = self.grid.span(unit)
        return stop - kept

    def scan_lm(self, lm: Any, source: ByteSource, first: int, offset: int) -> Iterator[Unit]:
        """Blocks of one chunk's steps, from block 0: one stream decodable only from its start."""
        base, layout = self.header.payload_offset, self.layout
        stream = as_stream(source, base)
        blocks = decode_lm_steps(
            lm, stream, layout.num_codebooks, layout.code_steps(0), self.grid.chunk_steps
        )
        for number, codes in enumerate(blocks):
            yield Unit(number, None, codes, stream.tell() - base)


def decode_units(header: Header, chunk_steps: int | None = None) -> DecodeUnits:
    """The decode units of a file with this header: frames, or chunks of its one frame
    (of ``chunk_steps`` code steps, the grid's own by default)."""
    return Chunks(header, chunk_steps) if header.model.segment is None else Frames(header)
