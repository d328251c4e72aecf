"""Rows 1-6 and 10-13 of the bench: 48 kHz files through a mount with the default decoder,
``ecdcfs SRC MNT -f --device cpu --cache-mb N --cache-dir DIR`` (its graphs built into
DIR first, as a first mount does, and timed), then the same through an ``--exact`` mount.

Every baseline is a warm eager encodec decode in this process (``TorchDecoder.decode_frame``,
in a worker thread like the daemon's), the floor.

1. ``cp`` of a fresh 48 kHz 6 kbps .wav through the mount (model already loaded by a
   4 KiB read of another file, page cache dropped) / the floor: the same frames decoded
   one by one. The floor is measured before and after each cp; each cp gets its own
   copy of the file (same payload, another header, so another cache identity). Also: cp /
   the daemon's own decode time of those frames, measured in the same window (immune to
   the load changing between the cp and its floors; under 1 when decodes run in
   parallel), and the same cp through the ``--exact`` mount.
2. a cold 4 KiB ``pread`` far into a file never read (daemon idle, model warm), median of
   several offsets / the median warm in-process decode of one frame (each decoded right
   before its pread); also / the daemon's own decode time of one frame (same window).
3. frames decoded / frames needed by the cp. The daemon runs with ``--log-level debug``,
   and its decode worker logs one line per decoded unit (benchlib.daemon reads them); the
   same ratio is also measured in-process (Engine + Reader, 128 KiB sequential reads).
4. ``ls -lR`` of N small .ecdc files in subfolders through the mount: right after
   mounting (while the daemon may still be loading models), then N other files once it
   is idle (cold), then those again / ``ls -lR`` of the source folder.
5. the daemon's peak RSS (VmHWM) after the cps, absolute (its graphs cached: it never
   imported torch, which the row below checks in /proc/PID/maps); beside it the VmHWM of
   a process that imports ecdcfs and loads the 48 kHz model (benchlib/model_rss.py), the
   only one the mount's files use (the daemon loads no other).
6. (unless --no-lm) an LM-coded file: time to the first 4 KiB and to the end of a
   sequential read through the mount / upstream ``encodec.compress.decompress``.

Rows 10-13: see benchlib/engine.py; rows 14-16 (the install, a first-ever mount):
benchlib/install.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import engine, install, khz24
from benchlib.common import (
    CHUNK,
    MODEL,
    PREAD,
    SR,
    Row,
    build_graphs,
    drop_caches,
    floor_decode,
    loadavg,
    log,
    mb,
    print_report,
    run_quiet,
    start_run,
    timed,
    torch_loaded,
    wait_idle,
    within_lsb,
)
from benchlib.daemon import Mount
from helpers import proc_kib

MAX_DAEMON_RSS = 300 << 20  # row 5's target: a daemon serving plain files, graphs cached

MODEL_RSS = Path(__file__).with_name("model_rss.py")
FILES_PER_DIR = 50
# Cold pread offsets, as fractions of the data; those kept are 4 frames apart or more, so
# that no read-ahead of one serves another.
PREAD_FRACTIONS = (0.8, 0.3, 0.55, 0.1, 0.95, 0.42, 0.67, 0.2, 0.88, 0.02)


@dataclass
class Files:
    """The section's files, their in-process AudioFiles and the warm in-process model."""

    src: Path
    out: Path
    seconds: float
    n_files: int
    cp_names: list[str]
    lm: bytes | None
    lm_seconds: float
    audios: dict
    codec: object
    frame_count: int
    stream_file: Path


@dataclass
class Listing:
    """``ls -lR`` times: right after mounting, cold with the daemon idle, again; source."""

    busy: float
    cold: float
    warm: float
    source: float


@dataclass
class Copies:
    """The cps: seconds of each, the floors around them (seconds of each frame's decode),
    the frames the daemon decoded for each and its seconds doing so, its VmHWM after."""

    floors: list[list[float]]
    notes: list[str] = field(default_factory=list)
    cps: list[float] = field(default_factory=list)
    counts: list[list[int]] = field(default_factory=list)
    in_daemon: list[float] = field(default_factory=list)
    peak: int = 0

    @property
    def floor_mean(self) -> float:
        """The mean floor (a whole file's decode), over all of them."""
        return statistics.mean(sum(floor) for floor in self.floors)


