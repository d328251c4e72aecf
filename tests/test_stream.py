"""``ecdc-stream``: every flag, against files made here, exact where the audio is exact.

The real console script runs as a subprocess where the process boundary matters (pipes,
exit status, stderr, a server on another socket); finer checks call ``stream.run`` in
process (importing torch costs seconds per process on a small machine).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soxr
import torch
from encodec.compress import compress, decompress

import synth
from ecdcfs import stream
from ecdcfs.container import EcdcError
from ecdcfs.encode import int16_to_float, parse_bitrate, plan_bitrate
from ecdcfs.engine import Engine
from ecdcfs.http import HttpSource, RemoteError
from ecdcfs.settings import Settings, default_cache_dir
from helpers import SONG_SAMPLES, SONG_TAGS

SCRIPT = Path(sys.executable).parent / "ecdc-stream"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "ecdcfs.stream"]
RATE = 48_000
SAMPLES, (NAME, SOURCE, THUMB) = SONG_SAMPLES, SONG_TAGS


# --------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------


def on_cpu(args: tuple[str, ...]) -> list[str]:
    """Exact comparisons need encodec's own decode on the CPU: ``-g -1 --exact`` unless the
    test picks a device (or ``--default``: the default decoder)."""
    if "--default" in args:
        return [a for a in args if a != "--default"]
    exact = ["--exact"] if "-d" in args else []  # it applies to -d only
    return list(args) if "-g" in args else ["-g", "-1", *exact, *args]


def cli(*args: str, input: bytes | None = None, env: dict | None = None, cwd=None):
    """The installed console script; stdout as bytes, stderr as text."""
    result = subprocess.run(
        [*CLI, *on_cpu(args)],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )
    return result.returncode, result.stdout, result.stderr.decode()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(*args: str, stdin: bytes = b"", stderr: io.StringIO | None = None):
    """``ecdc-stream`` in process: (exit status, stdout bytes, stderr text)."""
    out, err = io.BytesIO(), stderr if stderr is not None else io.StringIO()
    rc = stream.run(on_cpu(args), io.BytesIO(stdin), out, err)
    return rc, out.getvalue(), err.getvalue()


def pcm_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").reshape(-1, 2)


def snr_db(out: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = ((out.astype(np.float64) - ref) ** 2).sum()
    return 10 * np.log10((ref**2).sum() / max(noise, 1e-12))


def resampled_reference(ref: np.ndarray, rate: int) -> np.ndarray:
    """soxr's resample of the whole reference PCM to 48 kHz, as int16 ``[n, channels]``."""
    x = soxr.resample(ref.astype(np.float32) / 32767, rate, RATE)
    return np.rint(np.clip(x, -1, 1) * 32767).astype(np.int16).reshape(len(x), -1)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ecdc-stream: ") and "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def test_help():
    rc, out, err = cli("-h")
    assert rc == 0 and err == ""
    text = out.decode()
    assert text.startswith("usage: ecdc-stream")
    for flag in ("-i", "-d", "-e", "-ss", "-to", "-b", "-g", "-n", "-s", "-t", "ffplay"):
        assert flag in text
    # -d of an LM-coded file persists its code index where an Engine keeps them.
    assert "LM-coded file's code index is saved in $XDG_CACHE_HOME/ecdcfs" in text
    assert f"at most {Settings().cache_dir_mb} MiB" in text and "ecdcfs --clear-cache" in text


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (["-x", "-d", "f.ecdc"], b"", "unknown option -x"),
        (["f.ecdc"], b"", "give -i, -d or -e"),
        ([], b"", "give -i, -d or -e"),
        (["-i", "-d", "f.ecdc"], b"", "one of"),
        (["-d"], b"", "needs a file"),
        (["-d", "a.ecdc", "b.ecdc"], b"", "one file"),
        (["-ss"], b"", "needs a value"),
        (["-ss", "abc", "-d", "f.ecdc"], b"", "-ss"),
        (["-ss", "-1", "-d", "f.ecdc"], b"", "-ss"),
        (["-ss", "3", "-to", "2", "-d", "f.ecdc"], b"", "before"),
        (["-b", "1.5", "-d", "f.ecdc"], b"", "integer"),
        (["-g", "x", "-d", "f.ecdc"], b"", "integer"),
        (["-b", "6", "-b", "6", "-e", "o.ecdc"], b"", "twice"),
        (["-b", "fast", "-e", "o.ecdc"], b"x", "bad bitrate"),
        (["-b", "0", "-e", "o.ecdc"], b"x", "bad bitrate"),
        (["-b", "-6", "-e", "o.ecdc"], b"x", "bad bitrate"),
        (["-b", "nan", "-e", "o.ecdc"], b"x", "bad bitrate"),
        (["-b", "1000", "-e", "o.ecdc"], b"x", "out of range"),
        (["-n", " abcde", "-e", "o.ecdc"], b"x", "base64"),
        (["-d", "missing.ecdc"], b"", "missing.ecdc"),
        (["-i", "missing.ecdc"], b"", "No such file"),
        (["-i", "ftp://example.org/x.ecdc"], b"", "http"),
        (["-e", "no/such/dir/o.ecdc"], b"x", "not a directory"),
    ],
)
def test_bad_arguments_one_line(tmp_path, args, stdin, needle):
    rc, out, err = run(*args, stdin=stdin)
    assert rc != 0 and out == b""
    assert needle in one_line(err)


