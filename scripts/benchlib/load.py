"""``scripts/bench --load``: many readers on one mount for a bounded time.

One mount (``--cache-mb``, default 64 here too) of four copies of a 20 s file (same audio,
other headers: four cache identities) and a 5 s LM-coded file. For ``--load-seconds`` (60),
``--threads`` reader threads in this process (8; some share one descriptor) and ``--procs``
reader processes (4; tests/load_reader.py, which the tests' load test runs too) read them,
sequential 128 KiB reads or random preads of 1 B to 200 KiB, some through the page cache
and some with O_DIRECT (every read reaches the daemon), every byte compared with a
reference decoded in-process beforehand. Printed: readers, duration, reads, bytes checked,
errors (any is a failure), frames the daemon decoded (its debug log), read latencies, and
the daemon's peak RSS during the load next to its RSS before it (models loaded) plus the
cache cap.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import load_reader  # tests/load_reader.py: the reader processes' program
from benchlib.common import (
    CHUNK,
    MODEL,
    PREAD,
    SR,
    Row,
    loadavg,
    log,
    mb,
    print_report,
    start_run,
    wait_idle,
)
from benchlib.daemon import Mount
from helpers import proc_kib, reset_peak_rss


@dataclass
class Tally:
    """What the readers counted, threads and processes together."""

    bytes: int = 0
    reads: int = 0
    errors: int = 0
    direct_bytes: int = 0
    direct_reads: int = 0
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, problem: str) -> None:
        """Count an error and say what it was."""
        with self.lock:
            self.errors += 1
            self.problems.append(problem)


def write_files(args: argparse.Namespace, src: Path) -> dict[str, bytes]:
    """The mount's files (WAV name -> .ecdc bytes), written into ``src``."""
    import synth

    log(f"encoding (or reading from cache) {args.load_file_seconds:g} s and a 5 s LM file ...")
    big = synth.make_ecdc(MODEL, round(args.load_file_seconds * SR), 6, False, 1)
    lm = synth.make_ecdc(MODEL, 5 * SR, 6, True, 2)
    # Same audio and WAV bytes, other headers: four identities in the frame cache.
    files = {"copy0.wav": big}
    for k in range(1, 4):
        files[f"copy{k}.wav"] = synth.to_v193(big, SR, br=6.0 + k / 10)
    files["lm.wav"] = lm
    for name, data in files.items():
        (src / name.replace(".wav", ".ecdc")).write_bytes(data)
    return files


def references(args: argparse.Namespace, src: Path, names: list[str], refs: Path):
    """Each file's WAV bytes decoded in-process (also written into ``refs``)."""
    from ecdcfs.engine import Engine, Settings

    log("reference bytes (in-process Engine) ...")
    engine = Engine(Settings(device="cpu", cache_mb=args.cache_mb, cache_dir=None))
    expected: dict[str, bytes] = {}
    for name in names:
        audio = engine.open(src / name.replace(".wav", ".ecdc"))
        if name.startswith("copy") and "copy0.wav" in expected:  # the same WAV bytes
            reference = expected["copy0.wav"]
            head = len(audio.wav.header)
            if audio.read(0, head) != reference[:head]:
                raise RuntimeError(f"{name}: another WAV header than copy0.wav")
            expected[name] = reference
        else:
            reader = audio.reader()
            expected[name] = reader.read(0, audio.size)
            reader.close()
        (refs / name).write_bytes(expected[name])
    engine.close()
    return expected


def warm(mount: Mount, names: list[str]) -> None:
    """Load the daemon's model and the LM, as any first read would, and wait till idle."""
    for name in names:
        with open(mount.mnt / name, "rb") as f:
            f.read(PREAD)
    # The files use one model, which the daemon loads alone (in the background, or for the
    # first read, whichever comes first).
    deadline = time.monotonic() + 120
    while f"loaded {MODEL}" not in mount.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    wait_idle(mount.pid)


