"""An .ecdc file at an http(s) URL as a :class:`~ecdcfs.source.ByteSource`.

Bytes are fetched with HTTP Range requests, in blocks kept in a small LRU cache, so reading
the header costs one small request and a seek far into a plain (bit-packed) file fetches
only the blocks of the frames decoded. A server that ignores ``Range`` (answers 200 with
the whole body) is read as a plain stream instead: a background thread downloads the body
into memory while readers wait for the bytes they need (compressed audio is small).
"""

from __future__ import annotations

import hashlib
import re
import threading
import urllib.error
import urllib.request
from http.client import HTTPException
from urllib.parse import urlsplit

from cachetools import LRUCache

from .container import EcdcError

BLOCK_SIZE = 64 * 1024  # one Range request fetches whole blocks (a minute of 6 kbps audio)
PROBE_SIZE = 8 * 1024  # the first request: the header, and the size from Content-Range
CACHE_BLOCKS = 64
TIMEOUT_S = 30
USER_AGENT = "Mozilla/5.0 (compatible; ecdc-stream; +https://github.com/facebookresearch/encodec)"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)


class RemoteError(EcdcError):
    """The URL cannot be read (HTTP error, connection failure, content changed)."""


def is_url(name: str) -> bool:
    """Whether ``name`` is an http(s) URL rather than a path."""
    return urlsplit(name).scheme.lower() in ("http", "https")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header; None where absent or ``*``."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


class HttpSource:
    """Random-access bytes of the resource at ``url`` (one version of it).

    ``size`` and ``identity`` come from the first response; a later response for another
    version (a different total size or ETag) raises :class:`RemoteError` rather than mixing
    two files. Thread-safe: the decode worker and an LM index builder may read at once.
    """

    def __init__(
        self,
        url: str,
        block_size: int = BLOCK_SIZE,
        probe_size: int = PROBE_SIZE,
        cache_blocks: int = CACHE_BLOCKS,
        timeout: float = TIMEOUT_S,
    ) -> None:
        self.url = url
        self.block_size = block_size
        self.timeout = timeout
        self.requests = 0  # for tests and diagnostics
        self._lock = threading.Lock()
        self._blocks: LRUCache = LRUCache(maxsize=cache_blocks)
        self._download: _Download | None = None
        self._size: int | None = None  # None: a stream without Content-Length, until its end
        response = self._request(0, probe_size)
        headers = response.headers
        status = _status(response)
        self._etag = headers.get("ETag")
        validators = f"{self._etag}|{headers.get('Last-Modified')}"
        if status == 206:
            first, total = _parse_content_range(headers.get("Content-Range"))
            if first != 0 or total is None:
                response.close()
                raise RemoteError(f"{url}: unusable Content-Range {headers.get('Content-Range')!r}")
            self._size = total
            self._head = _read(response, min(probe_size, total), url)
            self.ranged = True
        elif status == 416:  # nothing to range over: an empty resource
            _, total = _parse_content_range(headers.get("Content-Range"))
            response.close()
            self._size, self._head, self.ranged = total or 0, b"", True
        else:  # 200: the server ignores Range; stream the body
            length = headers.get("Content-Length")
            self._size = int(length) if length and length.isdigit() else None
            self._download = _Download(response, self._size, url)
            self._head = b""
            self.ranged = False
        self.identity = hashlib.blake2b(
            f"{url}\0{self._size}\0{validators}".encode(), digest_size=16
        ).hexdigest()

    @property
    def size(self) -> int:
        if self._size is None:  # a stream without Content-Length: known at its end
            assert self._download is not None
            self._size = self._download.total()
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)``, short only at the end of the resource."""
        if self._download is not None:
            return self._download.read(offset, offset + size)
        stop = min(offset + size, self.size)
        if offset >= stop:
            return b""
        if stop <= len(self._head):
            return self._head[offset:stop]
        first, last = offset // self.block_size, (stop - 1) // self.block_size
        with self._lock:
            blocks: dict[int, bytes | None] = {
                i: self._blocks.get(i) for i in range(first, last + 1)
            }
            missing = [i for i, block in blocks.items() if block is None]
            while missing:  # one request per run of consecutive missing blocks
                run = 1
                while run < len(missing) and missing[run] == missing[0] + run:
                    run += 1
                start = missing[0] * self.block_size
                data = self._fetch(start, min(run * self.block_size, self.size - start))
                for j in range(run):
                    block = data[j * self.block_size : (j + 1) * self.block_size]
                    blocks[missing[j]] = self._blocks[missing[j]] = block
                missing = missing[run:]
        joined = b"".join(blocks[i] or b"" for i in range(first, last + 1))  # all fetched
        skip = offset - first * self.block_size
        return joined[skip : skip + stop - offset]

    def _fetch(self, start: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``start``, with one retry after a network failure."""
        for attempt in (1, 2):
            try:
                response = self._request(start, size)
            except RemoteError:
                if attempt == 2:
                    raise
                continue
            with response:
                headers = response.headers
                etag = headers.get("ETag")
                if self._etag is not None and etag is not None and etag != self._etag:
                    raise RemoteError(f"{self.url} changed on the server while being read")
                status = _status(response)
                if status not in (200, 206):
                    raise RemoteError(f"{self.url}: HTTP {status} for a range request")
                if status == 206:
                    first, total = _parse_content_range(headers.get("Content-Range"))
                    if total is not None and total != self._size:
                        raise RemoteError(f"{self.url} changed on the server while being read")
                    if first != start:
                        raise RemoteError(f"{self.url}: got bytes from {first}, not {start}")
                    return _read(response, size, self.url)
                # 200: ranges no longer honoured; read through the body to what we need.
                return _read(response, start + size, self.url)[start:]
        raise AssertionError("unreachable")

    def _request(self, start: int, size: int):
        self.requests += 1
        request = urllib.request.Request(
            self.url,
            headers={
                "Range": f"bytes={start}-{start + size - 1}",
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",
            },
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                return exc  # an HTTPError is also the response, with status and headers
            raise RemoteError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"{self.url}: {reason}") from None

    def close(self) -> None:
        """Stop a plain-stream download and drop the cached blocks (each Range request
        has its own connection, closed once read)."""
        if self._download is not None:
            self._download.close()
        with self._lock:
            self._blocks.clear()


