"""``ecdc-stream``: a drop-in for Encodec-Stream's ``ecdc_stream.py`` command line.

Bots and players drive it as a subprocess, with raw PCM (s16le, 2 channels, 48 kHz) on the
pipe::

    ecdc-stream -i <file-or-url>                      header info, "Key: value" lines
    ecdc-stream [-ss S] [-to S] [-b N] [-g DEV] -d <file-or-url>   .ecdc -> PCM on stdout
    ecdc-stream [-b KBPS] [-n NAME] [-s SRC] [-t THUMB] [-g DEV] -e <file>   PCM on stdin -> .ecdc

    ecdc-stream -d song.ecdc | ffplay -f s16le -ac 2 -ar 48k -i -
    ffmpeg -i song.flac -f s16le -ac 2 -ar 48k - | ecdc-stream -b 24 -e song.ecdc

Programs that imported Encodec-Stream's script for ``get_info(path)`` import
:func:`get_info` from here (the same dict as ``-i``, no torch import).

Arguments come in any order; the file or URL is the one that is not an option's value
(by convention the last). Decoding goes through ecdcfs's core (:class:`~ecdcfs.audiofile.
AudioFile`), so the PCM is encodec's own decode sample for sample, ``-ss``/``-to`` are
sample-accurate and a seek costs the same anywhere. http(s) URLs are read with Range
requests (only the header for ``-i``, only the frames needed for ``-d``), or as a plain
stream when the server ignores ranges.

Bitrates (``-e -b``) follow Encodec-Stream: from 3 kbps up the 48 kHz model, below it the
24 kHz model; the bitrate is a supported bandwidth ``3 * 2**floor(log2(kbps / 3))``
(clamped to 1.5..24) times a sample-rate factor, the audio is resampled to ``model rate *
factor`` (the ``sr`` key) and encoded at that bandwidth. 3/6/12/24 -> sr 48000; 9 -> 6
kbps at sr 72000; 1.5 -> 24 kHz model, 1.5 kbps, sr 24000; 2 -> sr 32000; 48 -> 24 kbps at
sr 96000. Accepted: 0.25 to 192 kbps.

Where it differs from Encodec-Stream, deliberately:

* PCM is ``round(x * 32767)`` after clipping (Encodec-Stream truncates toward zero), so
  ``-d`` output equals the data of the WAV file an ecdcfs mount shows.
* Files at another rate (``sr`` != 48000, 24 kHz files) are resampled with soxr instead
  of piping through ffmpeg; mono is copied to both channels. ``Duration`` and
  ``-ss``/``-to`` are in real seconds (``al / sr``; Encodec-Stream doubled 24 kHz
  durations and mis-timed seeks in files whose ``sr`` differs from the model's).
* ``-e`` streams: frames are encoded as the input arrives (memory does not grow with its
  length) and the header is written at the end; int16 -> float is ``x / 32767`` always
  (Encodec-Stream switches to 32768 if the whole input holds a -32768, which a stream
  cannot know in advance). The header is upstream's version 0 when ``sr`` is the model's
  rate (upstream ``encodec`` can decode it; readers ignore the extra keys), else 193.
* stdout carries PCM only; messages go to stderr; a closed pipe ends quietly (exit 141);
  ``-h`` prints usage to stdout and exits 0; bad arguments exit 2 with one line.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from . import version
from .container import EcdcError, Header, read_header
from .encode import BitrateError, plan_bitrate
from .pcm import PCM_BLOCK_ALIGN, PCM_RATE, all_at_once, output_length, pcm_chunks, source_units
from .settings import UsageError
from .source import as_stream, open_source, read_source_header
from .stream_args import PROG, USAGE, Args, parse_args

INDEXING_REFRESH_S = 0.2  # the indexing bar's update interval
EXIT_USAGE, EXIT_ERROR, EXIT_PIPE, EXIT_INTERRUPTED = 2, 1, 141, 130

# --------------------------------------------------------------------------------------
# -i
# --------------------------------------------------------------------------------------


def header_info(header: Header) -> dict[str, Any]:
    """Encodec-Stream's info dict: its keys, in its order (what ``-i`` prints)."""
    metadata = dict(header.metadata)
    info: dict[str, Any] = {"Version": header.version}
    if "n" in metadata:
        info["Name"] = metadata.pop("n")
    info["Duration"] = header.audio_length / header.sample_rate
    if "sr" in metadata:
        info["Sample Rate"] = metadata.pop("sr")
    if "br" in metadata:
        bitrate = metadata.pop("br")
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            bitrate = float(bitrate)
            bitrate = int(bitrate) if bitrate == int(bitrate) else bitrate
        info["Bitrate"] = bitrate
    if "t" in metadata:
        info["Thumbnail"] = metadata.pop("t")
    if "s" in metadata:
        info["Source"] = metadata.pop("s")
    info.update((key.upper(), value) for key, value in metadata.items())
    return info