def write_files(args: argparse.Namespace, work: Path) -> Files:
    """Encode (or read from cache) the files, write the source folder, load the model."""
    import synth
    from ecdcfs.container import MODELS
    from ecdcfs.engine import Engine, Settings

    seconds = args.seconds or (15 if args.quick else 60)
    repeat = args.repeat or (1 if args.quick else 2)
    lm_seconds = args.lm_seconds or 5
    log(f"encoding (or reading from cache) {seconds:g} s at 6 kbps ...")
    t, big = timed(synth.make_ecdc, MODEL, round(seconds * SR), 6, False, 1)
    log(f"  {len(big)} bytes in {t:.1f} s")
    small = synth.make_ecdc(MODEL, SR, 6, False, 0)
    lm = None
    if not args.no_lm:
        log(f"encoding (or reading from cache) {lm_seconds:g} s with the LM ...")
        t, lm = timed(synth.make_ecdc, MODEL, round(lm_seconds * SR), 6, True, 2)
        log(f"  {len(lm)} bytes in {t:.1f} s")

    src, out = work / "src", work / "out"
    for d in (src, work / "mnt", out):
        d.mkdir()
    (src / "warm.ecdc").write_bytes(small)
    # Same payload, another header: each file is a fresh identity for the frame cache.
    cp_names = [f"big{k + 1}" for k in range(repeat)]
    for k, name in enumerate(cp_names):
        data = big if k == 0 else synth.to_v193(big, SR, name=f"bench copy {k + 1}")
        (src / f"{name}.ecdc").write_bytes(data)
    for name in ["cold", "first"] + [f"seek{k + 1}" for k in range(engine.SEEK_FILES)]:
        (src / f"{name}.ecdc").write_bytes(synth.to_v193(big, SR, name=f"bench {name}"))
    stream_seconds = 15 if args.quick else 75
    log(f"encoding (or reading from cache) {stream_seconds} s for ecdc-stream ...")
    stream_file = work / f"stream-{stream_seconds}s.ecdc"
    stream_file.write_bytes(synth.make_ecdc(MODEL, stream_seconds * SR, 6, False, 3))
    if lm is not None:
        (src / "lm.ecdc").write_bytes(lm)
    n_files = args.files or (200 if args.quick else 2000)
    for tree in ("tree", "tree2"):
        for i in range(n_files):
            d = src / tree / f"d{i // FILES_PER_DIR:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i % FILES_PER_DIR:03d}.ecdc").write_bytes(small)

    # The baselines: encodec's eager decode, in this process.
    eager = Engine(Settings(device="cpu", exact=True, cache_mb=args.cache_mb, cache_dir=None))
    names = [*cp_names, "cold", "warm"] + [f"seek{k + 1}" for k in range(engine.SEEK_FILES)]
    audios = {name: eager.open(src / f"{name}.ecdc") for name in names}
    audios["stream"] = eager.open(stream_file)
    return Files(
        src=src,
        out=out,
        seconds=seconds,
        n_files=n_files,
        cp_names=cp_names,
        lm=lm,
        lm_seconds=lm_seconds,
        audios=audios,
        codec=eager.decoder(MODELS[MODEL]),
        frame_count=audios[cp_names[0]].layout.frame_count,
        stream_file=stream_file,
    )


def model_rss(env: dict) -> int:
    """The VmHWM of a process that imports ecdcfs and loads the model (model_rss.py)."""
    log("model RSS baseline (a process that imports ecdcfs and loads the model) ...")
    done = subprocess.run(
        [sys.executable, str(MODEL_RSS), MODEL], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"model RSS probe failed: {done.stderr[-2000:]}")
    rss = int(done.stdout.split()[-1])
    log(f"  {MODEL}: {mb(rss)}")
    return rss