def _status(response) -> int:
    """HTTP status of a response (or of an HTTPError standing in for one)."""
    return getattr(response, "status", None) or response.getcode()


def _read(response, size: int, url: str) -> bytes:
    """``size`` bytes of a response body (fewer only if the body ends first)."""
    try:
        data = response.read(size)
    except (OSError, HTTPException) as exc:
        raise RemoteError(f"{url}: {exc}") from None
    return data


class _Download:
    """The body of a response, downloaded in the background into memory."""

    CHUNK = 64 * 1024

    def __init__(self, response, length: int | None, url: str) -> None:
        self._response = response
        self._length = length
        self._url = url
        self._data = bytearray()
        self._done = False
        self._closed = False
        self._error: Exception | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._run, name="ecdc-stream-download", daemon=True).start()

    def _run(self) -> None:
        error: Exception | None = None
        try:
            with self._response:
                while not self._closed:
                    chunk = self._response.read(self.CHUNK)
                    if not chunk:
                        break
                    with self._changed:
                        self._data += chunk
                        self._changed.notify_all()
        except (OSError, HTTPException) as exc:
            error = RemoteError(f"{self._url}: {exc}")
        with self._changed:
            if error is None and self._length is not None and len(self._data) < self._length:
                error = RemoteError(
                    f"{self._url}: connection closed after {len(self._data)} of "
                    f"{self._length} bytes"
                )
            self._error = error
            self._done = True
            self._changed.notify_all()

    def read(self, start: int, stop: int) -> bytes:
        with self._changed:
            while len(self._data) < stop and not self._done:
                self._changed.wait()
            if len(self._data) < stop and self._error is not None:
                raise self._error
            return bytes(self._data[start:stop])

    def total(self) -> int:
        with self._changed:
            while not self._done:
                self._changed.wait()
            if self._error is not None:
                raise self._error
            return len(self._data)

    def close(self) -> None:
        self._closed = True
