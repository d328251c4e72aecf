"""Rows 7-9 of the bench: 24 kHz files through a mount of their own.

The mount has the options of the 48 kHz one and serves plain (not LM-coded) 24 kbps files
(32 codebooks, the worst case) of random codes written straight into the container (every
10-bit code is valid, so random payload bytes decode at the cost of real ones; no encoder
needed):

7. a cold ``pread`` of 1 s of audio (48,000 bytes) near 45:00 of a one-hour file, median of
   up to 5 (``--preads``; 3 with --quick) at offsets in distinct 5 s chunks at least seven
   chunks apart (cold: a chunk neither decoded nor read ahead), daemon idle with its model
   warm / a warm eager in-process decode of 10 s of codes (750 steps,
   ``TorchDecoder.decode_frame``: one ``_decode_frame`` call) measured right before each;
   also / the daemon's own decode of the chunk (its debug log). Then the same preads with
   read-ahead in flight: each right after 1 s of audio read from another place of the file
   (its own read-ahead then decodes the chunks after it).
8. the daemon's VmHWM (reset to VmRSS first) while 3 minutes (30 s with --quick) of that
   file are read in 128 KiB reads from 10:00 / its VmRSS before; target 1 GiB absolute.
9. ``cp`` of a 60 s file (15 s with --quick) / a warm in-process decode of all its codes in
   one ``_decode_frame`` call (as ``encodec.decompress`` decodes a 24 kHz file), measured
   before and after the cp; the cp's PCM must be within 1 LSB of that decode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.common import (
    CHUNK,
    PREAD,
    Row,
    drop_caches,
    in_worker,
    loadavg,
    log,
    mb,
    print_report,
    run_quiet,
    start_run,
    timed,
    wait_idle,
)
from benchlib.daemon import Mount
from helpers import proc_kib, reset_peak_rss

SR_24 = 24_000
MODEL_24 = "encodec_24khz"
NC_24 = 32  # 24 kbps: the most codebooks, the worst case
STEPS_PER_S_24 = 75
BASELINE_STEPS_24 = 750  # 10 s of codes
PREAD_24 = 2 * SR_24  # the WAV bytes of 1 s (mono, 16-bit)
HOUR_24 = 3600
# Cold preads: half a second into chunks near 45:00 of the hour file, seven chunks or more
# apart (a read decodes its chunk and reads ahead one more; the kernel's read-ahead of
# 128 KiB, 2.7 s of audio, stays inside the chunk).
PREAD_AT_24 = (2700.5, 2735.5, 2665.5, 2770.5, 2630.5)
STREAM_FROM_24 = 600  # 10:00
PLAY_BEFORE_24 = 1200  # "while playing": 1 s read this many seconds before the pread


@dataclass
class Setup24:
    """The 24 kHz section's mount, files and warm in-process model."""

    mount: Mount
    codec: object
    hour: bytes  # the .ecdc bytes of the one-hour file
    short: bytes  # and of the file copied out with cp
    header: int  # the hour file's WAV header bytes (where its PCM starts)
    out: Path
    preads: int
    stream_seconds: float
    cp_seconds: float


def ecdc_24khz(seconds: float, seed: int) -> bytes:
    """A plain (not LM-coded) 24 kHz 24 kbps .ecdc file of random codes, without an encoder.

    Codes are 10-bit fields packed back to back and every value is a valid code, so random
    bytes of the payload's length are a valid payload; they decode at the cost of real ones.
    """
    import numpy as np

    import synth
    from ecdcfs.container import MODELS, FrameLayout

    samples = round(seconds * SR_24)
    payload = FrameLayout(MODELS[MODEL_24], samples, NC_24).plain_payload_bytes()
    return synth.container_24khz(samples, NC_24, np.random.default_rng(seed).bytes(payload))


def codes_24khz(data: bytes, start: int, stop: int):
    """Codes ``[codebooks, stop - start]`` (int64) of steps ``[start, stop)`` of a file made
    by :func:`ecdc_24khz`, unpacked as the daemon unpacks them."""
    from ecdcfs.causal import packed_steps
    from ecdcfs.container import MODELS, parse_header

    payload = memoryview(data)[parse_header(data, len(data)).payload_offset :]

    def read(offset: int, size: int) -> bytes:
        return bytes(payload[offset : offset + size])

    return packed_steps(read, NC_24, MODELS[MODEL_24].bits, start, stop).astype("int64")