def test_bad_arguments_through_the_console_script(songs, tmp_path):
    rc, out, err = cli("-q", "-d", str(songs["v0"]))
    assert rc == 2 and out == b"" and "unknown option -q" in one_line(err)
    rc, out, err = cli("-d", str(tmp_path / "missing.ecdc"))
    assert rc == 1 and out == b"" and "missing.ecdc" in one_line(err)
    rc, out, err = cli("-ss", "3.2", "-d", str(songs["v0"]))  # the file lasts 3.125 s
    assert rc == 2 and out == b"" and "past the end" in one_line(err)
    (tmp_path / "junk.ecdc").write_bytes(b"RIFF" + bytes(100))
    rc, out, err = cli("-d", str(tmp_path / "junk.ecdc"))
    assert rc == 1 and out == b"" and "not an ECDC file" in one_line(err)


def test_option_of_another_mode_is_ignored_with_a_warning(songs):
    rc, out, err = run("-ss", "1", "-i", str(songs["v0"]))
    assert rc == 0 and out.startswith(b"Version: 0\n")
    assert err == "ecdc-stream: warning: -ss does not apply to -i; ignored\n"
    rc, out, err = run("--exact", "-i", str(songs["v0"]))
    assert rc == 0 and out.startswith(b"Version: 0\n")
    assert err == "ecdc-stream: warning: --exact does not apply to -i; ignored\n"


def test_pcm_is_not_written_to_a_terminal(songs):
    class TerminalOut(io.BytesIO):
        def isatty(self) -> bool:
            return True

    err = io.StringIO()
    rc = stream.run(["-g", "-1", "-d", str(songs["v0"])], io.BytesIO(), TerminalOut(), err)
    assert rc == 2 and "terminal" in one_line(err.getvalue())


# --------------------------------------------------------------------------------------
# -i
# --------------------------------------------------------------------------------------


def test_info_v0(songs):
    rc, out, err = cli("-i", str(songs["v0"]))
    assert (rc, err) == (0, "")
    assert out.decode().splitlines() == [
        "Version: 0",
        f"Duration: {json.dumps(SAMPLES / 48_000)}",
        'M: "encodec_48khz"',
        f"AL: {SAMPLES}",
        "NC: 4",
        "LM: false",
    ]


def test_info_v193(songs):
    rc, out, err = run(str(songs["v193"]), "-i")
    assert (rc, err) == (0, "")
    assert out.decode().splitlines() == [
        "Version: 193",
        f"Name: {json.dumps(NAME)}",
        f"Duration: {json.dumps(SAMPLES / 48_000)}",
        "Sample Rate: 48000",
        "Bitrate: 6",
        f"Thumbnail: {json.dumps(THUMB)}",
        f"Source: {json.dumps(SOURCE)}",
        'M: "encodec_48khz"',
        f"AL: {SAMPLES}",
        "NC: 4",
        "LM: false",
    ]


