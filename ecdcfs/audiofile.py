"""Random access to an .ecdc file as the bytes of a WAV file.

Bytes map to samples, samples to the decode units whose output overlaps them (48 kHz
frames or 24 kHz chunks: :mod:`ecdcfs.units`); units come from the shared
:class:`~ecdcfs.scheduler.DecodeScheduler` (decoded once) and assemble into samples that
equal encodec's decode.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .container import EncodedFrame, Header, read_header
from .decoder import DecodedFrame
from .index import CodeIndex, Unit
from .source import ByteSource
from .units import CodeSource, decode_units
from .wav import WavLayout, float_to_pcm16

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

# Read-ahead never asks for more than this share of the cache, so it cannot evict itself.
READ_AHEAD_CACHE_SHARE = 4
MAX_READ_AHEAD_UNITS = 64
# Library scanners read at most this much audio from the start of a file, then close it
# (MediaInfo: its first MiB, ffprobe 288 KiB, gst-discoverer 23 KiB): a handle of the mount
# starts read-ahead only once it has read more in one sequential run.
SCANNER_READ_BYTES = 5 << 18  # 1.25 MiB


def wav_layout(header: Header, riff_info: bool = False) -> WavLayout:
    """The WAV file that presents this header's audio (``riff_info``: see WavLayout)."""
    return WavLayout(
        header.model.channels,
        header.sample_rate,
        header.audio_length,
        header.title,
        header.source,
        header.thumbnail,
        riff_info,
    )


def wav_layout_of(path: Path) -> WavLayout:
    """WAV layout of an .ecdc file from its header alone (no decoding, no torch)."""
    with open(path, "rb") as f:
        return wav_layout(read_header(f, os.fstat(f.fileno()).st_size))


class AudioFile:
    """One version of an .ecdc file, readable as WAV bytes at any offset.

    Local files are snapshotted in memory (compressed audio is tens of kbps), so every
    handle sees one version of the file; the source's identity (the content hash) keys the
    shared unit cache, so a replaced file never serves stale audio. Reads go through a
    :class:`Reader`; this class decodes units and serves them through the engine's cache.
    """

    def __init__(
        self,
        engine: Engine,
        name: str,
        source: ByteSource,
        header: Header,
        riff_info: bool = False,
    ) -> None:
        self.engine = engine
        self.name = name
        self.header = header
        self.layout = header.layout
        self.wav = wav_layout(header, riff_info)
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

    def reader(self, read_ahead_after: int = 0) -> Reader:
        """A handle with its own read-ahead window, which opens once the handle has read
        ``read_ahead_after`` bytes of audio in one sequential run."""
        return Reader(self, self.engine.settings.bufsize, read_ahead_after)

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
        inputs = functools.partial(self.inputs, index)
        batch = self.engine.batch(self.header.model, self.units.batch_group(index), inputs)
        return self.engine.scheduler.request(self._key(index), decode, urgent, batch)

    def cancel(self, index: int) -> None:
        """Drop a queued read-ahead request for unit ``index``."""
        self.engine.scheduler.cancel(self._key(index))

    def decode(self, index: int) -> DecodedFrame:
        """Decode unit ``index`` now, bypassing the cache (the decode worker calls this)."""
        return self.units.decode(self.engine.decoder(self.header.model), index, self._code_source())

    def assemble(self, decoded: dict[int, DecodedFrame], start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` from the decoded units covering them."""
        return self.units.assemble(self.engine.decoder(self.header.model), decoded, start, stop)

    def inputs(self, index: int) -> EncodedFrame:
        """The codes (and scale) unit ``index`` decodes from."""
        return self.units.inputs(index, self._code_source())

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
                    self.engine.decoder(self.header.model)  # the model's failure first
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
        """Entropy-decode LM-coded units from ``first`` at payload ``offset`` (for the index),
        in the LM's child process, which gets the file's bytes (those that can matter)."""
        lm = self.engine.lm(self.header.model)
        data = self._source.read(0, min(self._source.size, self.header.payload_bound))
        return lm.scan(data, first, offset, self.units.index_block_steps)


class Reader:
    """One open handle: WAV bytes at any offset, plus a growing read-ahead window.

    A reader moving forward gets a window that starts at ``bufsize`` units and grows by
    ``bufsize`` each time it advances into a new unit (Encodec-Stream's idea); a seek
    starts a new sequential run, and the window opens only once the run has read
    ``read_ahead_after`` bytes of audio (a scanner reading the start of a file and closing
    it never decodes more than it read). ``bufsize`` 0: no read-ahead. The reader drives a
    read: the units it needs, then its read-ahead, then the assembly; the file never calls
    back.
    """

    def __init__(self, audio: AudioFile, bufsize: int, read_ahead_after: int = 0) -> None:
        self.audio = audio
        self.bufsize = bufsize
        self.read_ahead_after = read_ahead_after
        self._lock = threading.Lock()  # the kernel sends concurrent reads on one handle
        self.window = 0
        self._run: tuple[int, int] | None = None  # samples read in this sequential run
        self._last: range | None = None
        self._ahead: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        """WAV bytes ``[offset, offset + size)``, short at end of file."""
        wav = self.audio.wav
        stop = min(offset + size, self.audio.size)
        if offset >= stop:
            return b""
        header, data_stop = wav.header, wav.pcm_end
        head = header[offset:stop]
        tail = wav.trailer[max(offset, data_stop) - data_stop : max(stop - data_stop, 0)]
        start, end = max(offset, len(header)) - len(header), min(stop, data_stop) - len(header)
        if start >= end:  # no PCM: the header or the trailer
            return head + tail
        first, last = wav.samples_for_bytes(start, end)
        pcm = float_to_pcm16(self.samples(first, last))
        skip = start - first * wav.block_align
        return head + pcm[skip : skip + end - start] + tail

    def samples(self, start: int, stop: int) -> np.ndarray:
        """Decoded float32 audio ``[channels, stop - start]``, equal to encodec's decode."""
        audio = self.audio
        needed = audio.units.covering(start, stop)
        futures = {i: audio.request(i) for i in needed}
        if self.bufsize and needed:
            with self._lock:
                if self._follow(start, stop):
                    self._plan(needed)
        decoded = {i: future.result() for i, future in futures.items()}
        return audio.assemble(decoded, start, stop)

    def _follow(self, start: int, stop: int) -> bool:
        """Extend the sequential run with samples ``[start, stop)`` (a read elsewhere starts
        a new one, dropping the old run's read-ahead); True once it is long enough for
        read-ahead."""
        run = self._run
        if run is None or not run[0] <= start <= run[1]:
            self._cancel()
            self._last, run = None, (start, stop)
        self._run = run = (run[0], max(run[1], stop))
        return (run[1] - run[0]) * self.audio.wav.block_align > self.read_ahead_after

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
