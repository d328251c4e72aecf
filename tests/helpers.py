"""Helpers the test modules share: reading a whole file through a Reader, the CUDA devices
torch sees, and a local HTTP server of files (with or without ranges and lengths)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

READ = 128 * 1024  # what the kernel asks a FUSE filesystem for


def read_all(reader, size: int = READ) -> bytes:
    """Every byte a Reader (or an AudioFile) serves, in reads of ``size``."""
    out = bytearray()
    while chunk := reader.read(len(out), size):
        out += chunk
    return bytes(out)


def cuda_device_count() -> int:
    """CUDA devices torch sees here (0 without CUDA), asked in a child process."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout)


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        ranged = self.headers.get("Range") if self.server.ranges else None
        status, body = 200, data
        if ranged:
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start, stop = int(first), min(len(data), int(last) + 1 if last else len(data))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            status, body = 206, data[start:stop]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        if self.server.lengths:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hash(data) & 0xFFFFFFFF:x}"')
        self.end_headers()
        with self.server.lock:  # counted before the client can have it
            self.server.served += len(body)
        with contextlib.suppress(ConnectionError):  # a client that had what it needed
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class FileServer(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    ranges: bool
    lengths: bool
    served: int
    lock = threading.Lock()