def read_in_thread(
    i: int, path: Path, data: bytes, shared_fd: int, seconds: float, tally: Tally
) -> None:
    """Reader thread ``i``: even ones sequential, odd ones random; one in four O_DIRECT
    (every read reaches the daemon), one in four on the shared descriptor."""
    sequential = i % 2 == 0
    rng = random.Random(i)
    direct = i % 4 == 1
    own = None if i % 4 == 3 else os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    fd = shared_fd if own is None else own
    checked = reads = offset = 0
    lat: list[float] = []
    stop = time.monotonic() + seconds
    try:
        while time.monotonic() < stop:
            if sequential:
                length = CHUNK
                offset = 0 if offset >= len(data) else offset
            else:
                offset, length = rng.randrange(len(data)), rng.choice(load_reader.RANDOM_SIZES)
            t = time.perf_counter()
            try:
                got = os.pread(fd, length, offset)
            except OSError as exc:
                tally.error(f"thread {i} {path.name}: {exc}")
                continue
            lat.append(time.perf_counter() - t)
            if got != data[offset : offset + length]:
                tally.error(f"thread {i} {path.name}: wrong bytes at {offset}+{length}")
            checked += len(got)
            reads += 1
            offset += len(got)
    finally:
        if own is not None:
            os.close(own)
        with tally.lock:
            tally.bytes += checked
            tally.reads += reads
            if direct:
                tally.direct_bytes += checked
                tally.direct_reads += reads
            tally.latencies.extend(lat)