def decode_24khz(codec, codes) -> tuple[float, object]:
    """(seconds, float32 audio) of one warm in-process decode of ``codes`` in one call of
    ``TorchDecoder.decode_frame`` (the model's ``_decode_frame``, as encodec decodes a 24 kHz
    file), in the worker thread the floors use."""
    from ecdcfs.container import EncodedFrame

    frame = EncodedFrame(codes, None)
    return in_worker(timed, lambda: codec.decode_frame(frame).audio)


def chunk_of(seconds: float) -> int:
    """The 24 kHz chunk that holds second ``seconds``."""
    from ecdcfs.causal import CHUNK_STEPS

    return int(seconds * STEPS_PER_S_24) // CHUNK_STEPS


def setup_24khz(args: argparse.Namespace, work: Path, env: dict, cache: Path) -> Setup24:
    """Write the files, load the model in-process, mount, and warm the daemon's model."""
    from ecdcfs.audiofile import wav_layout_of
    from ecdcfs.container import MODELS
    from ecdcfs.engine import Engine, Settings

    quick = args.quick
    base = work / "24khz"
    src, mnt, out = base / "src", base / "mnt", base / "out"
    for d in (src, mnt, out):
        d.mkdir(parents=True)
    cp_seconds = 15 if quick else 60
    log(f"24 kHz: writing a 1 h and a {cp_seconds} s file of random 24 kbps codes ...")
    hour, short = ecdc_24khz(HOUR_24, 1), ecdc_24khz(cp_seconds, 2)
    (src / "hour.ecdc").write_bytes(hour)
    (src / "short.ecdc").write_bytes(short)
    (src / "warm.ecdc").write_bytes(ecdc_24khz(1, 3))
    header = len(wav_layout_of(src / "hour.ecdc").header)

    codec = Engine(Settings(device="cpu", exact=True, cache_dir=None)).decoder(MODELS[MODEL_24])
    decode_24khz(codec, codes_24khz(hour, 0, BASELINE_STEPS_24))  # the first is slower
    extra = ("--cache-mb", str(args.cache_mb), "--cache-dir", str(cache))
    mount = Mount(src, mnt, base, env, *extra)
    log(f"24 kHz: mounted {mnt} (daemon pid {mount.pid}); warming its model (warm.wav) ...")
    with open(mnt / "warm.wav", "rb") as f:
        f.read(PREAD)
    wait_idle(mount.pid, timeout=300)
    return Setup24(
        mount=mount,
        codec=codec,
        hour=hour,
        short=short,
        header=header,
        out=out,
        preads=max(1, min(args.preads, 3 if quick else len(PREAD_AT_24))),
        stream_seconds=30 if quick else 180,
        cp_seconds=cp_seconds,
    )