def test_info_duration_is_in_real_seconds(songs):
    """al / sr, and the model's rate without sr (Encodec-Stream doubled 24 kHz songs)."""
    lines = run("-i", str(songs["v193_44k"]))[1].decode().splitlines()
    assert f"Duration: {json.dumps(SAMPLES / 44_100)}" in lines
    assert "Sample Rate: 44100" in lines
    lines = run("-i", str(songs["v0_24k"]))[1].decode().splitlines()
    assert "Duration: 3.0" in lines and 'M: "encodec_24khz"' in lines


def info_as_lines(info: dict) -> list[str]:
    """How Encodec-Stream's ``-i`` prints ``get_info``'s dict."""
    return [f"{key}: {json.dumps(value)}" for key, value in info.items()]


@pytest.mark.parametrize("key", ["v0", "v193", "v193_44k", "v0_24k"])
def test_get_info_is_what_dash_i_prints(songs, key):
    info = stream.get_info(str(songs[key]))
    assert info_as_lines(info) == run("-i", str(songs[key]))[1].decode().splitlines()
    assert stream.get_info(songs[key]) == info  # a Path too
    assert isinstance(info["Version"], int) and isinstance(info["Duration"], float)


def test_get_info_values(songs):
    assert stream.get_info(songs["v193"]) == {
        "Version": 193,
        "Name": NAME,
        "Duration": SAMPLES / 48_000,
        "Sample Rate": 48_000,
        "Bitrate": 6,
        "Thumbnail": THUMB,
        "Source": SOURCE,
        "M": "encodec_48khz",
        "AL": SAMPLES,
        "NC": 4,
        "LM": False,
    }


def test_get_info_errors_are_ecdc_errors(tmp_path):
    with pytest.raises(EcdcError, match="No such file"):
        stream.get_info(tmp_path / "missing.ecdc")
    (tmp_path / "junk.ecdc").write_bytes(b"RIFF" + bytes(100))
    with pytest.raises(EcdcError, match="not an ECDC file"):
        stream.get_info(tmp_path / "junk.ecdc")


