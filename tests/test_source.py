"""Byte sources: ``close()`` on every source, and :func:`~ecdcfs.source.open_source`'s
policy for a name given by a user (an http(s) URL, ``-`` with a stdin, a path)."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import synth
from ecdcfs.container import EcdcError
from ecdcfs.http import HttpSource
from ecdcfs.source import MemorySource, open_source, read_source_header

SAMPLES = 48_000
DATA = synth.container_24khz(SAMPLES, 2, synth.random_packed_24khz(SAMPLES, 2))
SLOW_BODY = 64 * 1024 * 40  # 40 chunks, one every 50 ms: 2 s to serve


class _SlowHandler(BaseHTTPRequestHandler):
    """A server that ignores Range and sends its body slowly."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", str(SLOW_BODY))
        self.end_headers()
        try:
            for _ in range(SLOW_BODY // (64 * 1024)):
                self.wfile.write(bytes(64 * 1024))
                time.sleep(0.05)
        except ConnectionError:
            pass

    def log_message(self, *args) -> None:
        pass


def downloads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ecdc-stream-download"]


def test_memory_source_close_is_harmless():
    source = MemorySource(b"abcdef")
    source.close()
    source.close()
    assert source.read(2, 3) == b"cde"


def test_http_source_close_stops_a_plain_download():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = HttpSource(f"http://127.0.0.1:{server.server_address[1]}/f")
        assert not source.ranged
        assert source.read(0, 10) == bytes(10)
        assert downloads()
        began = time.monotonic()
        source.close()
        while downloads() and time.monotonic() - began < 1.5:
            time.sleep(0.01)
        assert not downloads()  # long before the 2 s the body takes
    finally:
        server.shutdown()
        server.server_close()


def test_http_source_close_drops_its_blocks(serve):
    data = DATA * 100
    base, server = serve({"/f": data})
    source = HttpSource(base + "/f", block_size=4096, probe_size=100)
    assert source.read(30_000, 100) == data[30_000:30_100]
    assert source.read(30_000, 100) == data[30_000:30_100]  # the cached block
    served = server.served
    assert served == 100 + 4096
    source.close()
    assert source.read(30_000, 100) == data[30_000:30_100]  # fetched again
    assert server.served == served + 4096


def test_open_source_of_a_path(tmp_path):
    path = synth.write(tmp_path, "a.ecdc", DATA)
    source = open_source(str(path))
    assert isinstance(source, MemorySource) and source.read(0, source.size) == DATA
    assert read_source_header(str(path)).audio_length == SAMPLES


def test_open_source_of_stdin_only_with_one(tmp_path, monkeypatch):
    source = open_source("-", io.BytesIO(DATA))
    assert source.read(0, source.size) == DATA
    assert read_source_header("-", io.BytesIO(DATA)).audio_length == SAMPLES
    monkeypatch.chdir(tmp_path)  # without a stdin, "-" is a file name
    with pytest.raises(EcdcError, match="cannot open -: No such file"):
        open_source("-")
    synth.write(tmp_path, "-", DATA)
    assert open_source("-").read(0, 4) == b"ECDC"


def test_open_source_of_a_url(serve):
    base, server = serve({"/a.ecdc": DATA})
    source = open_source(base + "/a.ecdc")
    assert isinstance(source, HttpSource) and source.read(0, len(DATA)) == DATA
    source.close()
    assert read_source_header(base + "/a.ecdc").audio_length == SAMPLES


def test_open_source_errors(tmp_path):
    with pytest.raises(EcdcError, match="only http and https"):
        open_source("ftp://example.org/a.ecdc")
    with pytest.raises(EcdcError, match="only http and https"):
        read_source_header("ftp://example.org/a.ecdc")
    with pytest.raises(EcdcError, match="missing.ecdc: No such file"):
        open_source(str(tmp_path / "missing.ecdc"))
    with pytest.raises(EcdcError, match="Is a directory"):
        read_source_header(str(tmp_path))