def list_trees(f: Files, mount: Mount) -> tuple[Listing, list[str]]:
    """4, measured first: ``ls -lR`` right after mounting (the daemon may be loading
    models), then of another folder once the daemon is idle, then that folder again
    (kernel caches warm); and of the source folder."""
    run = ["ls", "-lR"]
    busy, _ = timed(run_quiet, [*run, str(mount.mnt / "tree")])
    idle, _ = timed(wait_idle, mount.pid)
    log(f"daemon idle {idle:.2f} s after the first ls")
    cold, _ = timed(run_quiet, [*run, str(mount.mnt / "tree2")])
    warm, _ = timed(run_quiet, [*run, str(mount.mnt / "tree2")])
    source = min(timed(run_quiet, [*run, str(f.src / "tree2")])[0] for _ in range(3))
    notes = []
    for tree in ("tree", "tree2"):
        listed = sum(len(names) for _, _, names in os.walk(mount.mnt / tree))
        if listed != f.n_files:
            notes.append(f"ls: the mount shows {listed} files in {tree}, expected {f.n_files}")
    log(
        f"ls -lR {f.n_files} files: {busy:.3f} s right after mounting, {cold:.3f} s "
        f"cold with the daemon idle, {warm:.3f} s again; source {source:.3f} s"
    )
    return Listing(busy, cold, warm, source), notes


def copy_files(f: Files, mount: Mount, names: list[str], prefix: str = "") -> Copies:
    """1, measured: a cp of each of ``names`` through the mount (to ``<prefix><name>.wav``),
    bracketed by floors (warm eager decodes), with the frames the daemon decoded during it."""
    log("warming the daemon's model (4 KiB of warm.wav) ...")
    with open(mount.mnt / "warm.wav", "rb") as fh:
        fh.read(PREAD)
    wait_idle(mount.pid)
    floor_decode(f.codec, f.audios["warm"])  # the first decodes of a process are slower
    c = Copies(floors=[floor_decode(f.codec, f.audios[names[0]])])
    log(f"floor: {sum(c.floors[0]):.2f} s for {f.frame_count} frames")
    for name in names:
        if not drop_caches() and not c.notes:
            c.notes.append("could not drop the page cache (not root?); files were never read")
        wait_idle(mount.pid)
        before = len(mount.decoded())
        load = os.getloadavg()[0]
        out = f.out / f"{prefix}{name}.wav"
        t, _ = timed(run_quiet, ["cp", str(mount.mnt / f"{name}.wav"), str(out)])
        wait_idle(mount.pid)
        ident = f.audios[name].identity
        units = [u for u in mount.decoded()[before:] if u.identity == ident]
        if not units:
            raise RuntimeError(f"no 'decoded unit' line in {mount.log} after a cp")
        c.cps.append(t)
        c.counts.append([u.index for u in units])
        c.in_daemon.append(sum(u.seconds for u in units))
        c.floors.append(floor_decode(f.codec, f.audios[name]))
        log(
            f"cp {name}.wav: {t:.2f} s (load {load:.2f}), {len(units)} frames decoded "
            f"in {c.in_daemon[-1]:.2f} s by the daemon; floor after: {sum(c.floors[-1]):.2f} s"
        )
    c.peak = proc_kib(mount.pid, "VmHWM") * 1024
    return c


def cp_ratios(c: Copies) -> tuple[float, float]:
    """Medians of cp / the mean of the floors around it, and of cp / the daemon's decodes."""
    runs = range(len(c.cps))
    ratios = [c.cps[k] / statistics.mean([sum(c.floors[k]), sum(c.floors[k + 1])]) for k in runs]
    return statistics.median(ratios), statistics.median(c.cps[k] / c.in_daemon[k] for k in runs)