def readme_shim() -> str:
    """The ``ecdc_stream.py`` shim the README shows."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    return "# ecdc_stream.py" + readme.split("```python\n# ecdc_stream.py", 1)[1].split("```")[0]


def test_readme_shim_replaces_the_vendored_script(songs, tmp_path):
    """Imported (``get_info``, without torch) and run as a script (``-i``), as bots do."""
    (tmp_path / "ecdc_stream.py").write_text(readme_shim())
    assert len(readme_shim().strip().splitlines()) == 3  # a comment and two lines
    code = (
        "import json, sys, ecdc_stream\n"
        "print(json.dumps(ecdc_stream.get_info(sys.argv[1])))\n"
        "assert 'torch' not in sys.modules and 'encodec' not in sys.modules"
    )
    imported = subprocess.run(
        [sys.executable, "-c", code, str(songs["v193"])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert (imported.returncode, imported.stderr) == (0, "")
    assert json.loads(imported.stdout) == stream.get_info(songs["v193"])
    script = subprocess.run(
        [sys.executable, "ecdc_stream.py", "-i", str(songs["v193"])],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert (script.returncode, script.stderr) == (0, b"")
    assert script.stdout == cli("-i", str(songs["v193"]))[1]


# --------------------------------------------------------------------------------------
# -d
# --------------------------------------------------------------------------------------


def test_decode_equals_reference_through_a_pipe(songs):
    """The console script's stdout is exactly encodec's decode as PCM (v0 and v193)."""
    rc, out, err = cli("-d", str(songs["v193"]))
    assert (rc, err) == (0, "")
    assert out == synth.reference_pcm(songs["v0"].read_bytes()).astype("<i2").tobytes()


def test_default_decode_is_ecdcfs_default_engine_within_2_lsb_of_encodec(
    songs, default_cache, tmp_path
):
    """Without --exact, -d runs the engine ecdcfs runs (graphs from the shared cache dir)."""
    (tmp_path / "xdg").mkdir()
    default_cache.rename(tmp_path / "xdg" / "ecdcfs")  # $XDG_CACHE_HOME/ecdcfs
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    rc, out, err = cli("--default", "-g", "-1", "-d", str(songs["v0"]), env=env)
    assert (rc, err) == (0, "")
    expected = synth.reference_pcm(songs["v0"].read_bytes())
    pcm = pcm_array(out)
    assert pcm.shape == expected.shape
    assert np.abs(pcm.astype(np.int32) - expected).max() <= 2
    engine = Engine(Settings(device="cpu", cache_dir=tmp_path / "xdg" / "ecdcfs"))
    try:
        audio = engine.open(songs["v0"])
        assert out == audio.read(0, audio.size)[len(audio.wav.header) : audio.wav.pcm_end]
    finally:
        engine.close()


def test_decode_from_stdin(songs):
    v0 = songs["v0"].read_bytes()
    rc, out, err = run("-ss", "2", "-to", "2.5", "-d", "-", stdin=v0)
    assert (rc, err) == (0, "")
    assert out == synth.reference_pcm(v0)[96_000:120_000].astype("<i2").tobytes()
    assert run("-i", "-", stdin=v0)[1] == run("-i", str(songs["v0"]))[1]


def test_decode_v0_and_bufsizes(songs):
    expected = synth.reference_pcm(songs["v0"].read_bytes()).astype("<i2").tobytes()
    for bufsize in ("1", "0", "3"):
        rc, out, err = run("-b", bufsize, "-d", str(songs["v0"]))
        assert (rc, err) == (0, "")
        assert out == expected, f"-b {bufsize}"


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("1", "1.5"),  # inside frames
        ("0.99", "1"),  # 47,520 .. 48,000: exactly the overlap of frames 0 and 1
        ("0.9", "2.1"),  # across two overlaps
        ("1.98", None),  # from frame boundary 2 (95,040) to the end
        ("3.1", None),  # the last 1,200 samples
        ("2.5", "10"),  # -to past the end
        ("0.000021", "0.0001"),  # a single sample in, a few samples long
        ("3.125", None),  # exactly the end: nothing
    ],
)
def test_seek_is_sample_accurate(songs, start, end):
    ref = synth.reference_pcm(songs["v0"].read_bytes())
    args = ["-ss", start] + (["-to", end] if end else []) + ["-d", str(songs["v0"])]
    rc, out, err = run(*args)
    assert (rc, err) == (0, "")
    first = round(float(start) * RATE)
    last = min(len(ref), round(float(end) * RATE)) if end else len(ref)
    assert out == ref[first:last].astype("<i2").tobytes()


def test_resampled_v193(songs):
    """sr 44,100 -> 48 kHz with soxr: the whole file, and a seek that lands on the same
    samples (the resampler starts on a common grid point before it)."""
    ref = resampled_reference(synth.reference_pcm(songs["v0"].read_bytes()), 44_100)
    rc, out, err = run("-d", str(songs["v193_44k"]))
    assert (rc, err) == (0, "")
    whole = pcm_array(out)
    assert whole.shape == ref.shape  # round(150,000 * 48,000 / 44,100)
    assert snr_db(whole, ref) > 40
    rc, out, err = run("-ss", "1.3", "-to", "2.2", "-d", str(songs["v193_44k"]))
    part = pcm_array(out)
    assert part.shape == (round(0.9 * RATE), 2)
    assert np.abs(part.astype(int) - whole[62_400:105_600]).max() <= 1
    assert snr_db(part, ref[62_400:105_600]) > 40


def test_24khz_file_is_resampled_and_duplicated(songs):
    ref = resampled_reference(synth.reference_pcm(songs["v0_24k"].read_bytes()), 24_000)
    rc, out, err = run("-d", str(songs["v0_24k"]))
    assert (rc, err) == (0, "")
    pcm = pcm_array(out)
    assert len(pcm) == 2 * 72_000 == len(ref)
    assert (pcm[:, 0] == pcm[:, 1]).all()
    assert snr_db(pcm[:, 0], ref[:, 0]) > 40
    rc, out, err = run("-ss", "1.2345", "-to", "2", "-d", str(songs["v0_24k"]))
    part = pcm_array(out)
    assert len(part) == 96_000 - round(1.2345 * RATE)
    assert np.abs(part.astype(int) - pcm[round(1.2345 * RATE) : 96_000]).max() <= 1


def test_24khz_seek_across_chunks(torch_home, tmp_path):
    """Past 10 s a 24 kHz file decodes in the core's chunks; seeks across a seam, with -b 0
    too, give the samples of the whole decode."""
    path = tmp_path / "long24.ecdc"
    path.write_bytes(synth.make_ecdc("encodec_24khz", 252_000, kbps=1.5))  # 10.5 s
    rc, out, err = run("-d", str(path))
    assert (rc, err) == (0, "")
    whole = pcm_array(out)
    assert len(whole) == 504_000
    rc, out, err = run("-b", "0", "-ss", "9.75", "-to", "10.25", "-d", str(path))
    assert np.abs(pcm_array(out).astype(int) - whole[468_000:492_000]).max() <= 1


def test_seek_into_an_lm_file_shows_indexing_progress(torch_home, tmp_path, monkeypatch):
    data = synth.make_ecdc("encodec_48khz", 2 * RATE + 1000, kbps=3, lm=True)  # 3 frames
    path = synth.write(tmp_path, "lm.ecdc", data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no index persisted yet
    rc, out, err = run("-ss", "1.5", "-d", str(path), stderr=Terminal())
    assert rc == 0 and "indexing" in err  # the codes of frames 0 and 1 come first
    assert out == synth.reference_pcm(data)[RATE * 3 // 2 :].astype("<i2").tobytes()
    # As -h says: the index persists in the cache dir and the next seek skips indexing.
    assert default_cache_dir() == tmp_path / "xdg" / "ecdcfs"
    assert len(list(default_cache_dir().glob("*.codes.npz"))) == 1
    rc, again, err = run("-ss", "1.5", "-d", str(path), stderr=Terminal())
    assert (rc, again) == (0, out) and "indexing" not in err


def test_closed_stdout_ends_quietly(songs):
    """| head -c: no traceback, the SIGPIPE-style status 141."""
    proc = subprocess.Popen(
        [*CLI, "-g", "-1", "-d", str(songs["v0"])],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert len(proc.stdout.read(1000)) == 1000
    proc.stdout.close()
    rc = proc.wait(timeout=300)
    assert (rc, proc.stderr.read()) == (141, b"")


# --------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------


def test_http_source_reads_ranges(serve):
    data = os.urandom(300_000)
    base, server = serve({"/f": data})
    source = HttpSource(base + "/f", block_size=4096, probe_size=1000)
    assert source.size == len(data) and source.ranged
    assert server.served == 1000
    rng = np.random.default_rng(0)
    for _ in range(50):
        offset = int(rng.integers(0, len(data)))
        size = int(rng.integers(0, 20_000))
        assert source.read(offset, size) == data[offset : offset + size]
    assert source.read(len(data) - 10, 100) == data[-10:]
    assert source.read(len(data), 10) == b""
    assert server.served < 2 * len(data)
    fresh = HttpSource(base + "/f", block_size=4096, probe_size=1000)
    assert fresh.identity == source.identity
    server.files["/f"] = data + b"more"
    assert HttpSource(base + "/f").identity != source.identity
    with pytest.raises(RemoteError, match="changed"):
        fresh.read(200_000, 10)


@pytest.mark.parametrize("lengths", [True, False])
def test_http_source_without_ranges(serve, lengths):
    data = os.urandom(200_000)
    base, server = serve({"/f": data}, ranges=False, lengths=lengths)
    source = HttpSource(base + "/f")
    assert not source.ranged
    assert source.read(150_000, 1000) == data[150_000:151_000]
    assert source.size == len(data)
    assert source.read(0, 10) == data[:10]


def test_http_errors_are_one_line(serve):
    base, _ = serve({})
    rc, out, err = run("-i", base + "/nothing.ecdc")
    assert rc == 1 and "404" in one_line(err)
    rc, out, err = run("-i", "http://127.0.0.1:9/x.ecdc")  # nothing listens on port 9
    assert rc == 1 and "127.0.0.1:9" in one_line(err)


def test_url_info_fetches_only_the_header(songs, serve):
    data = synth.long_plain_file(songs["v0"].read_bytes(), 600)  # 10 minutes, ~450 KB
    base, server = serve({"/long.ecdc": data})
    (songs["v0"].parent / "long.ecdc").write_bytes(data)
    rc, out, err = cli("-i", base + "/long.ecdc")
    assert (rc, err) == (0, "")
    assert out == run("-i", str(songs["v0"].parent / "long.ecdc"))[1]
    assert f"Duration: {(600 * 47_520 + 7_440) / 48_000}".encode() in out
    assert server.served <= 8192 < len(data) // 50


def test_url_seek_fetches_only_what_it_decodes(songs, serve):
    data = synth.long_plain_file(songs["v0"].read_bytes(), 600)
    local = songs["v0"].parent / "long.ecdc"
    local.write_bytes(data)
    base, server = serve({"/long.ecdc": data})
    rc, out, err = cli("-ss", "590", "-to", "590.5", "-d", base + "/long.ecdc")
    assert (rc, err) == (0, "")
    assert len(out) == 24_000 * 4
    assert out == run("-ss", "590", "-to", "590.5", "-d", str(local))[1]
    assert server.served < len(data) // 4


def test_get_info_of_a_url_fetches_only_the_header(songs, serve):
    data = synth.long_plain_file(songs["v0"].read_bytes(), 600)
    (songs["v0"].parent / "long.ecdc").write_bytes(data)
    base, server = serve({"/long.ecdc": data})
    assert stream.get_info(base + "/long.ecdc") == stream.get_info(songs["v0"].parent / "long.ecdc")
    assert server.served <= 8192
    with pytest.raises(EcdcError, match="404"):
        stream.get_info(base + "/nothing.ecdc")


def test_url_without_range_support_still_plays(songs, serve):
    v0 = songs["v0"].read_bytes()
    base, server = serve({"/a.ecdc": v0}, ranges=False)
    rc, out, err = run("-ss", "1", "-to", "2", "-d", base + "/a.ecdc")
    assert (rc, err) == (0, "")
    assert out == synth.reference_pcm(v0)[48_000:96_000].astype("<i2").tobytes()
    rc, out, err = run("-i", base + "/a.ecdc")
    assert rc == 0 and out == run("-i", str(songs["v0"]))[1]


# --------------------------------------------------------------------------------------
# -e
# --------------------------------------------------------------------------------------


def input_pcm(samples: int, seed: int = 7) -> np.ndarray:
    """int16 ``[2, samples]`` test input at 48 kHz, with one -32768 in it."""
    x = synth.synth_audio(RATE, 2, samples, seed=seed, amplitude=0.5)
    pcm = np.rint(np.clip(x, -1, 1) * 32767).astype(np.int16)
    pcm[1, samples // 3] = -32768
    return pcm


def read_ecdc(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    version, meta, offset = synth.parse_header(data)
    return version, meta, data[offset:]


def reference_encode(model_name: str, kbps: float, wav: torch.Tensor) -> bytes:
    model = synth.load_model(model_name)
    model.set_target_bandwidth(kbps)
    return compress(model, wav, use_lm=False)


def test_encode_equals_encodec_compress(tmp_path):
    """PCM through the console script's stdin: the payload is compress()'s, byte for byte,
    for int16 / 32767 (even with a -32768 in the input); decoding it gives encodec's decode."""
    pcm = input_pcm(60_000)  # two frames, the second 12,480 samples
    out = tmp_path / "e.ecdc"
    name = base64.b64encode('Ünïcode, "quoted" / long'.encode()).decode().rstrip("=")
    rc, stdout, err = cli(
        "-b", "6k", "-n", " " + name, "-s", SOURCE, "-t", THUMB, "-e", str(out),
        input=pcm.T.tobytes(),
    )  # fmt: skip
    assert (rc, stdout, err) == (0, b"", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ecdc"]  # no temp files left
    version, meta, payload = read_ecdc(out)
    assert version == 0
    assert meta == {
        "m": "encodec_48khz",
        "al": 60_000,
        "nc": 4,
        "lm": False,
        "br": 6,
        "sr": 48_000,
        "n": 'Ünïcode, "quoted" / long',
        "s": SOURCE,
        "t": THUMB,
    }
    reference = reference_encode("encodec_48khz", 6, int16_to_float(pcm))
    assert payload == reference[synth.parse_header(reference)[2] :]
    expected = synth.reference_pcm(reference)
    rc, decoded, err = run("-d", str(out))
    assert decoded == expected.astype("<i2").tobytes()
    wav, _ = decompress(out.read_bytes())  # upstream reads the version-0 header
    assert np.array_equal(synth.float_to_pcm16(wav.numpy()).T, expected)


def wav_file(pcm: np.ndarray, rate: int, streamed: bool = False, bits: int = 16) -> bytes:
    """A RIFF/WAVE file of int16 ``pcm`` ``[channels, samples]`` (``bits`` claimed), with
    a LIST chunk after its data; ``streamed``: sizes of 0xFFFFFFFF and nothing after the
    data, as ffmpeg writes to a pipe."""
    data = pcm.T.astype("<i2").tobytes()
    channels = pcm.shape[0]
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, bits)
    size = 0xFFFFFFFF if streamed else len(data)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    body += b"data" + struct.pack("<I", size) + data
    if not streamed:  # a pipe's WAV ends with its data
        body += b"LIST" + struct.pack("<I", 4) + b"INFO"
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF if streamed else len(body)) + body


