"""Random access to an .ecdc file as the bytes of a WAV file.

Bytes map to samples, samples to the frames whose decoded output overlaps them; those
frames come from the shared :class:`~ecdcfs.scheduler.FrameScheduler` (decoded once) and
are blended with encodec's triangular overlap-add, reproduced sample for sample. A 24 kHz
file (one frame) is decoded instead in the fixed chunks of :mod:`ecdcfs.causal`, cached
the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .causal import ChunkGrid, decode_chunk, packed_steps
from .codec import (
    CHECKPOINTS,
    LM_CHECKPOINTS,
    Codec,
    DecodedFrame,
    ModelUnavailable,
    decode_lm_steps,
    overlap_add_weights,
    read_scale,
)
from .container import (
    MODELS,
    SCALE,
    ContainerError,
    Header,
    ModelSpec,
    read_header,
    unpack_codes,
)
from .index import DEFAULT_CACHE_DIR_MB, CodeIndex, IndexStore, Unit
from .scheduler import Batch, FrameScheduler
from .source import ByteSource, MemorySource, as_stream
from .wav import WavLayout, float_to_pcm16

log = logging.getLogger(__name__)
T = TypeVar("T")

# Read-ahead never asks for more than this share of the cache, so it cannot evict itself.
READ_AHEAD_CACHE_SHARE = 4
MAX_READ_AHEAD_FRAMES = 64


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ecdcfs`` (``~/.cache/ecdcfs``): where LM code indexes persist."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ecdcfs"


@dataclass
class Settings:
    """Everything a user can tune about decoding."""

    device: str | None = None  # None: cuda when available, else cpu
    cache_mb: int = 512  # decoded-frame cache cap
    bufsize: int = 1  # initial read-ahead window, in frames; grows by this much per step
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None: no persistence
    cache_dir_mb: int | None = DEFAULT_CACHE_DIR_MB  # cap of cache_dir (LRU); None: no cap


def _torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch (it costs seconds)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("TORCH_HOME") or os.path.join(cache, "torch")) / "hub"


def checkpoint_fingerprint(file_name: str) -> tuple:
    """The checkpoint ``file_name`` as it is now: its path and its size, mtime and inode
    (None for a missing file). No torch needed."""
    path = _torch_hub_dir() / "checkpoints" / file_name
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class _Failure:
    """A model that could not be loaded, and its checkpoint's fingerprint before trying."""

    error: ModelUnavailable
    fingerprint: tuple


def wav_layout(header: Header) -> WavLayout:
    """The WAV file that presents this header's audio."""
    return WavLayout(
        header.model.channels, header.sample_rate, header.audio_length, header.title, header.source
    )


def chunk_grid(header: Header) -> ChunkGrid | None:
    """The fixed decode chunks of a segment-less (24 kHz) file; None for framed files."""
    if header.model.segment is not None:
        return None
    return ChunkGrid(header.layout.code_steps(0), header.model.hop)


def units_covering(header: Header, start: int, stop: int) -> range:
    """Decode units (48 kHz: frames; 24 kHz: chunks) whose output overlaps ``[start, stop)``."""
    chunks = chunk_grid(header)
    if chunks is None:
        return header.layout.frames_covering(start, stop)
    return chunks.covering(start, stop)


def probe(path: Path) -> WavLayout:
    """WAV layout of an .ecdc file from its header alone (no decoding, no torch)."""
    with open(path, "rb") as f:
        return wav_layout(read_header(f, os.fstat(f.fileno()).st_size))


