"""Helpers the test modules (and scripts/bench) share: reading a whole file through a
Reader, the WAV expected of a file, engine stand-ins for the tree, running a function in
threads at once, a process's memory from /proc, the CUDA devices torch sees, and a local
HTTP server of files (with or without ranges and lengths)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

READ = 128 * 1024  # what the kernel asks a FUSE filesystem for
SONG_SAMPLES = 150_000  # conftest's songs: 3.1 s at 48 kHz, four frames, the last a short one
SONG_TAGS = ("Sóng [live]", "https://example.org/song", "https://example.org/t.jpg")


def read_all(reader, size: int = READ) -> bytes:
    """Every byte a Reader (or an AudioFile) serves, in reads of ``size``."""
    out = bytearray()
    while chunk := reader.read(len(out), size):
        out += chunk
    return bytes(out)


def read_everything(audio, timeout: float) -> tuple[str, float]:
    """Read an AudioFile's whole WAV in a thread: ('ok' | 'error: ...' of a container
    error, seconds); fails if it has not ended after ``timeout`` seconds."""
    from ecdcfs.container import EcdcError

    result: list[str] = []

    def run() -> None:
        reader = audio.reader()
        try:
            assert len(read_all(reader)) == audio.size
            result.append("ok")
        except EcdcError as exc:
            result.append(f"error: {exc}")
        finally:
            reader.close()

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"reading the whole file hung for {timeout} s"
    return result[0], time.monotonic() - started


def expected_wav(
    data: bytes, sample_rate: int | None = None, title=None, source=None, thumbnail=None
) -> bytes:
    """The WAV ecdcfs serves for ``data``: encodec's decode in ecdcfs's layout."""
    import synth
    from ecdcfs.wav import WavLayout

    pcm = synth.reference_pcm(data)
    layout = WavLayout(pcm.shape[1], sample_rate or 48_000, pcm.shape[0], title, source, thumbnail)
    return layout.wrap(pcm.astype("<i2").tobytes())


def entries(tree, path: str = "/") -> dict[str, int]:
    """A SourceTree's listing of ``path``: name -> the entry's mode bits."""
    return dict(tree.readdir(path))


class NoEngine:
    """Engine factory that fails the test if anything asks for decoding machinery."""

    calls = 0

    def __call__(self):
        NoEngine.calls += 1
        raise AssertionError("the engine must not be created")


class RecordingEngine:
    """Engine stand-in: records the bytes each open snapshot holds, decodes nothing."""

    def __init__(self) -> None:
        from ecdcfs.settings import Settings

        self.opened: list[int] = []
        self.settings = Settings()

    def __call__(self):
        return self

    def open(self, path, data, riff_info=False):
        from ecdcfs.audiofile import AudioFile
        from ecdcfs.container import parse_header
        from ecdcfs.source import MemorySource

        self.opened.append(len(data))
        header = parse_header(data, len(data))
        return AudioFile(self, str(path), MemorySource(data), header, riff_info)

    def close(self) -> None:
        pass


def fail_download(*args, **kwargs):
    """A stand-in for ``ecdcfs.checkpoint.download`` with no network."""
    raise OSError("network is unreachable")


def load_onnx_decoder(name: str, cache, threads: int = 1):
    """Model ``name``'s ONNX Runtime decoder through a fresh store of ``cache`` (a remount)."""
    from ecdcfs.container import MODELS
    from ecdcfs.graph_store import GraphStore
    from ecdcfs.interrupts import Interrupts
    from ecdcfs.onnx_decoder import OnnxDecoder

    spec = MODELS[name]
    return GraphStore(cache).load(spec, lambda g: OnnxDecoder(spec, g, Interrupts(), threads))


# ecdc-stream, as a subprocess (the installed console script) and in process: exact
# comparisons need encodec's own decode on the CPU, ``-g -1 --exact`` (to -d), unless the
# test picks a device (or says ``--default``: the default decoder).
_STREAM_SCRIPT = Path(sys.executable).parent / "ecdc-stream"
STREAM_CLI = (
    [str(_STREAM_SCRIPT)] if _STREAM_SCRIPT.exists() else [sys.executable, "-m", "ecdcfs.stream"]
)


def _on_cpu(args: tuple[str, ...]) -> list[str]:
    if "--default" in args:
        return [a for a in args if a != "--default"]
    exact = ["--exact"] if "-d" in args else []  # it applies to -d only
    return list(args) if "-g" in args else ["-g", "-1", *exact, *args]


class TerminalText(io.StringIO):
    """A text stream that says it is a terminal (progress bars are drawn on one)."""

    def isatty(self) -> bool:
        return True


def ecdc_stream(*args: str, input: bytes | None = None, env: dict | None = None, cwd=None):
    """The installed console script: (exit status, stdout bytes, stderr text)."""
    result = subprocess.run(
        [*STREAM_CLI, *_on_cpu(args)],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )
    return result.returncode, result.stdout, result.stderr.decode()


def stream_run(*args: str, stdin: bytes = b"", stderr: io.StringIO | None = None):
    """``ecdc-stream`` in process: (exit status, stdout bytes, stderr text)."""
    from ecdcfs import stream

    out, err = io.BytesIO(), stderr if stderr is not None else io.StringIO()
    rc = stream.run(_on_cpu(args), io.BytesIO(stdin), out, err)
    return rc, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The one line ``ecdc-stream`` printed on stderr, checked to be one line of its own."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ecdc-stream: ") and "Traceback" not in err
    return lines[0]


def run_in_threads(func, arguments: list[tuple], timeout: float = 300) -> list[BaseException]:
    """Run ``func(*args)`` for every ``args`` at once, a thread each; return what they raised."""
    errors: list[BaseException] = []

    def guarded(*args) -> None:
        try:
            func(*args)
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=args) for args in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "threads still running"
    return errors


def proc_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def reset_peak_rss(pid: int) -> bool:
    """Set ``pid``'s VmHWM to its VmRSS, so VmHWM measures from now on (False: not allowed)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cuda_device_count() -> int:
    """CUDA devices torch sees here (0 without CUDA), asked in a child process."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout)


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        with self.server.lock:
            self.server.requests += 1
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
        if self.path in self.server.short:  # cut short of its Content-Length
            body, self.close_connection = body[: len(body) // 2], True
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
    served: int  # body bytes sent
    requests: int
    short: set[str]  # paths whose body is sent cut short of its Content-Length
    lock = threading.Lock()