@pytest.mark.parametrize("streamed", [False, True])
def test_encode_reads_a_wav_file_on_stdin_as_its_pcm(tmp_path, torch_home, streamed):
    """What `ecdc-stream -e out.ecdc < song.wav` asks for: the header is read, not encoded
    as audio, and nothing after the data chunk is (its size, where it has one)."""
    pcm = input_pcm(30_000)
    raw, wav = tmp_path / "raw.ecdc", tmp_path / "wav.ecdc"
    assert run("-b", "6", "-e", str(raw), stdin=pcm.T.tobytes())[0] == 0
    rc, _, err = run("-b", "6", "-e", str(wav), stdin=wav_file(pcm, RATE, streamed))
    assert (rc, err) == (0, "")
    assert read_ecdc(wav) == read_ecdc(raw)  # al 30,000: the header was not audio


def test_encode_takes_a_mono_wav_at_another_rate(tmp_path, torch_home):
    """Its rate is resampled to the model's; mono goes to both channels, as the same
    audio in a stereo WAV would."""
    mono = input_pcm(44_100)[:1]  # 1 s at 44.1 kHz
    outs = [tmp_path / "mono.ecdc", tmp_path / "stereo.ecdc"]
    for out, pcm in zip(outs, (mono, np.repeat(mono, 2, axis=0)), strict=True):
        rc, _, err = run("-b", "6", "-e", str(out), stdin=wav_file(pcm, 44_100))
        assert (rc, err) == (0, "")
    _, meta, payload = read_ecdc(outs[0])
    assert (meta["m"], meta["sr"]) == ("encodec_48khz", 48_000)
    assert abs(meta["al"] - 48_000) <= 1  # resampled to the model's rate
    assert (meta, payload) == read_ecdc(outs[1])[1:]