def start_processes(
    n_procs: int, mnt: Path, names: list[str], sizes: dict[str, int], refs: Path, seconds: float
) -> list[subprocess.Popen]:
    """``n_procs`` reader processes: odd ones sequential, the second half O_DIRECT."""
    procs = []
    for i in range(n_procs):
        name = names[(i + 1) % len(names)]
        mode = ("seq" if i % 2 else "rand") + ("-direct" if i >= n_procs // 2 else "")
        args = [str(mnt / name), str(sizes[name]), str(seconds), str(1000 + i), mode]
        procs.append(
            subprocess.Popen(
                [sys.executable, load_reader.__file__, *args, str(refs / name)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def collect_processes(procs: list[subprocess.Popen], tally: Tally) -> float:
    """Add the reader processes' figures to ``tally``; return their slowest read."""
    worst_proc = 0.0
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            tally.problems.append("a reader process is stuck")
        if proc.returncode or not out.strip():
            tally.problems.append(f"reader process exited with {proc.returncode}: {err[-500:]}")
            continue
        checked, reads, worst, errors = out.split()
        tally.bytes += int(checked)
        tally.reads += int(reads)
        tally.errors += int(errors)
        worst_proc = max(worst_proc, float(worst))
        tally.problems += err.splitlines()[:5]
    return worst_proc


@dataclass
class Outcome:
    """What the load run measured, for the table."""

    readers: int
    seconds: float
    elapsed: float
    tally: Tally
    stuck: int
    worst_proc: float
    decoded: int
    peak: int
    rss_before: int
    cache_mb: int
    daemon_ok: bool


def percentile(latencies: list[float], q: float) -> str:
    """The ``q`` quantile of sorted ``latencies``, in ms."""
    if not latencies:
        return "-"
    return f"{latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3:.0f} ms"


def load_rows(o: Outcome) -> list[Row]:
    """The table of a load run."""
    t, lat = o.tally, sorted(o.tally.latencies)
    budget = o.rss_before + (o.cache_mb << 20)
    return [
        Row("readers", f"{o.readers}", "", None, "", None),
        Row("duration", f"{o.elapsed:.1f} s", f"{o.seconds:g} s asked", None, "", None),
        Row("reads / bytes checked", f"{t.reads} / {mb(t.bytes)}", "", None, "", None),
        Row(
            "   of which O_DIRECT reader threads (each read served by the daemon)",
            f"{t.direct_reads} / {mb(t.direct_bytes)}",
            "",
            None,
            "(info)",
            None,
        ),
        Row("errors or wrong bytes", f"{t.errors}", "", None, "0", t.errors == 0),
        Row("stuck readers", f"{o.stuck}", "", None, "0", not o.stuck),
        Row("frames decoded by the daemon", f"{o.decoded}", "", None, "(info)", None),
        Row(
            "read latency (threads) p50 / p99 / max",
            " / ".join(percentile(lat, q) for q in (0.5, 0.99, 1.0)),
            f"processes max {o.worst_proc * 1e3:.0f} ms",
            None,
            "(info)",
            None,
        ),
        Row(
            "daemon peak RSS during the load / RSS before + cache cap",
            mb(o.peak),
            f"{mb(o.rss_before)} + {o.cache_mb} MiB = {mb(budget)}",
            o.peak / budget,
            "<= 1.00 + 200 MiB",
            o.peak <= budget + (200 << 20),
        ),
        Row(
            "daemon alive, no ERROR in its log",
            "yes" if o.daemon_ok else "NO",
            "",
            None,
            "yes",
            o.daemon_ok,
        ),
    ]


def run_readers(args: argparse.Namespace, mount: Mount, expected: dict, refs: Path) -> Outcome:
    """The load itself: threads and processes reading for ``--load-seconds``."""
    seconds, names, mnt = args.load_seconds, list(expected), mount.mnt
    rss_before = proc_kib(mount.pid, "VmRSS") * 1024
    reset_peak_rss(mount.pid)
    decoded_before = len(mount.decoded())
    tally = Tally()
    shared = {name: os.open(mnt / name, os.O_RDONLY) for name in names}
    log(
        f"load: {args.threads} threads + {args.procs} processes for {seconds:g} s on "
        f"{len(names)} files (--cache-mb {args.cache_mb}) ..."
    )
    sizes = {name: len(data) for name, data in expected.items()}
    procs = start_processes(args.procs, mnt, names, sizes, refs, seconds)
    threads = []
    for i in range(args.threads):
        name = names[i % len(names)]
        reader_args = (i, mnt / name, expected[name], shared[name], seconds, tally)
        threads.append(threading.Thread(target=read_in_thread, args=reader_args, daemon=True))
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and time.monotonic() < started + seconds + 300:
        time.sleep(0.5)
    stuck = sum(t.is_alive() for t in threads)
    worst_proc = collect_processes(procs, tally)
    elapsed = time.monotonic() - started
    for fd in shared.values():
        os.close(fd)
    errors = [line for line in mount.log_text().splitlines() if " ERROR " in line]
    return Outcome(
        readers=args.threads + args.procs,
        seconds=seconds,
        elapsed=elapsed,
        tally=tally,
        stuck=stuck,
        worst_proc=worst_proc,
        decoded=len(mount.decoded()) - decoded_before,
        peak=proc_kib(mount.pid, "VmHWM") * 1024,
        rss_before=rss_before,
        cache_mb=args.cache_mb,
        daemon_ok=mount.proc.poll() is None and not errors,
    )


def main(args: argparse.Namespace) -> int:
    """``--load``: many readers on one mount for a bounded time (see the docstring)."""
    work, load_start = start_run("ecdcfs-bench-load-")
    src, mnt, refs = work / "src", work / "mnt", work / "refs"
    for d in (src, mnt, refs):
        d.mkdir()
    files = write_files(args, src)
    expected = references(args, src, list(files), refs)
    extra = ("--cache-mb", str(args.cache_mb), "--no-persist")
    mount = Mount(src, mnt, work, dict(os.environ), *extra)
    log(f"mounted {mnt} (daemon pid {mount.pid}); warming the models ...")
    warm(mount, list(files))
    try:
        outcome = run_readers(args, mount, expected, refs)
    finally:
        mount.stop()
    print()
    print(
        f"ecdcfs load: {args.threads} reader threads (a quarter on shared descriptors, a "
        f"quarter O_DIRECT) + {args.procs} reader processes (half O_DIRECT), half "
        f"sequential, half random, on {len(files)} files "
        f"({args.load_file_seconds:g} s x {len(files) - 1} identities + 5 s LM), "
        f"--cache-mb {args.cache_mb}, {os.cpu_count()} CPUs"
    )
    print(f"load average: start {load_start}, end {loadavg()}")
    print_report(load_rows(outcome), outcome.tally.problems[:20])
    return 0
