"""ecdc-stream's command line, as Encodec-Stream's ``ecdc_stream.py`` reads it: one mode
(``-i``, ``-d``, ``-e``), arguments in any order, options that do not apply ignored (with
a warning), checked into :class:`Args` before anything runs."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from .encode import DEFAULT_BITRATE, BitrateError, parse_bitrate, plan_bitrate
from .settings import DEFAULT_BUFSIZE, TORCH_EXTRA, UsageError, torch_installed

PROG = "ecdc-stream"

USAGE = f"""\
usage: {PROG} -i <file-or-url>
       {PROG} [-ss <start>] [-to <end>] [-b <bufsize>] [-g <cuda-device>] [--exact] \
-d <file-or-url>
       {PROG} [-b <bitrate>] [-n <name>] [-s <source>] [-t <thumbnail>] [-g <cuda-device>] \
-e <file>

Encodec .ecdc files as raw PCM (s16le, 2 channels, 48 kHz), compatible with
Encodec-Stream's ecdc_stream.py. Arguments in any order; the file or URL is the
argument that is not an option's value.

  -i            print the header: Version, Name, Duration (s), Sample Rate, Bitrate,
                Thumbnail, Source (when present), then the other keys upper-cased;
                values JSON-encoded. A URL costs one small Range request.
  -d            decode to stdout: PCM only (messages go to stderr). Files at another
                rate are resampled to 48 kHz (soxr), mono goes to both channels. An
                LM-coded file's code index is saved in $XDG_CACHE_HOME/ecdcfs
                (~/.cache/ecdcfs, shared with ecdcfs, at most 256 MiB; emptied by
                ecdcfs --clear-cache), so a later seek into it skips the indexing.
    -ss S       start at S seconds (sample-accurate; a seek costs the same anywhere)
    -to S       stop at S seconds (past the end: the end)
    -b N        read-ahead: N frames at first, growing by N as playback advances
                (default 1); 0 decodes the whole file as fast as possible
    --exact     decode with encodec's own PyTorch model, bit for bit (default:
                its decoder on ONNX Runtime, within 2 LSB, faster and smaller,
                its graph built once into the cache dir above, as for ecdcfs);
                needs torch (pip install 'ecdcfs[torch]')
  -e            encode PCM from stdin (until EOF) to <file>, replaced atomically at the
                end; memory does not grow with the input. s16le, 2 channels, 48 kHz,
                or a 16-bit WAV file (its rate and 1 or 2 channels are read from its
                header). Needs torch (pip install 'ecdcfs[torch]')
    -b KBPS     bitrate, e.g. 6 or 6k (default 24), 0.25 to 192. 3 and up use the
                48 kHz model, below 3 the 24 kHz one. The bandwidth is
                3 * 2**floor(log2(KBPS / 3)) clamped to 1.5..24 and the audio is
                resampled by the rest of the factor: 3/6/12/24 -> sr 48000,
                9 -> 6 kbps at sr 72000, 1.5 -> 24 kHz model at sr 24000, 2 -> sr 32000,
                48 -> 24 kbps at sr 96000
    -n NAME     title (a value starting with a space is base64 of UTF-8)
    -s SRC      source URL
    -t THUMB    thumbnail URL
  -g N          CUDA device N (-1: the CPU); default: CUDA when available, else CPU
  -h, --help    this help
  --version     the version

examples:
  {PROG} -d song.ecdc | ffplay -f s16le -ac 2 -ar 48k -i -
  {PROG} -ss 60 -to 90 -d https://example.org/song.ecdc > part.pcm
  ffmpeg -i song.flac -f s16le -ac 2 -ar 48k - | {PROG} -b 24 -n Song -e song.ecdc