def test_encode_reads_a_wave_format_extensible_header(tmp_path, torch_home):
    """WAVE_FORMAT_EXTENSIBLE with the PCM subformat, as some tools write 16-bit PCM."""
    pcm = input_pcm(9_600)
    plain = wav_file(pcm, RATE)
    fmt_at = plain.index(b"fmt ")
    extra = struct.pack("<HHI", 22, 16, 3) + b"\1\0\0\0\0\0\x10\0\x80\0\0\xaa\0\x38\x9b\x71"
    body = struct.pack("<HHIIHH", 0xFFFE, 2, RATE, RATE * 4, 4, 16) + extra
    extensible = plain[:fmt_at] + b"fmt " + struct.pack("<I", len(body)) + body
    extensible += plain[fmt_at + 8 + 16 :]
    extensible = b"RIFF" + struct.pack("<I", len(extensible) - 8) + extensible[8:]
    raw, out = tmp_path / "raw.ecdc", tmp_path / "ext.ecdc"
    assert run("-b", "6", "-e", str(raw), stdin=pcm.T.tobytes())[0] == 0
    assert run("-b", "6", "-e", str(out), stdin=extensible)[:3:2] == (0, "")
    assert read_ecdc(out) == read_ecdc(raw)


@pytest.mark.parametrize("bits", [24, 8])
def test_encode_refuses_a_wav_it_cannot_read_in_one_line(tmp_path, torch_home, bits):
    out = tmp_path / "e.ecdc"
    rc, _, err = run("-e", str(out), stdin=wav_file(input_pcm(4_800), RATE, bits=bits))
    assert rc == 1
    (line,) = err.splitlines()
    assert f"{bits}-bit" in line and "-e takes 16-bit PCM of 1 or 2 channels" in line
    assert not out.exists()