def copy_rows(f: Files, mount: Mount, c: Copies, exact: Copies) -> tuple[list[Row], list[str]]:
    """1. cp / the mean of the floors around it, and / the daemon's own decode time; the
    same for the --exact mount's cp."""
    cp, cp_exact = f"{statistics.median(c.cps):.2f} s", f"{statistics.median(exact.cps):.2f} s"
    ratio, ratio_daemon = cp_ratios(c)
    ratio_exact, ratio_exact_daemon = cp_ratios(exact)
    frames = f"{f.frame_count} frames"
    rows = [
        Row(
            f"1. cp {f.seconds:g} s .wav / eager decode of its {frames}",
            cp,
            f"{c.floor_mean:.2f} s",
            ratio,
            "<= 0.40",
            ratio <= 0.40,
        ),
        Row(
            "   cp / the daemon's own decode time of those frames (same window)",
            cp,
            f"{statistics.median(c.in_daemon):.2f} s",
            ratio_daemon,
            "(info)",
            None,
        ),
        Row(
            "   --exact mount: cp / eager decode of its frames",
            cp_exact,
            f"{exact.floor_mean:.2f} s",
            ratio_exact,
            "<= 1.15",
            ratio_exact <= 1.15,
        ),
        Row(
            "   --exact mount: cp / the daemon's own decode time (same window)",
            cp_exact,
            f"{statistics.median(exact.in_daemon):.2f} s",
            ratio_exact_daemon,
            "<= 1.15",
            ratio_exact_daemon <= 1.15,
        ),
    ]
    big_ids = {f.audios[name].identity for name in f.cp_names}
    daemon_frames = [u.seconds for u in mount.decoded() if u.identity in big_ids]
    frame_times = [s for fl in c.floors for s in fl]
    interrupted = mount.log_text().count("ecdcfs.scheduler: interrupted unit")
    notes = [
        f"median decode of one frame: eager in-process {statistics.median(frame_times) * 1e3:.0f}"
        f" ms, in the default daemon {statistics.median(daemon_frames) * 1e3:.0f} ms (its "
        f"decodes run in parallel); read-ahead decodes it interrupted: {interrupted}",
    ]
    return rows, notes


def cold_preads(f: Files, mount: Mount, count: int) -> tuple[list[Row], list[str]]:
    """2. cold 4 KiB preads of cold.wav, each right after a warm decode of its frame."""
    cold = f.audios["cold"]
    header = len(cold.wav.header)
    fractions: list[float] = []
    for frac in PREAD_FRACTIONS:
        if len(fractions) < count and all(
            abs(frac - other) * f.frame_count >= 4 for other in fractions
        ):
            fractions.append(frac)
    notes: list[str] = []
    preads, pread_frames, single, in_daemon_frames = [], [], [], []
    with open(mount.mnt / "cold.wav", "rb", buffering=0) as fh:
        for frac in fractions:
            offset = header + int(cold.wav.data_bytes * frac) // PREAD * PREAD
            # The baseline, right before: one warm in-process decode of the same frame.
            single.append(floor_decode(f.codec, cold, int(frac * f.frame_count))[0])
            wait_idle(mount.pid)
            before = len(mount.decoded())
            t = time.perf_counter()
            data = os.pread(fh.fileno(), PREAD, offset)
            preads.append(time.perf_counter() - t)
            wait_idle(mount.pid)
            decoded_now = mount.decoded()[before:]
            pread_frames.append(len(decoded_now))
            in_daemon_frames += [u.seconds for u in decoded_now]
            if not within_lsb(data, cold.read(offset, PREAD)):  # 4096: a whole sample
                notes.append(f"pread at {offset} is not within 2 LSB of encodec's decode")
    pread, one_frame = statistics.median(preads), statistics.median(single)
    daemon_one = statistics.median(in_daemon_frames)
    rows = [
        Row(
            f"2. cold 4 KiB pread, median of {len(preads)} / one warm frame decode",
            f"{pread * 1e3:.0f} ms",
            f"{one_frame * 1e3:.0f} ms",
            pread / one_frame,
            "<= 2.5",
            pread / one_frame <= 2.5,
        ),
        Row(
            "   cold 4 KiB pread / the daemon's own decode of one frame (same window)",
            f"{pread * 1e3:.0f} ms",
            f"{daemon_one * 1e3:.0f} ms",
            pread / daemon_one,
            "<= 2.5",
            pread / daemon_one <= 2.5,
        ),
    ]
    notes.append(
        "cold preads (at % of the data): "
        + ", ".join(
            f"{frac:.0%}: {s * 1e3:.0f} ms" for frac, s in zip(fractions, preads, strict=True)
        )
        + "; frames the daemon decoded for each (read-ahead included): "
        + ", ".join(map(str, pread_frames))
        + "; in-process decode of one frame before each: "
        + ", ".join(f"{s * 1e3:.0f} ms" for s in single)
    )
    return rows, notes