class Engine:
    """Decoding machinery shared by every open file: models, frame cache, code indexes."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.scheduler = FrameScheduler(self.settings.cache_mb << 20)
        cap = self.settings.cache_dir_mb
        self.indexes = IndexStore(
            self.settings.cache_dir, max_bytes=None if cap is None else cap << 20
        )
        self._codecs: dict[str, Codec] = {}
        # Load failures by what failed ("encodec_48khz", "encodec_48khz LM"); see _load.
        self._failures: dict[str, _Failure] = {}
        self._codec_lock = threading.Lock()

    @property
    def max_read_ahead(self) -> int:
        frame_bytes = 2 * 48_000 * 4  # a 48 kHz stereo float32 frame, the common case
        share = self.scheduler.capacity_bytes // (READ_AHEAD_CACHE_SHARE * frame_bytes)
        return max(self.settings.bufsize, min(MAX_READ_AHEAD_FRAMES, share))

    def codec(self, spec: ModelSpec) -> Codec:
        """The loaded model for ``spec``, loaded on first use (see :meth:`_load` for failures)."""
        with self._codec_lock:
            codec = self._codecs.get(spec.name)
            if codec is None:
                from .codec import default_device

                device = self.settings.device or default_device()
                codec = self._load(spec.name, CHECKPOINTS[spec.name], lambda: Codec(spec, device))
                self._codecs[spec.name] = codec
            return codec

    def lm(self, spec: ModelSpec) -> Any:
        """The language model of ``spec``'s model, for LM-coded files (see :meth:`_load`)."""
        codec = self.codec(spec)
        with self._codec_lock:
            return self._load(f"{spec.name} LM", LM_CHECKPOINTS[spec.name], lambda: codec.lm)

    def _load(self, what: str, checkpoint: str, load: Callable[[], T]) -> T:
        """``load()`` of ``what``, whose checkpoint file is ``checkpoint``; with the lock held.

        A failure is logged once and remembered with the checkpoint's fingerprint: until
        the file changes (copied in, a partial copy completed) it is raised again without
        a new attempt, so an offline mount does not try a download at every read.
        """
        failure = self._failures.get(what)
        fingerprint = checkpoint_fingerprint(checkpoint)
        if failure is not None and failure.fingerprint == fingerprint:
            raise failure.error
        try:
            value = load()
        except ModelUnavailable as exc:
            log.error("%s", exc)
            self._failures[what] = _Failure(exc, fingerprint)
            raise
        if self._failures.pop(what, None) is not None:
            log.info("%s loaded: its checkpoint %s was found", what, checkpoint)
        return value

    def failure(self, spec: ModelSpec, use_lm: bool) -> str | None:
        """Why files of ``spec`` (LM-coded if ``use_lm``) cannot be decoded now; loads nothing.

        None if no load failed, or if the checkpoint changed since (the next read tries it).
        """
        needed = [(spec.name, CHECKPOINTS[spec.name])]
        if use_lm:
            needed.append((f"{spec.name} LM", LM_CHECKPOINTS[spec.name]))
        for what, checkpoint in needed:
            failure = self._failures.get(what)  # no lock: it is held while a model loads
            if failure is not None and failure.fingerprint == checkpoint_fingerprint(checkpoint):
                return str(failure.error)
        return None

    def loaded_codec(self, spec: ModelSpec) -> Codec | None:
        """The model for ``spec`` if it is already loaded (never loads it)."""
        with self._codec_lock:
            return self._codecs.get(spec.name)

    def warm_up(self, names: Collection[str] = tuple(MODELS)) -> None:
        """Load the models ``names`` whose checkpoints are on disk, so first reads are fast.

        Meant for a background thread right after the daemon forks; it lowers that
        thread's priority so listings right after mounting stay fast. A model that fails
        here fails again (once, clearly) at the first read that needs it. (Each model
        costs memory: ~660 MiB of RSS for the 48 kHz one with torch, so load only those
        the files use.)
        """
        with contextlib.suppress(OSError):  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        for name in names:
            spec = MODELS[name]
            if (_torch_hub_dir() / "checkpoints" / CHECKPOINTS[name]).exists():
                with contextlib.suppress(ModelUnavailable):
                    self.codec(spec)

    def open(self, path: Path, data: bytes | None = None) -> AudioFile:
        """Validate an .ecdc file (its bytes, or read from ``path``) as an :class:`AudioFile`.

        Raises :class:`EcdcError` if the file is unusable.
        """
        if data is None:
            data = Path(path).read_bytes()
        return self.open_source(str(path), MemorySource(data))

    def open_source(self, name: str, source: ByteSource) -> AudioFile:
        """An :class:`AudioFile` over any byte source (``name`` is for messages)."""
        header = read_header(as_stream(source, block=1), source.size)  # exactly the header
        return AudioFile(self, name, source, header)

    def close(self) -> None:
        self.scheduler.close()


