"""Where an .ecdc file's bytes come from: a snapshot in memory, or anything with ``read``.

:class:`~ecdcfs.audiofile.AudioFile` reads only the bytes of the frames it decodes, so a
source can fetch lazily (an HTTP URL read with Range requests) as well as hold everything.
:func:`open_source` is the policy for a name given by a user: an http(s) URL, ``-``
(stdin, where the caller has one) or a local path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Protocol

from .container import EcdcError, Header, read_header

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

    def close(self) -> None:
        """Release what the source holds (a download, cached blocks); no reads follow."""
        ...


class MemorySource:
    """A whole file held in memory (compressed audio is small); identity: content hash."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)
        self.identity = hashlib.blake2b(data, digest_size=16).hexdigest()

    def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]

    def close(self) -> None:
        """Nothing to release (the bytes go with the object)."""


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


def open_source(target: str, stdin: BinaryIO | None = None) -> ByteSource:
    """The bytes of an http(s) URL (Range requests), a local file (a snapshot in memory)
    or, given ``stdin``, ``-`` (all of it). Raises :class:`EcdcError`."""
    from .http import HttpSource, is_url

    if is_url(target):
        return HttpSource(target)
    if target == "-" and stdin is not None:
        return MemorySource(stdin.read())
    _not_another_url(target)
    try:
        return MemorySource(Path(target).read_bytes())
    except OSError as exc:
        raise EcdcError(f"cannot open {target}: {exc.strerror or exc}") from None


def read_source_header(target: str, stdin: BinaryIO | None = None) -> Header:
    """The header alone of what :func:`open_source` opens: a local file's first bytes,
    one small Range request for a URL."""
    from .http import is_url

    if is_url(target) or (target == "-" and stdin is not None):
        source = open_source(target, stdin)
        try:
            return read_header(as_stream(source, block=1), source.size)
        finally:
            source.close()
    _not_another_url(target)
    try:
        with open(target, "rb") as f:
            return read_header(f, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise EcdcError(f"cannot open {target}: {exc.strerror or exc}") from None


def _not_another_url(target: str) -> None:
    """A name with a scheme other than http(s) is refused unless it is an existing path."""
    if "://" in target and not Path(target).exists():
        raise EcdcError(f"{target}: only http and https URLs are supported")