def read_in_process(path: Path, cache_mb: int, cache: Path) -> tuple[int, float, bytes]:
    """(frames decoded, seconds, bytes) of reading ``path`` whole in 128 KiB reads through
    a fresh in-process Engine with the default decoder (its graphs in ``cache``)."""
    from ecdcfs.engine import Engine, Settings

    engine = Engine(Settings(device="cpu", cache_mb=cache_mb, cache_dir=cache))
    reader = engine.open(path).reader()
    chunks, offset = [], 0
    t = time.perf_counter()
    while chunk := reader.read(offset, CHUNK):
        chunks.append(chunk)
        offset += len(chunk)
    seconds = time.perf_counter() - t
    reader.close()
    engine.close()
    return engine.scheduler.decoded_count, seconds, b"".join(chunks)


def decode_counts(f: Files, copies: Copies, cache_mb: int, cache: Path) -> list[Row]:
    """3. frames decoded / needed, by the daemon during the cps and by an in-process
    Engine reading 128 KiB at a time; and every cp's bytes against the in-process ones."""
    needed = f.frame_count * len(f.cp_names)
    decoded = sum(len(c) for c in copies.counts)
    unique = sum(len(set(c)) for c in copies.counts)
    in_process, t_engine, reference = read_in_process(
        f.src / f"{f.cp_names[0]}.ecdc", cache_mb, cache
    )
    # Correctness: every cp equals the in-process AudioFile (header) and Engine (PCM).
    first = f.audios[f.cp_names[0]].wav
    reference_pcm = reference[len(first.header) : first.pcm_end]
    cp_ok = True
    for name in f.cp_names:
        got, wav = (f.out / f"{name}.wav").read_bytes(), f.audios[name].wav
        pcm = slice(len(wav.header), wav.pcm_end)
        cp_ok = cp_ok and got[: pcm.start] == wav.header and got[pcm.stop :] == wav.trailer
        cp_ok = cp_ok and got[pcm] == reference_pcm
    return [
        Row(
            "3. frames decoded / needed, cp (daemon, its debug log)",
            f"{decoded}",
            f"{needed}",
            decoded / needed,
            "= 1.00",
            decoded == unique == needed,
        ),
        Row(
            "   frames decoded / needed, 128 KiB reads (in-process Engine)",
            f"{in_process}",
            f"{f.frame_count}",
            in_process / f.frame_count,
            "= 1.00",
            in_process == f.frame_count,
        ),
        Row(
            "   in-process Engine 128 KiB reads / eager floor (info)",
            f"{t_engine:.2f} s",
            f"{copies.floor_mean:.2f} s",
            t_engine / copies.floor_mean,
            "(info)",
            None,
        ),
        Row(
            "   every cp output == in-process bytes (another process, the same bytes)",
            "equal" if cp_ok else "DIFFERENT",
            "",
            None,
            "equal",
            cp_ok,
        ),
    ]


def listing_rows(ls: Listing, n_files: int) -> list[Row]:
    """4. the ``ls -lR`` times measured right after mounting, each <= 2 s."""
    source = f"{ls.source:.3f} s"
    return [
        Row(f"{what} / ls -lR of the source", f"{t:.3f} s", source, t / ls.source, "<= 2 s", t <= 2)
        for what, t in (
            (f"4. ls -lR {n_files} files right after mounting", ls.busy),
            (f"   ls -lR {n_files} other files, cold, daemon idle", ls.cold),
            (f"   ls -lR {n_files} files again", ls.warm),
        )
    ]