class AudioFile:
    """One version of an .ecdc file, readable as WAV bytes at any offset.

    Local files are snapshotted in memory (compressed audio is tens of kbps), so every
    handle sees one version of the file; the source's identity (the content hash) keys the
    shared frame cache, so a replaced file never serves stale frames.
    """

    def __init__(self, engine: Engine, name: str, source: ByteSource, header: Header) -> None:
        self.engine = engine
        self.name = name
        self.header = header
        self.layout = header.layout
        self.wav = wav_layout(header)
        self.size = self.wav.size
        self.identity = source.identity
        self._source = source
        # Segment-less (24 kHz) files decode in fixed chunks; the reader's units are chunks.
        self._chunks = chunk_grid(header)
        self.unit_count = self.layout.frame_count if self._chunks is None else self._chunks.count
        self._wav_header = self.wav.header
        self._index: CodeIndex | None = None
        self._index_lock = threading.Lock()

    def reader(self) -> Reader:
        """A handle with its own read-ahead window."""
        return Reader(self)

    def read(self, offset: int, size: int, reader: Reader | None = None) -> bytes:
        """WAV bytes ``[offset, offset + size)``, short at end of file."""
        stop = min(offset + size, self.size)
        if offset >= stop:
            return b""
        header_size = len(self._wav_header)
        head = self._wav_header[offset:stop]
        if stop <= header_size:
            return head
        data_start, data_stop = max(offset, header_size) - header_size, stop - header_size
        first, last = self.wav.samples_for_bytes(data_start, data_stop)
        pcm = float_to_pcm16(self.samples(first, last, reader))
        skip = data_start - first * self.wav.block_align
        return head + pcm[skip : skip + data_stop - data_start]

    def samples(self, start: int, stop: int, reader: Reader | None = None) -> np.ndarray:
        """Decoded float32 audio ``[channels, stop - start]``, equal to encodec's decode."""
        chunks = self._chunks
        needed = units_covering(self.header, start, stop)
        futures = {i: self.frame(i) for i in needed}  # urgent: never None
        if reader is not None:
            reader.read_ahead(needed)
        frames = {i: future.result() for i, future in futures.items()}
        if chunks is None:
            return self._overlap_add(frames, start, stop)
        pieces = []
        for i, chunk in sorted(frames.items()):  # consecutive, no overlap
            first = chunks.start_sample(i)
            pieces.append(chunk.audio[:, max(start, first) - first : stop - first])
        return np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]

    def unit_key(self, index: int) -> tuple:
        """Cache key of frame (or, for a 24 kHz file, chunk) ``index``."""
        return (self.identity, index if self._chunks is None else ("c", index))

    def frame(self, index: int, urgent: bool = True) -> Future | None:
        """Future decoded frame (24 kHz: chunk) ``index``, shared through the engine's cache.

        For an LM-coded file the caller first waits (urgent) for the index to reach the
        unit (the index holds a 24 kHz file's codes in blocks of one chunk), so the decode
        worker never blocks on indexing; read-ahead of a unit not indexed yet returns None.
        """
        key = self.unit_key(index)
        if self.header.use_lm and not self.engine.scheduler.is_cached(key):
            if urgent:
                self._lm_index().get(index)
            elif not self._lm_index().has(index):
                return None
        if self._chunks is not None:
            produce = functools.partial(self._decode_chunk, index)
            return self.engine.scheduler.request(key, produce, urgent)
        return self.engine.scheduler.request(
            key, functools.partial(self._decode, index), urgent, self._batch(index)
        )

    def _batch(self, index: int) -> Batch | None:
        """How frame ``index`` joins other frames of its length in one GPU decode call."""
        codec = self.engine.loaded_codec(self.header.model)
        if codec is None or codec.batch_size == 1:
            return None
        steps = self.layout.code_steps(index)
        key = (codec.spec.name, self.layout.num_codebooks, steps)
        return Batch(
            key, codec.batch_size, functools.partial(self._inputs, index), codec.decode_frames
        )

    def _overlap_add(self, frames: dict[int, DecodedFrame], start: int, stop: int) -> np.ndarray:
        """encodec's ``_linear_overlap_add`` restricted to ``[start, stop)``, same float order."""
        weights = overlap_add_weights(self.layout.decoded_length(0))
        out = np.zeros((self.wav.channels, stop - start), dtype=np.float32)
        weight_sum = np.zeros(stop - start, dtype=np.float32)
        for i, frame in sorted(frames.items()):
            frame_start = self.layout.frame_start(i)
            lo = max(start, frame_start)
            hi = min(stop, frame_start + frame.audio.shape[-1])
            span = slice(lo - frame_start, hi - frame_start)
            out[:, lo - start : hi - start] += weights[span] * frame.audio[:, span]
            weight_sum[lo - start : hi - start] += weights[span]
        return out / weight_sum

    def _decode(self, index: int) -> DecodedFrame:
        return self.engine.codec(self.header.model).decode_frame(*self._inputs(index))

    def _inputs(self, index: int) -> tuple[np.ndarray, float | None]:
        """Codes (int64) and scale of frame ``index``, checked."""
        scale, codes = self._lm_index().get(index) if self.header.use_lm else self._codes(index)
        if scale is not None and not math.isfinite(scale):
            raise ContainerError(f"frame {index} has a non-finite scale {scale}")
        return codes.astype(np.int64), scale

    def _decode_chunk(self, index: int) -> DecodedFrame:
        """Decode 24 kHz chunk ``index`` with its warm-up steps (see :mod:`ecdcfs.causal`)."""
        codec = self.engine.codec(self.header.model)
        first, kept, stop = self._chunks.span(index)  # type: ignore[union-attr]
        if self.header.use_lm:
            codes = self._lm_steps(first, stop)
        else:
            base = self.header.payload_offset
            codes = packed_steps(
                lambda offset, size: self._source.read(base + offset, size),
                self.layout.num_codebooks,
                self.header.model.bits,
                first,
                stop,
            )
        return decode_chunk(codec, codes.astype(np.int64), kept - first)

    def _codes(self, index: int) -> tuple[float | None, np.ndarray]:
        """Scale and codes of a bit-packed frame, located from the header alone."""
        layout, model = self.layout, self.header.model
        offset = self.header.payload_offset + layout.plain_frame_offset(index)
        raw = self._source.read(offset, layout.plain_frame_bytes(index))
        scale = None
        if model.normalize:
            if len(raw) < SCALE.size:
                raise ContainerError(f"frame {index} truncated")
            (scale,) = SCALE.unpack_from(raw)
            raw = raw[SCALE.size :]
        codes = unpack_codes(raw, layout.num_codebooks, layout.code_steps(index), model.bits)
        return scale, codes

    def _lm_steps(self, start: int, stop: int) -> np.ndarray:
        """Codes of steps ``[start, stop)`` of an LM-coded 24 kHz file, from its index."""
        block = self._chunks.chunk_steps  # type: ignore[union-attr]
        index = self._lm_index()
        blocks = range(start // block, (stop - 1) // block + 1)
        codes = np.concatenate([index.get(b)[1] for b in blocks], axis=1)
        return codes[:, start - blocks.start * block : stop - blocks.start * block]

    def _lm_index(self) -> CodeIndex:
        """The shared code index of this LM-coded file, building in the background."""
        with self._index_lock:
            if self._index is None:
                index = self.engine.indexes.get(
                    self.identity, self.unit_count, self.layout.num_codebooks, self._unit_steps
                )
                if not index.complete and index.error is None:
                    # Building needs the model and its LM: a missing checkpoint fails this
                    # read (and heals with the checkpoint), not the file's index for good.
                    self.engine.lm(self.header.model)
                self.engine.indexes.build(
                    self.identity,
                    index,
                    self._scan,
                    os.path.basename(self.name),
                    "frames" if self._chunks is None else "chunks",
                )
                self._index = index
            return self._index

    def _unit_steps(self, unit: int) -> int:
        """Code steps of decode unit ``unit`` (a frame, or a 24 kHz chunk's kept steps)."""
        if self._chunks is None:
            return self.layout.code_steps(unit)
        _, kept, stop = self._chunks.span(unit)
        return stop - kept

    def code_index(self) -> CodeIndex | None:
        """The code index of an LM-coded file (its build starts now); None for others."""
        return self._lm_index() if self.header.use_lm else None

    def _scan(self, first: int, offset: int) -> Iterator[Unit]:
        """Entropy-decode LM-coded units from ``first`` at payload ``offset`` (for the index).

        A 48 kHz file yields frames from ``first``; a 24 kHz file's single stream can only
        be decoded from its start, so it yields blocks of one chunk's steps from block 0.
        """
        base, lm = self.header.payload_offset, self.engine.lm(self.header.model)
        layout, model = self.layout, self.header.model
        if self._chunks is not None:
            stream = as_stream(self._source, base)
            steps = layout.code_steps(0)
            blocks = decode_lm_steps(
                lm, stream, layout.num_codebooks, steps, self._chunks.chunk_steps
            )
            for number, codes in enumerate(blocks):
                yield number, None, codes, stream.tell() - base
            return
        stream = as_stream(self._source, base + offset)
        for frame in range(first, layout.frame_count):
            scale = read_scale(stream) if model.normalize else None
            steps = layout.code_steps(frame)
            (codes,) = decode_lm_steps(lm, stream, layout.num_codebooks, steps, steps)
            yield frame, scale, codes, stream.tell() - base


class Reader:
    """One open handle: reads plus a growing read-ahead window (Encodec-Stream's idea).

    A reader moving forward gets a window that starts at ``bufsize`` frames and grows by
    ``bufsize`` each time it advances into a new frame; a seek starts a new window.
    """

    def __init__(self, audio: AudioFile) -> None:
        self.audio = audio
        self._lock = threading.Lock()  # the kernel sends concurrent reads on one handle
        self.window = 0
        self._last: range | None = None
        self._ahead: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        return self.audio.read(offset, size, self)

    def read_ahead(self, needed: range) -> None:
        """Queue the frames after ``needed`` that this reader will probably want next."""
        if not needed:
            return
        with self._lock:
            self._plan(needed)

    def _plan(self, needed: range) -> None:
        engine = self.audio.engine
        bufsize = engine.settings.bufsize
        last = self._last
        if last is not None and last.start <= needed.start <= last.stop:
            if needed.stop > last.stop:
                self.window = min(self.window + bufsize, engine.max_read_ahead)
        else:
            self._cancel()
            self.window = bufsize
        self._last = needed
        stop = min(needed.stop + self.window, self.audio.unit_count)
        for index in range(needed.stop, stop):
            if index not in self._ahead:
                if self.audio.frame(index, urgent=False) is None:
                    break
                self._ahead.append(index)
        self._ahead = [i for i in self._ahead if i >= needed.start]

    def _cancel(self) -> None:
        for index in self._ahead:
            self.audio.engine.scheduler.cancel(self.audio.unit_key(index))
        self._ahead.clear()

    def close(self) -> None:
        with self._lock:
            self._cancel()
