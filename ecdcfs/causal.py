"""Bounded-memory random access into ``encodec_24khz`` files: a fixed chunk grid with warm-up.

A 24 kHz file is one frame: every code step of the file, no scale. encodec decodes it in
one piece (~17 MB of working memory per second of audio). Its SEANet decoder is causal
(left-padded convolutions, right-trimmed transposed convolutions, a 2-layer LSTM at the
code rate), so output samples ``[s * 320, (s + 1) * 320)`` depend only on code steps
``<= s`` — measured: decoding the first ``n`` steps reproduces the first ``n * 320``
samples of the whole-file decode for every ``n >= 7``. Two things break the converse, and
bound where a decode may start: the decoder's first convolutions reflect-pad at the left
edge (the first ~7 steps also depend on the steps after them), and the LSTM starts from a
zero state instead of the state the file's earlier steps would have left.

So ecdcfs decodes on a fixed grid of chunks of :data:`CHUNK_STEPS` code steps (5 s).
Chunk ``k`` decodes steps ``[k * C - X, (k + 1) * C)`` with the model's own
``_decode_frame`` (``quantizer.decode`` then ``decoder``) and discards the output of the
:data:`CONTEXT_STEPS` (``X``, 1 s) warm-up steps, by which time the LSTM state and the
edge padding no longer matter. Chunk 0 needs no warm-up: it starts where the file does, and
a file of one chunk is decoded exactly as encodec does. Each chunk is a deterministic
function of the file, cached in the engine's frame cache like a 48 kHz frame, so every
access pattern gives the same bytes.

Measured on the seeded random-init test model (60 s file, 6 kbps, CPU), max |difference|
to the whole-file decode after int16 rounding, by warm-up: 0 steps: 11,889 LSB; 4 steps:
8,897; 16 steps (0.21 s): 10; 38 steps (0.5 s) and anything longer (1, 2, 5, 10 s): 1 LSB,
with float differences of ~5e-7 — the noise floor of running the same convolutions on a
different length, which is also why the bound is 1 LSB and not 0. The pretrained LSTM may
remember longer than this random one; 1 s (75 steps, 2x the measured convergence) is the
margin, and :data:`CONTEXT_STEPS` is the knob. (10 s chunks with 2 s of warm-up measured
the same error but needed ~390 MB of working memory, which put a streaming daemon right at
1 GB; 5 s + 1 s halves that at the same 1.2x cost.)

Costs, in decoded code steps per kept step: sequential reads ``(C + X) / C`` = 1.2; a cold
read decodes one chunk with its warm-up (6 s of codes), or two when it straddles a chunk
boundary; working memory is that of a 6 s decode (~250-300 MB at its peak, handed back to the
OS after each chunk) whatever the file length.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .container import EncodedFrame, unpack_codes
from .decoder import DecodedFrame, FrameDecoder

CHUNK_STEPS = 375  # 5 s at 75 code steps per second
CONTEXT_STEPS = 75  # 1 s of warm-up decoded before each chunk after the first, then dropped


@dataclass(frozen=True)
class ChunkGrid:
    """The fixed chunks of a one-frame (segment-less) file of ``steps`` code steps."""

    steps: int
    hop: int
    chunk_steps: int = CHUNK_STEPS
    context_steps: int = CONTEXT_STEPS

    @property
    def count(self) -> int:
        return -(-self.steps // self.chunk_steps)

    def span(self, index: int) -> tuple[int, int, int]:
        """``(first decoded step, first kept step, stop step)`` of chunk ``index``."""
        kept = index * self.chunk_steps
        return max(0, kept - self.context_steps), kept, min(self.steps, kept + self.chunk_steps)

    def start_sample(self, index: int) -> int:
        """First output sample of chunk ``index``."""
        return index * self.chunk_steps * self.hop

    def covering(self, start: int, stop: int) -> range:
        """Chunks whose output overlaps samples ``[start, stop)``."""
        if stop <= start or self.count == 0:
            return range(0)
        samples = self.chunk_steps * self.hop
        return range(start // samples, min(self.count - 1, (stop - 1) // samples) + 1)


def packed_steps(
    read: Callable[[int, int], bytes], num_codebooks: int, bits: int, start: int, stop: int
) -> np.ndarray:
    """Codes ``[codebooks, stop - start]`` of steps ``[start, stop)`` of a bit-packed frame.

    ``read(offset, size)`` reads the frame's packed codes; step ``s`` starts at bit
    ``s * num_codebooks * bits``, which need not be a byte boundary.
    """
    first_bit = start * num_codebooks * bits
    end_byte = -(-(first_bit + (stop - start) * num_codebooks * bits) // 8)
    raw = read(first_bit // 8, end_byte - first_bit // 8)
    return unpack_codes(raw, num_codebooks, stop - start, bits, first_bit % 8)


def decode_chunk(codec: FrameDecoder, codes: np.ndarray, warm_up: int) -> DecodedFrame:
    """Decode ``codes`` (a chunk and its warm-up) and keep the output after ``warm_up`` steps."""
    audio = codec.decode_frame(EncodedFrame(codes, None)).audio
    kept = audio[:, warm_up * codec.spec.hop :].copy()  # the cache must not hold the warm-up
    del audio
    _release_free_memory()
    return DecodedFrame(kept)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Give a decode's ~300 MB of freed activations back to the OS (glibc keeps them)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