def rss_rows(peak: int, rss: int, imported_torch: bool) -> list[Row]:
    """5. the daemon's VmHWM after the cps, absolute; whether it imported torch."""
    return [
        Row(
            "5. daemon VmHWM after the cps (graphs cached) / model-loading process",
            mb(peak),
            mb(rss),
            peak / rss,
            "<= 300 MiB",
            peak <= MAX_DAEMON_RSS,
        ),
        Row(
            "   the daemon imported torch",
            "yes" if imported_torch else "no",
            "",
            None,
            "no",
            not imported_torch,
        ),
    ]


def lm_file(f: Files, mount: Mount) -> tuple[list[Row], list[str]]:
    """6. the LM-coded file read through the mount / upstream's decode of it."""
    from encodec.compress import decompress

    import synth
    from ecdcfs.audiofile import wav_layout_of

    wait_idle(mount.pid)
    audio = len(wav_layout_of(f.src / "lm.ecdc").header)  # where its PCM starts
    t0 = time.perf_counter()
    with open(mount.mnt / "lm.wav", "rb", buffering=0) as fh:
        if len(os.pread(fh.fileno(), PREAD, audio)) != PREAD:
            raise RuntimeError("the first audio of lm.wav came short")
        ttfb = time.perf_counter() - t0
        fh.seek(0)
        rest = b"".join(iter(lambda: fh.read(CHUNK), b""))
    t_lm = time.perf_counter() - t0
    lm_wav = rest  # (the whole file, read after its first audio)
    _, meta, _ = synth.parse_header(f.lm)
    upstream_ok = synth.decodes_upstream(meta["al"], synth.load_model(MODEL))
    upstream = decompress if upstream_ok else synth.decompress_fixed
    label = "encodec.compress.decompress" if upstream_ok else "synth.decompress_fixed"
    t_up, (wav, _) = timed(upstream, f.lm)
    pcm = synth.float_to_pcm16(wav.detach().cpu().numpy()).T.astype("<i2").tobytes()
    header = lm_wav.index(b"data") + 8  # (no tags: the data chunk's header)
    lm_same = within_lsb(lm_wav[header : header + len(pcm)], pcm)
    s = f.lm_seconds
    rows = [
        Row(
            f"6. LM {s:g} s: first 4 KiB through the mount / upstream decompress",
            f"{ttfb:.2f} s",
            f"{t_up:.2f} s",
            ttfb / t_up,
            "(info)",
            None,
        ),
        Row(
            f"   LM {s:g} s: whole file through the mount / upstream decompress",
            f"{t_lm:.2f} s",
            f"{t_up:.2f} s",
            t_lm / t_up,
            "(info)",
            None,
        ),
        Row(
            "   LM file through the mount within 2 LSB of upstream's decode",
            "yes" if lm_same else "NO",
            "",
            None,
            "yes",
            lm_same,
        ),
    ]
    note = (
        f"LM baseline: {label} (loads the model and the LM, as upstream does); the "
        "mount's first read includes loading the LM and indexing the first frame"
    )
    return rows, [note]


def exact_mount(f: Files, work: Path, env: dict, extra: tuple) -> tuple[Copies, list, list]:
    """The ``--exact`` mount's cp of the first file and its seeks while playing."""
    base = work / "exact"
    base.mkdir()
    mount = Mount(f.src, base / "mnt", base, env, *extra, "--exact")
    log(f"mounted {mount.mnt} with --exact (daemon pid {mount.pid})")
    try:
        copies = copy_files(f, mount, f.cp_names[:1], prefix="exact-")
        preads, baselines = engine.seek_while_playing(mount, f.audios, f.codec)
    finally:
        mount.stop()
    return copies, preads, baselines