def info_lines(header: Header) -> list[str]:
    """``-i`` output: :func:`header_info`'s items, values JSON-encoded."""
    return [f"{key}: {json.dumps(value)}" for key, value in header_info(header).items()]


def get_info(path_or_url: str | os.PathLike[str]) -> dict[str, Any]:
    """Encodec-Stream's ``get_info``: the header of a file or an http(s) URL as the keys and
    values ``-i`` prints (``-``: stdin, as for ``-i``).

    Only the header is read (a URL costs one small Range request) and torch is not
    imported, so a program that imported the vendored ``ecdc_stream`` for this can import
    it from here. Raises :class:`~ecdcfs.container.EcdcError` (no such file, an HTTP
    error, not an ECDC file).
    """
    return header_info(read_source_header(os.fspath(path_or_url), _stdin()))


# --------------------------------------------------------------------------------------
# -d and -e
# --------------------------------------------------------------------------------------


def run_decode(args: Args, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO) -> int:
    """``-d``: the range ``-ss``..``-to`` as PCM on stdout (:func:`~ecdcfs.pcm.pcm_chunks`)."""
    from .engine import Engine
    from .settings import Settings

    if _isatty(stdout):
        raise UsageError(
            "stdout is a terminal: pipe the PCM to a player "
            "(| ffplay -f s16le -ac 2 -ar 48k -i -) or redirect it to a file"
        )
    device = resolve_device(args.gpu, stderr)
    with contextlib.ExitStack() as stack:
        source = open_source(args.target, stdin)
        stack.callback(source.close)
        header = read_header(as_stream(source, block=1), source.size)
        duration = header.audio_length / header.sample_rate
        if args.start > duration:
            raise UsageError(f"-ss {args.start:g} is past the end ({duration:g} s)")
        total = output_length(header)
        start = min(total, round(args.start * PCM_RATE))
        stop = total if args.end is None else min(total, round(args.end * PCM_RATE))
        settings = Settings(device=device, bufsize=args.bufsize, exact=args.exact)
        units = source_units(header, start, stop)
        if args.bufsize == 0:  # the whole range as fast as possible
            settings = all_at_once(settings, header, units)
        engine = Engine(settings)
        stack.callback(engine.close)
        progress = _progress(stderr, _isatty(stderr) and _is_regular_file(stdout), stop - start)
        stack.callback(progress.close)
        audio = engine.open_byte_source(args.target, source)
        if _isatty(stderr):
            _show_indexing(audio, units.start, stderr)
        reader = audio.reader()
        for data in pcm_chunks(reader, start, stop):
            stdout.write(data)
            stdout.flush()
            progress.update(len(data) // PCM_BLOCK_ALIGN)
        reader.close()
    return 0


def run_encode(args: Args, stdin: BinaryIO, stderr: TextIO) -> int:
    """``-e``: PCM on stdin to the file (:func:`~ecdcfs.encode.encode_pcm`)."""
    from .encode import Tags, encode_pcm

    if _isatty(stdin):
        raise UsageError("stdin is a terminal: pipe PCM into it (s16le, 2 channels, 48 kHz)")
    out = Path(args.target)
    if out.is_dir():
        raise UsageError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a directory")
    device = resolve_device(args.gpu, stderr)
    progress = _progress(stderr, _isatty(stderr), total=None)
    try:
        encode_pcm(
            stdin,
            out,
            plan_bitrate(args.bitrate),
            device,
            tags=Tags(args.name, args.source, args.thumbnail),
            progress=progress.update,
            warn=functools.partial(_warn, stderr),
        )
    finally:
        progress.close()
    return 0


# --------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------


def resolve_device(gpu: int | None, stderr: TextIO) -> str | None:
    """``-g N``: ``cuda:N``; -1 (or no CUDA at all, with a warning): the CPU; None: default."""
    if gpu is None:
        return None
    if gpu < 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        _warn(stderr, f"-g {gpu}: no CUDA device available; using the CPU")
        return "cpu"
    count = torch.cuda.device_count()
    if gpu >= count:
        raise UsageError(f"-g {gpu}: there are {count} CUDA device(s) (0 to {count - 1})")
    return f"cuda:{gpu}"


def _stdin() -> BinaryIO:
    """The process's binary stdin (empty when fd 0 was closed)."""
    return sys.stdin.buffer if sys.stdin is not None else io.BytesIO()


def _warn(stderr: TextIO, message: str) -> None:
    stderr.write(f"{PROG}: warning: {message}\n")
    stderr.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _is_regular_file(stream: Any) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, ValueError, OSError):
        return False


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _show_indexing(audio: Any, unit: int, stderr: TextIO) -> None:
    """A tqdm bar while an LM-coded file's codes are indexed up to decode unit ``unit``.

    The LM decodes a file's codes in order, so a seek far into a long LM-coded file
    waits for every unit before it; plain files (no index) return at once.
    """
    index = audio.code_index()
    if index is None or index.has(unit):
        return
    from tqdm import tqdm

    with tqdm(
        total=unit + 1,
        initial=len(index),
        desc="indexing",
        unit=" units",
        file=stderr,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        while not index.wait(unit, INDEXING_REFRESH_S) and index.error is None:
            bar.update(min(len(index), unit + 1) - bar.n)
        bar.update(min(len(index), unit + 1) - bar.n)


def _progress(stderr: TextIO, enabled: bool, total: int | None) -> Any:
    """A tqdm bar in seconds of audio on stderr, or nothing."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(
        total=total,
        file=stderr,
        unit="s",
        unit_scale=1 / PCM_RATE,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]"
        if total
        else "{n:.1f} s [{elapsed}, {rate_fmt}]",
    )


def run(
    argv: list[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
) -> int:
    """The whole command with explicit streams (``main`` uses the process's)."""
    args = Args()
    try:
        args = parse_args(argv)
        if args.help:
            stdout.write(USAGE.encode() + b"\n")
            stdout.flush()
            return 0
        if args.version:
            stdout.write(f"{PROG} {version()}\n".encode())
            stdout.flush()
            return 0
        for option in args.ignored:
            _warn(stderr, f"{option} does not apply to -{args.mode[0]}; ignored")
        if args.mode == "info":
            header = read_source_header(args.target, stdin)
            stdout.write(("\n".join(info_lines(header)) + "\n").encode())
            stdout.flush()
            return 0
        if args.mode == "decode":
            return run_decode(args, stdin, stdout, stderr)
        return run_encode(args, stdin, stderr)
    except UsageError as exc:
        stderr.write(f"{PROG}: {exc} (see {PROG} -h)\n")
        return EXIT_USAGE
    except EcdcError as exc:
        message = str(exc)
        if args.target and args.target not in message:
            message = f"{args.target}: {message}"
        stderr.write(f"{PROG}: {message}\n")
        return EXIT_ERROR
    except BitrateError as exc:
        stderr.write(f"{PROG}: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        raise
    except OSError as exc:  # stdin, stdout or the output file
        stderr.write(f"{PROG}: {exc.strerror or exc}\n")
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``ecdc-stream``)."""
    if not logging.getLogger("ecdcfs").handlers:  # errors surface as exceptions, once
        logging.getLogger("ecdcfs").addHandler(logging.NullHandler())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # stdout carries PCM only: whatever else writes to fd 1 (torch.hub's "Downloading",
    # a print in a library) goes to stderr; the output keeps the original descriptor.
    stderr = sys.stderr or open(os.devnull, "w")  # noqa: SIM115 (None: fd 2 was closed)
    if sys.stdout is None:  # fd 1 was closed
        stderr.write(f"{PROG}: stdout is closed\n")
        return EXIT_ERROR
    sys.stdout.flush()
    out_fd = os.dup(sys.stdout.fileno())
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(stderr.fileno(), sys.stdout.fileno())
        sys.stdout = stderr
    out = os.fdopen(out_fd, "wb")
    stdin = _stdin()
    try:
        status = run(sys.argv[1:] if argv is None else argv, stdin, out, stderr)
        out.flush()
        return status
    except BrokenPipeError:
        # The reader went away (| head -c, a skipped song): stop quietly, like a tool
        # killed by SIGPIPE, and keep the final flush at exit from complaining.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out_fd)
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
