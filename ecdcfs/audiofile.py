"""Random access to an .ecdc file as the bytes of a WAV file.

Bytes map to samples, samples to the decode units whose output overlaps them (48 kHz
frames or 24 kHz chunks: :mod:`ecdcfs.units`); units come from the shared
:class:`~ecdcfs.scheduler.DecodeScheduler` (decoded once) and assemble into samples that
equal encodec's decode.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .codec import (
    CHECKPOINTS,
    LM_CHECKPOINTS,
    DecodedFrame,
    FrameDecoder,
    ModelUnavailable,
    TorchCodec,
    default_device,
)
from .container import MODELS, EncodedFrame, Header, ModelSpec, read_header
from .index import CodeIndex, IndexStore, Unit
from .interrupts import Interrupts
from .scheduler import Batch, DecodeScheduler
from .settings import Settings, checkpoint_dir, default_threads
from .source import ByteSource, MemorySource, as_stream
from .units import CodeSource, decode_units
from .wav import WavLayout, float_to_pcm16

log = logging.getLogger(__name__)
T = TypeVar("T")

# Read-ahead never asks for more than this share of the cache, so it cannot evict itself.
READ_AHEAD_CACHE_SHARE = 4
MAX_READ_AHEAD_UNITS = 64


def checkpoint_fingerprint(file_name: str) -> tuple:
    """The checkpoint ``file_name`` as it is now: its path and its size, mtime and inode
    (None for a missing file). No torch needed."""
    path = checkpoint_dir() / file_name
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
        header.model.channels,
        header.sample_rate,
        header.audio_length,
        header.title,
        header.source,
        header.thumbnail,
    )


def probe(path: Path) -> WavLayout:
    """WAV layout of an .ecdc file from its header alone (no decoding, no torch)."""
    with open(path, "rb") as f:
        return wav_layout(read_header(f, os.fstat(f.fileno()).st_size))


class Engine:
    """Decoding machinery shared by every open file: frame decoders, unit cache, code indexes.

    Frames decode on ONNX Runtime (:mod:`ecdcfs.onnx_decoder`), several at once, unless
    the settings ask for encodec's own torch decode (``exact``, or a GPU), one at a time.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.device = self.settings.device or default_device()
        self.torch_decodes = self.settings.exact or self.device != "cpu"
        self.interrupts = Interrupts()
        self.scheduler = DecodeScheduler(
            self.settings.cache_mb << 20,
            workers=1 if self.torch_decodes else self.settings.threads or default_threads(),
            interrupts=None if self.torch_decodes else self.interrupts,  # torch runs to the end
        )
        cap = self.settings.cache_dir_mb
        self.indexes = IndexStore(
            self.settings.cache_dir, max_bytes=None if cap is None else cap << 20
        )
        self._codecs: dict[str, FrameDecoder] = {}
        self._lms: dict[str, Any] = {}
        # Load failures by what failed ("encodec_48khz", "encodec_48khz LM"); see _load.
        self._failures: dict[str, _Failure] = {}
        self._codec_lock = threading.Lock()

    def codec(self, spec: ModelSpec) -> FrameDecoder:
        """The frame decoder for ``spec``, loaded on first use (see :meth:`_load` for failures)."""
        with self._codec_lock:
            codec = self._codecs.get(spec.name)
            if codec is None:
                load = self._torch_codec if self.torch_decodes else self._onnx_decoder
                codec = self._load(spec.name, CHECKPOINTS[spec.name], lambda: load(spec))
                self._codecs[spec.name] = codec
            return codec

    def _torch_codec(self, spec: ModelSpec) -> TorchCodec:
        return TorchCodec(spec, self.device)

    def _onnx_decoder(self, spec: ModelSpec) -> FrameDecoder:
        """The ONNX Runtime decoder; encodec's own on the CPU (one warning) if there can be none."""
        try:
            from .onnx_decoder import load_onnx_decoder

            return load_onnx_decoder(spec, self.settings.cache_dir, self.interrupts)
        except ModelUnavailable:
            raise
        except Exception as exc:  # import, export, runtime: none may make files unreadable
            log.warning(
                "cannot decode %s with ONNX Runtime (%s): decoding with encodec's torch model",
                spec.name,
                exc,
            )
            return TorchCodec(spec, "cpu")

    def lm(self, spec: ModelSpec) -> Any:
        """The language model of ``spec``'s model, for LM-coded files (see :meth:`_load`)."""
        codec = self.codec(spec)
        with self._codec_lock:
            lm = self._lms.get(spec.name)
            if lm is None:
                checkpoint = LM_CHECKPOINTS[spec.name]
                lm = self._load(f"{spec.name} LM", checkpoint, lambda: self._load_lm(spec, codec))
                self._lms[spec.name] = lm
            return lm

    @staticmethod
    def _load_lm(spec: ModelSpec, codec: FrameDecoder) -> Any:
        """The LM (torch eager, as the encoder ran it), built from encodec's model: the
        exact decoder's, or one loaded just for this (and dropped after)."""
        exact = codec if isinstance(codec, TorchCodec) else TorchCodec(spec, "cpu")
        return exact.lm

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

    def loaded_codec(self, spec: ModelSpec) -> FrameDecoder | None:
        """The model for ``spec`` if it is already loaded (never loads it)."""
        with self._codec_lock:
            return self._codecs.get(spec.name)

    def warm_up(self, names: Collection[str] = tuple(MODELS)) -> None:
        """Load the models ``names`` whose checkpoints are on disk, so first reads are fast.

        Meant for a background thread right after the daemon forks; it lowers that
        thread's priority so listings right after mounting stay fast. A model that fails
        here fails again (once, clearly) at the first read that needs it. (Each model
        costs memory: ~160 MiB of RSS for the 48 kHz one on ONNX Runtime, ~660 MiB with
        torch, so load only those the files use.)
        """
        with contextlib.suppress(OSError):  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        for name in names:
            spec = MODELS[name]
            if (checkpoint_dir() / CHECKPOINTS[name]).exists():
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
    shared unit cache, so a replaced file never serves stale audio. Reads go through a
    :class:`Reader`; this class decodes units and serves them through the engine's cache.
    """

    def __init__(self, engine: Engine, name: str, source: ByteSource, header: Header) -> None:
        self.engine = engine
        self.name = name
        self.header = header
        self.layout = header.layout
        self.wav = wav_layout(header)
        self.size = self.wav.size
        self.identity = source.identity
        self.units = decode_units(header)
        self._source = source
        self._index: CodeIndex | None = None
        self._index_lock = threading.Lock()
        self._codes = self.units.code_source(source, None) if not header.use_lm else None

    @property
    def unit_count(self) -> int:
        return self.units.count

    @property
    def max_read_ahead(self) -> int:
        """Read-ahead window cap, in units: a share of the cache, so it cannot evict itself."""
        share = self.engine.scheduler.capacity_bytes // (
            READ_AHEAD_CACHE_SHARE * self.units.decoded_bytes
        )
        return max(self.engine.settings.bufsize, min(MAX_READ_AHEAD_UNITS, share))

    def reader(self) -> Reader:
        """A handle with its own read-ahead window."""
        return Reader(self, self.engine.settings.bufsize)

    def read(self, offset: int, size: int) -> bytes:
        """WAV bytes ``[offset, offset + size)``, short at end of file (no read-ahead)."""
        return Reader(self, bufsize=0).read(offset, size)

    def samples(self, start: int, stop: int) -> np.ndarray:
        """Decoded float32 audio ``[channels, stop - start]`` (no read-ahead)."""
        return Reader(self, bufsize=0).samples(start, stop)

    def request(self, index: int) -> Future:
        """Future decoded unit ``index``, shared through the engine's cache (urgent).

        For an LM-coded file this first waits for the index to reach the unit, so the
        decode worker never blocks on indexing.
        """
        key = self._key(index)
        if self.header.use_lm and not self.engine.scheduler.is_cached(key):
            self._lm_index().get(index)
        return self._schedule(index, urgent=True)

    def prefetch(self, index: int) -> bool:
        """Queue unit ``index`` as read-ahead; False if it cannot be yet (an LM-coded unit
        that is not indexed: read-ahead never waits for the index)."""
        unindexed = self.header.use_lm and not self._lm_index().has(index)
        if unindexed and not self.engine.scheduler.is_cached(self._key(index)):
            return False
        self._schedule(index, urgent=False)
        return True

    def _key(self, index: int) -> tuple:
        return (self.identity, self.units.tag, index)

    def _schedule(self, index: int, urgent: bool) -> Future:
        decode = functools.partial(self.decode, index)
        return self.engine.scheduler.request(self._key(index), decode, urgent, self._batch(index))

    def cancel(self, index: int) -> None:
        """Drop a queued read-ahead request for unit ``index``."""
        self.engine.scheduler.cancel(self._key(index))

    def decode(self, index: int) -> DecodedFrame:
        """Decode unit ``index`` now, bypassing the cache (the decode worker calls this)."""
        return self.units.decode(self.engine.codec(self.header.model), index, self._code_source())

    def assemble(self, decoded: dict[int, DecodedFrame], start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` from the decoded units covering them."""
        return self.units.assemble(self.engine.codec(self.header.model), decoded, start, stop)

    def inputs(self, index: int) -> EncodedFrame:
        """The codes (and scale) unit ``index`` decodes from."""
        return self.units.inputs(index, self._code_source())

    def _batch(self, index: int) -> Batch | None:
        """How unit ``index`` joins other units of its group in one GPU decode call."""
        codec = self.engine.loaded_codec(self.header.model)
        group = self.units.batch_group(index)
        if codec is None or codec.batch_size == 1 or group is None:
            return None
        inputs = functools.partial(self.inputs, index)
        return Batch((codec.spec.name, group), codec.batch_size, inputs, codec.decode_frames)

    def _code_source(self) -> CodeSource:
        if self._codes is None:
            self._codes = self.units.code_source(self._source, self._lm_index())
        return self._codes

    def _lm_index(self) -> CodeIndex:
        """The shared code index of this LM-coded file, building in the background."""
        with self._index_lock:
            if self._index is None:
                index = self.engine.indexes.get(
                    self.identity, self.units.count, self.layout.num_codebooks, self.units.lm_steps
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
                    self.units.noun,
                )
                self._index = index
            return self._index

    def code_index(self) -> CodeIndex | None:
        """The code index of an LM-coded file (its build starts now); None for others."""
        return self._lm_index() if self.header.use_lm else None

    def _scan(self, first: int, offset: int) -> Iterator[Unit]:
        """Entropy-decode LM-coded units from ``first`` at payload ``offset`` (for the index)."""
        lm = self.engine.lm(self.header.model)
        return self.units.scan_lm(lm, self._source, first, offset)