def cold_preads_24khz(
    s: Setup24, while_playing: bool = False
) -> tuple[list[Row], list[str], float]:
    """7. cold 1 s preads near 45:00 of the hour file, each right after its baseline: a
    warm in-process decode of the 10 s of codes there (``while_playing``: each right after
    1 s of audio read elsewhere, with read-ahead in flight). Also returns the median
    baseline."""
    mount = s.mount
    at_list = [at + (30 if while_playing else 0) for at in PREAD_AT_24[: s.preads]]
    log(f"24 kHz: {len(at_list)} cold 1 s preads near 45:00 (while playing: {while_playing}) ...")
    preads, baselines, caused, notes = [], [], [], []
    with open(mount.mnt / "hour.wav", "rb", buffering=0) as f:
        for at in at_list:
            step = int(at * STEPS_PER_S_24)
            codes = codes_24khz(s.hour, step, step + BASELINE_STEPS_24)
            baselines.append(decode_24khz(s.codec, codes)[0])
            wait_idle(mount.pid, timeout=300)
            before = len(mount.decoded())
            if while_playing:  # 1 s from a minute later than the last pread: cold too
                played = s.header + 2 * round((at - PLAY_BEFORE_24) * SR_24)
                os.pread(f.fileno(), PREAD_24, played)
            t = time.perf_counter()
            data = os.pread(f.fileno(), PREAD_24, s.header + 2 * round(at * SR_24))
            preads.append(time.perf_counter() - t)
            wait_idle(mount.pid, timeout=300)  # its read-ahead, before the next baseline
            caused.append([(i, sec) for _, i, sec in mount.decoded()[before:]])
            if len(data) != PREAD_24:
                raise RuntimeError(f"pread of 1 s at {at} s returned {len(data)} bytes")
            if chunk_of(at) not in [i for i, _ in caused[-1]]:
                notes.append(f"24 kHz: the pread at {at} s was not cold (chunk not decoded)")
    pread, baseline = statistics.median(preads), statistics.median(baselines)
    own = statistics.median(
        [sec for at, c in zip(at_list, caused, strict=True) for i, sec in c if i == chunk_of(at)]
        or [float("nan")]
    )
    label = "read-ahead in flight" if while_playing else "daemon idle"
    target = 1.0 if while_playing else 3.0
    rows = [
        Row(
            f"7. 24 kHz: cold 1 s pread at ~45:00 of 1 h, {label}, median of {len(preads)} / "
            "eager decode of 10 s of codes",
            f"{pread:.2f} s",
            f"{baseline:.2f} s",
            pread / baseline,
            f"<= {target:g}",
            pread / baseline <= target,
        ),
        Row(
            "   cold 1 s pread / the daemon's own decode of its chunk (same window)",
            f"{pread:.2f} s",
            f"{own:.2f} s",
            pread / own,
            "(info)",
            None,
        ),
    ]
    note = (
        "24 kHz cold 1 s preads (at s): "
        + ", ".join(f"{at:g}: {t:.2f} s" for at, t in zip(at_list, preads, strict=True))
        + "; chunks the daemon decoded for each (read-ahead included): "
        + ", ".join("+".join(str(i) for i, _ in c) for c in caused)
        + "; 10 s baseline before each: "
        + ", ".join(f"{t:.2f} s" for t in baselines)
    )
    return rows, [note, *notes], baseline


def stream_24khz(s: Setup24, baseline_10s: float) -> tuple[list[Row], list[str]]:
    """8. the daemon's VmHWM while ``stream_seconds`` of the hour file are read from 10:00
    in 128 KiB reads (VmHWM reset to VmRSS first)."""
    mount, seconds = s.mount, s.stream_seconds
    log(f"24 kHz: streaming {seconds:g} s from 10:00 ...")
    wait_idle(mount.pid, timeout=300)
    hwm_before = proc_kib(mount.pid, "VmHWM") * 1024
    reset_peak_rss(mount.pid)
    rss_before = proc_kib(mount.pid, "VmRSS") * 1024
    before = len(mount.decoded())
    left = round(seconds * PREAD_24)
    t = time.perf_counter()
    with open(mount.mnt / "hour.wav", "rb", buffering=0) as f:
        f.seek(s.header + STREAM_FROM_24 * PREAD_24)
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            left -= len(chunk)
    elapsed = time.perf_counter() - t
    wait_idle(mount.pid, timeout=300)  # a read-ahead decode in flight at close
    if left:
        raise RuntimeError(f"streaming hour.wav: {left} bytes short")
    peak = proc_kib(mount.pid, "VmHWM") * 1024
    chunks = len(mount.decoded()) - before
    tens = seconds / 10
    rows = [
        Row(
            f"8. 24 kHz: daemon VmHWM streaming {seconds:g} s / its VmRSS before",
            mb(peak),
            mb(rss_before),
            peak / rss_before,
            "<= 1024 MiB",
            peak <= 1 << 30,
        ),
        Row(
            f"   {seconds:g} s streamed through the mount / {tens:g} x the 10 s decode (info)",
            f"{elapsed:.2f} s",
            f"{tens * baseline_10s:.2f} s",
            elapsed / (tens * baseline_10s),
            "(info)",
            None,
        ),
    ]
    note = (
        f"24 kHz streaming: daemon VmHWM before it (after the cold preads) {mb(hwm_before)}; "
        f"{chunks} chunks decoded for {chunk_of(seconds)} chunks of audio (read-ahead "
        "included)"
    )
    return rows, [note]