def main(args: argparse.Namespace) -> int:
    """Rows 1-6 and 10-13 on 48 kHz mounts, then (unless --no-24khz) rows 7-9; one table."""
    work, load_start = start_run("ecdcfs-bench-")
    import torch

    cache = work / "xdg" / "ecdcfs"  # the mounts' --cache-dir, and ecdc-stream's
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent)}
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads (--exact: the same)")
    f = write_files(args, work)
    rss = model_rss(env)
    log("building the decoder graphs (as a first mount does) ...")
    models = [MODEL] + ([] if args.no_24khz else [khz24.MODEL_24])
    graph_seconds = build_graphs(cache, *models)
    log(f"  {graph_seconds:.1f} s for {', '.join(models)}")
    extra = ("--cache-mb", str(args.cache_mb), "--cache-dir", str(cache))
    mount = Mount(f.src, work / "mnt", work, env, *extra)
    log(f"mounted {mount.mnt} (daemon pid {mount.pid})")
    try:
        listing, ls_notes = list_trees(f, mount)  # first: right after mounting
        copies = copy_files(f, mount, f.cp_names)
        imported_torch = torch_loaded(mount.pid)
        seek_preads, seek_baselines = engine.seek_while_playing(mount, f.audios, f.codec)
        cold = cold_preads(f, mount, args.preads)
        counts = decode_counts(f, copies, args.cache_mb, cache)
        lm = lm_file(f, mount) if f.lm is not None else ([], [])
        peak_end = proc_kib(mount.pid, "VmHWM") * 1024
    finally:
        mount.stop()
    exact, exact_preads, exact_baselines = exact_mount(f, work, env, extra)
    first_read = engine.first_read_after_mount(f.src, work, env, *extra)
    stream = engine.stream_rows(f.stream_file, f.audios["stream"], f.codec, env)
    data_bytes = f.audios[f.cp_names[0]].wav.data_bytes
    first_cp = f"{f.cp_names[0]}.wav"
    sections = [  # (rows, notes) of each, in the table's order
        ([], ls_notes + copies.notes),
        copy_rows(f, mount, copies, exact),
        cold,
        (counts, []),
        (listing_rows(listing, f.n_files), []),
        (rss_rows(copies.peak, rss, imported_torch), []),
        lm,
        (
            [
                engine.seek_rows(
                    f"10. 4 KiB pread far away right after {engine.SEQUENTIAL_S} s read, median "
                    f"of {len(seek_preads)}",
                    seek_preads,
                    seek_baselines,
                    0.8,
                ),
                engine.seek_rows(
                    "    the same through the --exact mount", exact_preads, exact_baselines
                ),
                Row(
                    "11. first 4 KiB read right after mounting (graphs cached)",
                    f"{first_read:.2f} s",
                    "",
                    None,
                    "<= 0.5 s",
                    first_read <= 0.5,
                ),
            ],
            [f"graphs built before the first mount: {graph_seconds:.1f} s ({', '.join(models)})"],
        ),
        stream,
        (
            engine.compare_rows(
                f.out / first_cp,
                f.out / f"exact-{first_cp}",
                data_bytes,
                engine.float_snr(f.audios[f.cp_names[0]], cache),
            ),
            [],
        ),
    ]
    extra_48 = ("--cache-mb", str(args.cache_mb))
    file_24 = khz24.ecdc_24khz(10, 5)
    sections.append(install.install_rows(work, f.src / "first.ecdc", file_24, env, *extra_48))
    if not args.no_24khz:
        sections.append(khz24.bench_24khz(args, work, env, cache))
    rows = [row for section_rows, _ in sections for row in section_rows]
    notes = [note for _, section_notes in sections for note in section_notes]
    print()
    print(
        f"ecdcfs bench: {f.seconds:g} s 48 kHz 6 kbps file ({f.frame_count} frames), "
        f"--cache-mb {args.cache_mb}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} "
        f"threads"
    )
    print(f"load average: start {load_start}, end {loadavg()}")
    notes.append(f"daemon VmHWM at the end (after the preads and the LM file): {mb(peak_end)}")
    print_report(rows, notes)
    return 0
