"""What every section of the bench shares: the run's set-up and cleanup, /proc figures,
timing helpers, the in-process decode baselines, and the table of results."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SR = 48_000
CHUNK = 128 << 10  # what cp and the kernel's FUSE reads use
PREAD = 4096
MODEL = "encodec_48khz"

# ----- cleanup ------------------------------------------------------------------------

_stops: list[Callable[[], None]] = []  # the mounts still up, each stopped on cleanup
_temp_dirs: list[Path] = []
_keep = False


def keep_temp_dirs(keep: bool) -> None:
    """Whether cleanup keeps the work dirs (``--keep``, for inspection)."""
    global _keep
    _keep = keep


def on_cleanup(stop: Callable[[], None]) -> None:
    """Call ``stop`` at cleanup unless :func:`forget` was called for it first."""
    _stops.append(stop)


def forget(stop: Callable[[], None]) -> None:
    """``stop`` has run: cleanup need not call it."""
    if stop in _stops:
        _stops.remove(stop)


def cleanup() -> None:
    """Stop the mounts still up and remove (or, with --keep, name) the work dirs."""
    while _stops:
        _stops.pop()()
    while _temp_dirs:
        path = _temp_dirs.pop()
        if _keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally, then atexit


def start_run(prefix: str) -> tuple[Path, str]:
    """Check FUSE, arrange cleanup, make the work dir and put the tests' random-init
    checkpoints in its TORCH_HOME. Returns the work dir and the load average now."""
    import synth

    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        sys.exit("bench: needs /dev/fuse and fusermount3")
    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    load_start = loadavg()
    log(f"load average at start: {load_start} ({os.cpu_count()} CPUs)")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    _temp_dirs.append(work)
    synth.prepare_torch_home(work / "torch_home")
    os.environ["TORCH_HOME"] = str(work / "torch_home")
    return work, load_start


# ----- the machine --------------------------------------------------------------------


def log(msg: str) -> None:
    """A progress line, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> str:
    """The three load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid``, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_idle(pid: int, quiet: float = 0.4, timeout: float = 30) -> None:
    """Until the process has used (almost) no CPU for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    ticks, since = cpu_ticks(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_ticks(pid)
        if now - ticks > 2:  # more than ~20 ms of CPU: still busy
            ticks, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    log(f"warning: daemon {pid} still busy after {timeout} s")


def drop_caches() -> bool:
    """Drop the page cache (False: not allowed, e.g. not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ----- timing -------------------------------------------------------------------------


def timed(func: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(seconds, result) of ``func(*args)``."""
    t = time.perf_counter()
    result = func(*args)
    return time.perf_counter() - t, result


def run_quiet(cmd: list[str]) -> None:
    """Run ``cmd``, its output discarded; fail if it fails."""
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def mb(n: float) -> str:
    """``n`` bytes in MiB."""
    return f"{n / 2**20:.0f} MiB"


# Under CPU contention torch decodes much slower (3x seen) in the main thread than in
# another thread: baselines decode in a worker thread, as the daemon does.
_floor_worker = ThreadPoolExecutor(1, thread_name_prefix="bench-decoder")


def in_worker(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` run in the baselines' decode thread."""
    return _floor_worker.submit(func, *args).result()


def floor_decode(codec, audio, *frames: int) -> list[float]:
    """Seconds of each in-process decode of ``frames`` of ``audio`` (default: all), in order,
    in the decode thread."""
    indexes = frames or range(audio.layout.frame_count)
    return [in_worker(_decode_one, codec, audio, i) for i in indexes]


def _decode_one(codec, audio, index: int) -> float:
    """Seconds of one decode of frame ``index`` (its codes read before the clock starts)."""
    frame = audio.inputs(index)
    t = time.perf_counter()
    codec.decode_frame(frame)
    return time.perf_counter() - t


# ----- the table ----------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table; ``ok`` None for figures without a target."""

    metric: str
    measured: str
    baseline: str
    ratio: float | None
    target: str
    ok: bool | None


def print_table(rows: list[Row]) -> None:
    """The rows as a Markdown table."""
    head = ("metric", "measured", "baseline", "ratio", "target", "ok?")
    cells = [
        (
            r.metric,
            r.measured,
            r.baseline,
            "" if r.ratio is None else f"{r.ratio:.2f}",
            r.target,
            "" if r.ok is None else ("yes" if r.ok else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

    def line(c: tuple) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


def print_report(rows: list[Row], notes: list[str]) -> None:
    """The table, the notes, and which targets were missed."""
    print()
    print_table(rows)
    print()
    for note in notes:
        print(f"- {note}")
    missed = [r.metric.strip() for r in rows if r.ok is False]
    print()
    print("all targets met" if not missed else "missed: " + "; ".join(missed))


# ----- the decoder graphs -------------------------------------------------------------


def build_graphs(cache_dir: Path, *models: str) -> float:
    """Seconds to build (or find) the decoder graphs of ``models`` into ``cache_dir``, as a
    mount's first start does (so that the mounts measured have them cached)."""
    from ecdcfs.container import MODELS
    from ecdcfs.graph_store import GraphStore

    t = time.perf_counter()
    store = GraphStore(cache_dir)
    for name in models:
        store.load(MODELS[name], lambda graph: graph)
    return time.perf_counter() - t


def within_lsb(got: bytes, expected: bytes, lsb: int = 2) -> bool:
    """Whether the s16le PCM ``got`` is ``expected`` to within ``lsb`` in every sample
    (the default decoder's promise against encodec's decode)."""
    import numpy as np

    if len(got) != len(expected) or len(got) % 2:
        return False
    a, b = (np.frombuffer(x, "<i2").astype(np.int32) for x in (got, expected))
    return bool(np.abs(a - b).max(initial=0) <= lsb)


def torch_loaded(pid: int) -> bool:
    """Whether process ``pid`` has torch's library mapped (it imported torch)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("libtorch" in line for line in f)