def cp_24khz(s: Setup24) -> tuple[list[Row], list[str]]:
    """9. ``cp`` of the short file / a warm in-process decode of the whole file in one
    call, measured before and after the cp; the cp's PCM within 1 LSB of that decode."""
    import numpy as np

    from ecdcfs.wav import float_to_pcm16

    mount, seconds = s.mount, s.cp_seconds
    steps = round(seconds * STEPS_PER_S_24)
    codes = codes_24khz(s.short, 0, steps)
    log(f"24 kHz: cp of the {seconds:g} s file, between two whole-file decodes ...")
    first, audio = decode_24khz(s.codec, codes)
    drop_caches()
    wait_idle(mount.pid, timeout=300)
    before = len(mount.decoded())
    t, _ = timed(run_quiet, ["cp", str(mount.mnt / "short.wav"), str(s.out / "short.wav")])
    wait_idle(mount.pid, timeout=300)
    in_daemon = mount.decoded()[before:]
    second, _ = decode_24khz(s.codec, codes)
    floor = (first + second) / 2
    own = sum(sec for _, _, sec in in_daemon)
    expected = np.frombuffer(float_to_pcm16(audio[:, : round(seconds * SR_24)]), "<i2")
    wav = (s.out / "short.wav").read_bytes()
    start = wav.index(b"data") + 8  # (no tags: the data chunk's header)
    got = np.frombuffer(wav[start : start + expected.size * 2], "<i2")
    close = got.shape == expected.shape and np.abs(got - expected.astype(np.int32)).max() <= 1
    rows = [
        Row(
            f"9. 24 kHz: cp {seconds:g} s .wav / warm whole-file decode in-process",
            f"{t:.2f} s",
            f"{floor:.2f} s",
            t / floor,
            "<= 1.2",
            t / floor <= 1.2,
        ),
        Row(
            "   cp / the daemon's own decode time of its chunks (same window)",
            f"{t:.2f} s",
            f"{own:.2f} s",
            t / own,
            "(info)",
            None,
        ),
        Row(
            "   cp output within 1 LSB of the whole-file decode",
            "yes" if close else "NO",
            "",
            None,
            "yes",
            close,
        ),
    ]
    note = (
        f"24 kHz cp: whole-file decodes {first:.2f} s before, {second:.2f} s after; the "
        f"daemon decoded {len(in_daemon)} chunks ({', '.join(str(i) for _, i, _ in in_daemon)})"
    )
    return rows, [note]


def bench_24khz(
    args: argparse.Namespace, work: Path, env: dict, cache: Path
) -> tuple[list[Row], list[str]]:
    """Rows 7-9: 24 kHz files through a fresh mount of their own (see the docstring), its
    decoder graph in ``cache``."""
    s = setup_24khz(args, work, env, cache)
    try:
        rows, notes, baseline_10s = cold_preads_24khz(s)
        sections = (
            cold_preads_24khz(s, while_playing=True)[:2],
            stream_24khz(s, baseline_10s),
            cp_24khz(s),
        )
        for more_rows, more_notes in sections:
            rows += more_rows
            notes += more_notes
    finally:
        s.mount.stop()
    notes.insert(
        0,
        "24 kHz files: random codes at 24 kbps (32 codebooks, the worst case), plain (not "
        f"LM-coded), on a mount of their own (--cache-mb {args.cache_mb})",
    )
    return rows, notes


def main(args: argparse.Namespace) -> int:
    """``--only-24khz``: the 24 kHz section alone, with its own table."""
    import torch

    from benchlib.common import build_graphs

    work, load_start = start_run("ecdcfs-bench-24khz-")
    cache = work / "cache"
    log(f"exporting the decoder graph: {build_graphs(cache, MODEL_24):.1f} s")
    rows, notes = bench_24khz(args, work, dict(os.environ), cache)
    print()
    print(
        f"ecdcfs bench, 24 kHz only: --cache-mb {args.cache_mb}, {os.cpu_count()} CPUs, "
        f"torch {torch.get_num_threads()} threads"
    )
    print(f"load average: start {load_start}, end {loadavg()}")
    print_report(rows, notes)
    return 0