@pytest.mark.parametrize(("kbps", "rate", "version"), [("1.5", 24_000, 0), ("2", 32_000, 193)])
def test_encode_24khz_model(tmp_path, torch_home, kbps, rate, version):
    """Below 3 kbps: mono, resampled (streaming soxr) to sr, the 24 kHz model at 1.5 kbps."""
    pcm = input_pcm(RATE // 2)
    out = tmp_path / "e.ecdc"
    stderr = Terminal()  # a terminal: progress is shown
    rc, _, err = run("-b", kbps, "-e", str(out), stdin=pcm.T.tobytes() + b"\1\2\3", stderr=stderr)
    assert rc == 0
    assert "ignoring 3 trailing bytes" in err and " s [" in err  # warning, tqdm
    version_read, meta, payload = read_ecdc(out)
    assert version_read == version
    assert (meta["m"], meta["sr"], meta["br"], meta["nc"]) == (
        "encodec_24khz",
        rate,
        float(kbps),
        2,
    )
    mono = int16_to_float(pcm).mean(dim=0, keepdim=True)
    wav = torch.from_numpy(soxr.resample(mono.T.numpy(), RATE, rate).T.copy())
    assert meta["al"] == wav.shape[-1] == rate // 2
    reference = reference_encode("encodec_24khz", 1.5, wav)
    assert payload == reference[synth.parse_header(reference)[2] :]
    rc, decoded, err = run("-d", str(out))
    assert (rc, err) == (0, "")
    assert len(decoded) == RATE // 2 * 4  # back at 48 kHz, as long as the input


def test_encode_at_a_scaled_rate(tmp_path, torch_home):
    """9 kbps: 6 kbps of the 48 kHz model over audio resampled to 72 kHz (version 193)."""
    pcm = input_pcm(RATE // 2)
    out = tmp_path / "e.ecdc"
    rc, _, err = run("-b", "9", "-e", str(out), stdin=pcm.T.tobytes())
    assert (rc, err) == (0, "")
    version, meta, payload = read_ecdc(out)
    assert version == 193
    assert (meta["m"], meta["sr"], meta["br"], meta["nc"], meta["al"]) == (
        "encodec_48khz", 72_000, 9, 4, 36_000
    )  # fmt: skip
    wav = torch.from_numpy(soxr.resample(int16_to_float(pcm).T.numpy(), RATE, 72_000).T.copy())
    reference = reference_encode("encodec_48khz", 6, wav)
    assert payload == reference[synth.parse_header(reference)[2] :]
    rc, decoded, err = run("-d", str(out))
    assert len(decoded) == (RATE // 2) * 4


def test_encode_failure_leaves_nothing(tmp_path, torch_home):
    out = tmp_path / "e.ecdc"
    out.write_bytes(b"old")
    rc, _, err = run("-b", "1.5", "-e", str(out), stdin=b"")
    assert rc == 1 and "no audio" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ecdc"]
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize(
    ("text", "model", "bandwidth", "rate", "stored"),
    [
        ("24", "encodec_48khz", 24, 48_000, 24),
        ("6", "encodec_48khz", 6, 48_000, 6),
        ("6k", "encodec_48khz", 6, 48_000, 6),
        ("3", "encodec_48khz", 3, 48_000, 3),
        ("12K", "encodec_48khz", 12, 48_000, 12),
        ("4", "encodec_48khz", 3, 64_000, 4),
        ("9", "encodec_48khz", 6, 72_000, 9),
        ("48", "encodec_48khz", 24, 96_000, 48),
        ("192", "encodec_48khz", 24, 384_000, 192),
        ("2.9", "encodec_24khz", 1.5, 46_400, 2.9),
        ("2", "encodec_24khz", 1.5, 32_000, 2),
        ("1.5", "encodec_24khz", 1.5, 24_000, 1.5),
        ("1", "encodec_24khz", 1.5, 16_000, 1),
        ("0.25", "encodec_24khz", 1.5, 4_000, 0.25),
    ],
)
def test_bitrate_mapping(text, model, bandwidth, rate, stored):
    kbps = parse_bitrate(text)
    assert kbps == stored and type(kbps) is type(stored)
    plan = plan_bitrate(kbps)
    assert (plan.model.name, plan.bandwidth, plan.sample_rate) == (model, bandwidth, rate)
    assert plan.version == (0 if rate == plan.model.sample_rate else 193)