Header versions written: 0 (upstream's) when sr is the model's rate, else 193. Model
checkpoints load through torch.hub ($TORCH_HOME/hub/checkpoints). Exit status: 0, 1 on
a failure, 2 on bad arguments, 141 when stdout is closed early."""

MODES = {"-i": "info", "-d": "decode", "-e": "encode"}
VALUE_OPTIONS = ("-ss", "-to", "-b", "-g", "-n", "-s", "-t")
APPLIES = {
    "-ss": ("decode",),
    "-to": ("decode",),
    "-b": ("decode", "encode"),
    "-g": ("info", "decode", "encode"),
    "-n": ("encode",),
    "-s": ("encode",),
    "-t": ("encode",),
    "--exact": ("decode",),
}
FLAG_OPTIONS = ("--exact",)  # options without a value, ignored like the others elsewhere


@dataclass
class Args:
    mode: str = ""
    target: str = ""
    start: float = 0.0
    end: float | None = None
    bufsize: int = DEFAULT_BUFSIZE  # -d; 0: everything at once
    bitrate: float | int = DEFAULT_BITRATE  # -e
    name: str | None = None
    source: str | None = None
    thumbnail: str | None = None
    gpu: int | None = None
    exact: bool = False  # -d: encodec's own decode
    help: bool = False
    version: bool = False
    ignored: tuple[str, ...] = ()  # options that do not apply to the mode


def parse_args(argv: list[str]) -> Args:
    """Encodec-Stream's command line, checked (raises :class:`UsageError`)."""
    args = Args()
    values: dict[str, str] = {}
    modes: list[str] = []
    positional: list[str] = []
    errors: list[str] = []  # reported unless -h is there too
    tokens = iter(argv)
    for token in tokens:
        if token in ("-h", "--help"):
            args.help = True
        elif token == "--version":
            args.version = True
        elif token in FLAG_OPTIONS:
            values[token] = ""
        elif token in MODES:
            if token not in modes:
                modes.append(token)
        elif token in VALUE_OPTIONS:
            value = next(tokens, None)
            if value is None:
                errors.append(f"{token} needs a value")
            elif token in values:
                errors.append(f"{token} given twice")
            else:
                values[token] = value
        elif token == "--":
            positional.extend(tokens)
        elif token.startswith("-") and token != "-":
            errors.append(f"unknown option {token}")
        else:
            positional.append(token)
    if args.help or args.version:
        return args
    if errors:
        raise UsageError(errors[0])
    if not modes:
        raise UsageError("nothing to do: give -i, -d or -e")
    if len(modes) > 1:
        raise UsageError(f"give one of -i, -d, -e, not {' and '.join(modes)}")
    args.mode = MODES[modes[0]]
    if not positional:
        raise UsageError(f"{modes[0]} needs a file" + ("" if args.mode == "encode" else " or URL"))
    if len(positional) > 1:
        raise UsageError(f"one file at a time: {' '.join(positional)}")
    args.target = positional[0]
    args.ignored = tuple(k for k in values if args.mode not in APPLIES[k])
    for key in args.ignored:
        del values[key]
    args.exact = "--exact" in values
    if "-g" in values:
        args.gpu = _int(values["-g"], "-g")
    for needs, what in ((args.mode == "encode", "-e"), (args.exact, "--exact")):
        if needs and not torch_installed():
            raise UsageError(f"{what} needs torch: {TORCH_EXTRA}")
    if args.gpu is not None and args.gpu >= 0 and not torch_installed():
        raise UsageError(f"-g {args.gpu} needs torch: {TORCH_EXTRA}")
    if "-ss" in values:
        args.start = _seconds(values["-ss"], "-ss")
    if "-to" in values:
        args.end = _seconds(values["-to"], "-to")
        if args.end < args.start:
            raise UsageError(f"-to {values['-to']} is before -ss {args.start:g}")
    if "-b" in values and args.mode == "decode":
        args.bufsize = max(0, _int(values["-b"], "-b"))
    elif "-b" in values:
        try:
            args.bitrate = parse_bitrate(values["-b"])
            plan_bitrate(args.bitrate)
        except BitrateError as exc:
            raise UsageError(str(exc)) from None
    if "-n" in values:
        args.name = _name(values["-n"])
    args.source = values.get("-s")
    args.thumbnail = values.get("-t")
    return args


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{option} needs an integer, not {text!r}") from None


def _seconds(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{option} needs a time in seconds, not {text!r}")
    return value


def _name(text: str) -> str:
    """``-n``: a value starting with a space is base64 (how Encodec-Stream's callers pass
    arbitrary titles on a command line)."""
    if not text.startswith(" "):
        return text
    try:
        return base64.b64decode(text.encode("ascii") + b"==").decode("utf-8", "replace")
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise UsageError(f"-n: bad base64 name: {exc}") from None
