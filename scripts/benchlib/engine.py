"""The decode engine's rows (10-13), 48 kHz: the default decoder (ONNX Runtime, graphs
cached) beside ``--exact`` (encodec's own PyTorch decode), each against a warm eager
encodec decode in this process (``TorchDecoder.decode_frame``, in the baselines' thread).

10. a 4 KiB ``pread`` far into a file right after reading 2 s of its audio sequentially
    (128 KiB reads, as fast as the mount serves them: read-ahead is in flight), median of
    3 files never read / one warm eager decode of the pread's frame, measured right before.
11. the first 4 KiB read of a fresh mount (graphs cached), right after the mount point
    appears, absolute.
12. ``ecdc-stream -d`` of a 75 s file (15 s with --quick) to /dev/null, the whole process
    (start, imports, graph, decoding) / the eager decode of its frames.
13. the default mount's cp output against the ``--exact`` mount's (same audio): SNR, largest
    difference in LSB, share of samples that differ.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchlib.common import CHUNK, PREAD, SR, Row, floor_decode, log, wait_idle
from benchlib.daemon import Mount

SEEK_FILES = 3
SEQUENTIAL_S = 2  # seconds of audio read before the far pread
# (start of the sequential reads, the far pread), as fractions of the data, per file.
SEEKS = ((0.1, 0.8), (0.5, 0.15), (0.3, 0.9))


def seek_while_playing(mount: Mount, audios: dict, codec) -> tuple[list[float], list[float]]:
    """10: (pread seconds, baseline seconds) of each seek file (see the docstring)."""
    preads, baselines = [], []
    for k, (start, far) in enumerate(SEEKS[:SEEK_FILES]):
        name = f"seek{k + 1}"
        audio = audios[name]
        header, data = len(audio.wav.header), audio.wav.data_bytes
        first = header + int(data * start) // PREAD * PREAD
        target = header + int(data * far) // PREAD * PREAD
        frame = int(far * audio.layout.frame_count)
        baselines.append(floor_decode(codec, audio, frame)[0])
        wait_idle(mount.pid)
        with open(mount.mnt / f"{name}.wav", "rb", buffering=0) as fh:
            position = first
            while position < first + SEQUENTIAL_S * SR * 4:
                position += len(os.pread(fh.fileno(), CHUNK, position))
            t = time.perf_counter()
            got = os.pread(fh.fileno(), PREAD, target)
            preads.append(time.perf_counter() - t)
        if len(got) != PREAD:
            raise RuntimeError(f"pread of {name}.wav at {target} returned {len(got)} bytes")
        wait_idle(mount.pid)
    return preads, baselines


def seek_rows(
    label: str, preads: list[float], baselines: list[float], target: float | None = None
) -> Row:
    """Row 10 for one mount (``target`` None: for information)."""
    pread, base = statistics.median(preads), statistics.median(baselines)
    return Row(
        f"{label} / one eager frame decode",
        f"{pread * 1e3:.0f} ms",
        f"{base * 1e3:.0f} ms",
        pread / base,
        "(info)" if target is None else f"<= {target:g}",
        None if target is None else pread / base <= target,
    )


def first_read_after_mount(src: Path, work: Path, env: dict, *extra: str) -> float:
    """11: seconds of the first 4 KiB read (middle of first.wav) of a fresh mount."""
    base = work / "first-read"
    base.mkdir()
    mount = Mount(src, base / "mnt", base, env, *extra)
    try:
        path = mount.mnt / "first.wav"
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            got = os.pread(fh.fileno(), PREAD, size // 2 // PREAD * PREAD)
        seconds = time.perf_counter() - t
    finally:
        mount.stop()
    if len(got) != PREAD:
        raise RuntimeError(f"first read returned {len(got)} bytes")
    return seconds


def stream_decode(path: Path, env: dict, exact: bool) -> float:
    """12: seconds of the whole ``ecdc-stream -d PATH > /dev/null`` process."""
    command = [str(Path(sys.executable).with_name("ecdc-stream")), "-d", str(path)]
    if exact:
        command.append("--exact")
    t = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    t = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"ecdc-stream failed: {done.stderr.decode()[-2000:]}")
    return t


def stream_rows(path: Path, audio, codec, env: dict) -> tuple[list[Row], list[str]]:
    """12, for the default decoder and for --exact, against the eager decode of its frames."""
    seconds = audio.wav.data_bytes / (SR * 4)
    log(f"ecdc-stream -d of the {seconds:g} s file, default and --exact ...")
    default = stream_decode(path, env, exact=False)
    eager = sum(floor_decode(codec, audio))
    exact = stream_decode(path, env, exact=True)
    rows = [
        Row(
            f"12. ecdc-stream -d {seconds:g} s, whole process / eager decode of its frames",
            f"{default:.2f} s",
            f"{eager:.2f} s",
            default / eager,
            "<= 0.6",
            default / eager <= 0.6,
        ),
        Row(
            "    the same with --exact",
            f"{exact:.2f} s",
            f"{eager:.2f} s",
            exact / eager,
            "(info)",
            None,
        ),
    ]
    return rows, []


def float_snr(audio, cache: Path) -> float:
    """13: SNR of the default decoder's float samples of ``audio`` (an --exact AudioFile)
    against encodec's, before rounding to PCM (the figure the tests hold to >= 95 dB)."""
    from ecdcfs.engine import Engine, Settings
    from ecdcfs.onnx_decoder import snr_db

    default = Engine(Settings(device="cpu", cache_dir=cache))
    try:
        source = default.open(Path(audio.name))
        length = audio.header.audio_length
        return snr_db(audio.samples(0, length), source.samples(0, length))
    finally:
        default.close()


def compare_rows(default_wav: Path, exact_wav: Path, data_bytes: int, snr: float) -> list[Row]:
    """13: the default decoder's output against --exact's, for the same audio: ``snr`` of
    the float samples, then the PCM of the two cps."""
    from ecdcfs.onnx_decoder import snr_db

    default = np.frombuffer(default_wav.read_bytes()[-data_bytes:], "<i2").astype(np.float64)
    exact = np.frombuffer(exact_wav.read_bytes()[-data_bytes:], "<i2").astype(np.float64)
    error = default - exact
    pcm_snr = snr_db(exact, default)
    lsb = int(np.abs(error).max())
    share = float(np.mean(error != 0))
    return [
        Row(
            "13. default vs --exact: SNR of the samples",
            f"{snr:.1f} dB",
            "",
            None,
            ">= 95 dB",
            snr >= 95,
        ),
        Row("    largest difference of the cp outputs", f"{lsb} LSB", "", None, "<= 2", lsb <= 2),
        Row("    PCM samples that differ", f"{share:.2%}", "", None, "(info)", None),
        Row(
            "    SNR of the PCM (rounding included)", f"{pcm_snr:.1f} dB", "", None, "(info)", None
        ),
    ]
