"""An .ecdc file as a read-only, seekable binary file of WAV bytes, without a mount.

:func:`open_wav` (``ecdcfs.open``) gives a :class:`WavFile`, an :class:`io.RawIOBase` over
the same :class:`~ecdcfs.audiofile.Reader` a mount's open file uses: its bytes are those
of the ``.wav`` a mount shows, a read decodes only the frames under it, and reading on
gets the reader's growing read-ahead. ``wave``, ``soundfile`` and ``shutil`` take it like
a file on disk. One file is for one thread at a time (open one per thread).

Files share one :class:`~ecdcfs.audiofile.Engine` (models, the decoded-frame cache, the
decode thread), made with default :class:`~ecdcfs.audiofile.Settings` when first needed
and closed at exit, unless given their own: ``engine=`` (shared, the caller closes it)
or ``settings=`` (an engine for that file alone, closed with it).
"""

from __future__ import annotations

import atexit
import io
import os
import threading
from typing import TYPE_CHECKING

from .audiofile import AudioFile
from .engine import Engine
from .settings import Settings
from .source import ByteSource, open_source

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

_default_engine: Engine | None = None
_default_lock = threading.Lock()


def default_engine() -> Engine:
    """The engine files share unless given one: made at first use, closed at exit."""
    global _default_engine
    with _default_lock:
        if _default_engine is None:
            _default_engine = Engine()
            atexit.register(_default_engine.close)
        return _default_engine


class WavFile(io.RawIOBase):
    """The WAV bytes of one .ecdc file: read-only and seekable; a seek costs nothing and
    a read anywhere costs the decode of the frames under it."""

    def __init__(self, audio: AudioFile, source: ByteSource, own_engine: bool) -> None:
        super().__init__()
        self.audio = audio
        self.name = audio.name
        self._source = source
        self._own_engine = own_engine
        self._reader = audio.reader()
        self._position = 0

    @property
    def size(self) -> int:
        """Bytes of the whole WAV file."""
        return self.audio.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fill ``buffer`` from the position on; 0 at (or past) the end."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        data = self._reader.read(self._position, len(view))
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def readall(self) -> bytes:
        """Everything from the position to the end, in one read."""
        self._check_open()
        data = self._reader.read(self._position, max(0, self.size - self._position))
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset`` from the start, the position or the end; past the end reads
        nothing."""
        self._check_open()
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}
        if whence not in bases:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        position = bases[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def tell(self) -> int:
        self._check_open()
        return self._position

    def write(self, data: ReadableBuffer) -> int:
        raise io.UnsupportedOperation("write: an ecdcfs WAV file is read-only")

    def close(self) -> None:
        """Close the reader, the source and an engine made for this file alone."""
        if not self.closed:
            self._reader.close()
            self._source.close()
            if self._own_engine:
                self.audio.engine.close()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")


def open_wav(
    path_or_url: str | os.PathLike[str],
    *,
    engine: Engine | None = None,
    settings: Settings | None = None,
) -> WavFile:
    """An .ecdc file, or one at an http(s) URL (Range requests), as a :class:`WavFile`.

    A local file is read into memory (compressed audio is small; the file is one version
    from then on). ``engine``: decode with this one (the caller closes it); ``settings``:
    with an engine of its own, closed with the file; neither: the shared
    :func:`default_engine`. Raises :class:`~ecdcfs.container.EcdcError` when the file
    cannot be read or is not a usable .ecdc file.
    """
    if engine is not None and settings is not None:
        raise TypeError("give engine or settings, not both")
    target = os.fsdecode(path_or_url)
    source = open_source(target)
    own = Engine(settings) if settings is not None else None
    try:
        audio = (own or engine or default_engine()).open_byte_source(target, source)
    except BaseException:
        source.close()
        if own is not None:
            own.close()
        raise
    return WavFile(audio, source, own_engine=own is not None)