class Reader:
    """One open handle: WAV bytes at any offset, plus a growing read-ahead window.

    A reader moving forward gets a window that starts at ``bufsize`` units and grows by
    ``bufsize`` each time it advances into a new unit (Encodec-Stream's idea); a seek
    starts a new window. ``bufsize`` 0: no read-ahead. The reader drives a read: the units
    it needs, then its read-ahead, then the assembly; the file never calls back.
    """

    def __init__(self, audio: AudioFile, bufsize: int) -> None:
        self.audio = audio
        self.bufsize = bufsize
        self._lock = threading.Lock()  # the kernel sends concurrent reads on one handle
        self.window = 0
        self._last: range | None = None
        self._ahead: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        """WAV bytes ``[offset, offset + size)``, short at end of file."""
        wav = self.audio.wav
        stop = min(offset + size, self.audio.size)
        if offset >= stop:
            return b""
        header = wav.header
        head = header[offset:stop]
        if stop <= len(header):
            return head
        data_start, data_stop = max(offset, len(header)) - len(header), stop - len(header)
        first, last = wav.samples_for_bytes(data_start, data_stop)
        pcm = float_to_pcm16(self.samples(first, last))
        skip = data_start - first * wav.block_align
        return head + pcm[skip : skip + data_stop - data_start]

    def samples(self, start: int, stop: int) -> np.ndarray:
        """Decoded float32 audio ``[channels, stop - start]``, equal to encodec's decode."""
        audio = self.audio
        needed = audio.units.covering(start, stop)
        futures = {i: audio.request(i) for i in needed}
        if self.bufsize and needed:
            with self._lock:
                self._plan(needed)
        decoded = {i: future.result() for i, future in futures.items()}
        return audio.assemble(decoded, start, stop)

    def _plan(self, needed: range) -> None:
        """Queue the units after ``needed`` that this reader will probably want next."""
        last = self._last
        if last is not None and last.start <= needed.start <= last.stop:
            if needed.stop > last.stop:
                self.window = min(self.window + self.bufsize, self.audio.max_read_ahead)
        else:
            self._cancel()
            self.window = self.bufsize
        self._last = needed
        stop = min(needed.stop + self.window, self.audio.unit_count)
        for index in range(needed.stop, stop):
            if index not in self._ahead:
                if not self.audio.prefetch(index):
                    break
                self._ahead.append(index)
        self._ahead = [i for i in self._ahead if i >= needed.start]

    def _cancel(self) -> None:
        for index in self._ahead:
            self.audio.cancel(index)
        self._ahead.clear()

    def close(self) -> None:
        with self._lock:
            self._cancel()
