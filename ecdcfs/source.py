"""Where an .ecdc file's bytes come from: a snapshot in memory, or anything with ``read``.

:class:`~ecdcfs.audiofile.AudioFile` reads only the bytes of the frames it decodes, so a
source can fetch lazily (an HTTP URL read with Range requests) as well as hold everything.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Protocol

_STREAM_BLOCK = 64 * 1024


class ByteSource(Protocol):
    """Random-access, immutable bytes of one version of a file."""

    @property
    def size(self) -> int: ...

    @property
    def identity(self) -> str:
        """Changes whenever the content may differ (keys caches and persisted indexes)."""
        ...

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)``, short only at the end of the file."""
        ...


class MemorySource:
    """A whole file held in memory (compressed audio is small); identity: content hash."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)
        self.identity = hashlib.blake2b(data, digest_size=16).hexdigest()

    def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]


class SourceStream:
    """A forward-reading binary stream over a source, for encodec's bit readers.

    They pull one byte at a time, so reads are served from a block buffer.
    """

    def __init__(self, source: ByteSource, offset: int = 0, block: int = _STREAM_BLOCK) -> None:
        self._source = source
        self._position = offset
        self._block_size = block
        self._block_start = offset
        self._block = b""

    def seek(self, offset: int) -> int:
        self._position = offset
        return offset

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, self._source.size - self._position)
        start = self._position - self._block_start
        if start < 0 or start + size > len(self._block):
            self._block_start = self._position
            self._block = self._source.read(self._position, max(size, self._block_size))
            start = 0
        out = self._block[start : start + size]
        self._position += len(out)
        return out

    def tell(self) -> int:
        return self._position


def as_stream(source: ByteSource, offset: int = 0, block: int = _STREAM_BLOCK) -> BinaryIO:
    """A binary stream positioned at ``offset`` that reads ``block`` bytes at a time."""
    return SourceStream(source, offset, block)  # type: ignore[return-value]
