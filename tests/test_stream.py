"""``ecdc-stream``: every flag, against files made here, exact where the audio is exact.

The real console script runs as a subprocess where the process boundary matters (pipes,
exit status, stderr, a server on another socket); finer checks call ``stream.run`` in
process (importing torch costs seconds per process on a small machine).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soxr

import synth
from ecdcfs import stream
from ecdcfs.container import EcdcError
from ecdcfs.engine import Engine
from ecdcfs.http import HttpSource, RemoteError
from ecdcfs.settings import Settings, default_cache_dir
from helpers import (
    SONG_SAMPLES,
    SONG_TAGS,
    STREAM_CLI,
    TerminalText,
    ecdc_stream,
    error_line,
    stream_run,
)

RATE = 48_000
SAMPLES, (NAME, SOURCE, THUMB) = SONG_SAMPLES, SONG_TAGS


# --------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def test_help():
    rc, out, err = ecdc_stream("-h")
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
    rc, out, err = stream_run(*args, stdin=stdin)
    assert rc != 0 and out == b""
    assert needle in error_line(err)


def test_bad_arguments_through_the_console_script(songs, tmp_path):
    rc, out, err = ecdc_stream("-q", "-d", str(songs["v0"]))
    assert rc == 2 and out == b"" and "unknown option -q" in error_line(err)
    rc, out, err = ecdc_stream("-d", str(tmp_path / "missing.ecdc"))
    assert rc == 1 and out == b"" and "missing.ecdc" in error_line(err)
    rc, out, err = ecdc_stream("-ss", "3.2", "-d", str(songs["v0"]))  # the file lasts 3.125 s
    assert rc == 2 and out == b"" and "past the end" in error_line(err)
    (tmp_path / "junk.ecdc").write_bytes(b"RIFF" + bytes(100))
    rc, out, err = ecdc_stream("-d", str(tmp_path / "junk.ecdc"))
    assert rc == 1 and out == b"" and "not an ECDC file" in error_line(err)


def test_option_of_another_mode_is_ignored_with_a_warning(songs):
    rc, out, err = stream_run("-ss", "1", "-i", str(songs["v0"]))
    assert rc == 0 and out.startswith(b"Version: 0\n")
    assert err == "ecdc-stream: warning: -ss does not apply to -i; ignored\n"
    rc, out, err = stream_run("--exact", "-i", str(songs["v0"]))
    assert rc == 0 and out.startswith(b"Version: 0\n")
    assert err == "ecdc-stream: warning: --exact does not apply to -i; ignored\n"


def test_pcm_is_not_written_to_a_terminal(songs):
    class TerminalOut(io.BytesIO):
        def isatty(self) -> bool:
            return True

    err = io.StringIO()
    rc = stream.run(["-g", "-1", "-d", str(songs["v0"])], io.BytesIO(), TerminalOut(), err)
    assert rc == 2 and "terminal" in error_line(err.getvalue())


# --------------------------------------------------------------------------------------
# -i
# --------------------------------------------------------------------------------------


def test_info_v0(songs):
    rc, out, err = ecdc_stream("-i", str(songs["v0"]))
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
    rc, out, err = stream_run(str(songs["v193"]), "-i")
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
    lines = stream_run("-i", str(songs["v193_44k"]))[1].decode().splitlines()
    assert f"Duration: {json.dumps(SAMPLES / 44_100)}" in lines
    assert "Sample Rate: 44100" in lines
    lines = stream_run("-i", str(songs["v0_24k"]))[1].decode().splitlines()
    assert "Duration: 3.0" in lines and 'M: "encodec_24khz"' in lines


def info_as_lines(info: dict) -> list[str]:
    """How Encodec-Stream's ``-i`` prints ``get_info``'s dict."""
    return [f"{key}: {json.dumps(value)}" for key, value in info.items()]


@pytest.mark.parametrize("key", ["v0", "v193", "v193_44k", "v0_24k"])
def test_get_info_is_what_dash_i_prints(songs, key):
    info = stream.get_info(str(songs[key]))
    assert info_as_lines(info) == stream_run("-i", str(songs[key]))[1].decode().splitlines()
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
    assert script.stdout == ecdc_stream("-i", str(songs["v193"]))[1]


# --------------------------------------------------------------------------------------
# -d
# --------------------------------------------------------------------------------------


def test_decode_equals_reference_through_a_pipe(songs):
    """The console script's stdout is exactly encodec's decode as PCM (v0 and v193)."""
    rc, out, err = ecdc_stream("-d", str(songs["v193"]))
    assert (rc, err) == (0, "")
    assert out == synth.reference_pcm(songs["v0"].read_bytes()).astype("<i2").tobytes()


def test_default_decode_is_ecdcfs_default_engine_within_2_lsb_of_encodec(
    songs, default_cache, tmp_path
):
    """Without --exact, -d runs the engine ecdcfs runs (graphs from the shared cache dir)."""
    (tmp_path / "xdg").mkdir()
    default_cache.rename(tmp_path / "xdg" / "ecdcfs")  # $XDG_CACHE_HOME/ecdcfs
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    rc, out, err = ecdc_stream("--default", "-g", "-1", "-d", str(songs["v0"]), env=env)
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
    rc, out, err = stream_run("-ss", "2", "-to", "2.5", "-d", "-", stdin=v0)
    assert (rc, err) == (0, "")
    assert out == synth.reference_pcm(v0)[96_000:120_000].astype("<i2").tobytes()
    assert stream_run("-i", "-", stdin=v0)[1] == stream_run("-i", str(songs["v0"]))[1]


def test_decode_v0_and_bufsizes(songs):
    expected = synth.reference_pcm(songs["v0"].read_bytes()).astype("<i2").tobytes()
    for bufsize in ("1", "0", "3"):
        rc, out, err = stream_run("-b", bufsize, "-d", str(songs["v0"]))
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
    rc, out, err = stream_run(*args)
    assert (rc, err) == (0, "")
    first = round(float(start) * RATE)
    last = min(len(ref), round(float(end) * RATE)) if end else len(ref)
    assert out == ref[first:last].astype("<i2").tobytes()


def test_resampled_v193(songs):
    """sr 44,100 -> 48 kHz with soxr: the whole file, and a seek that lands on the same
    samples (the resampler starts on a common grid point before it)."""
    ref = resampled_reference(synth.reference_pcm(songs["v0"].read_bytes()), 44_100)
    rc, out, err = stream_run("-d", str(songs["v193_44k"]))
    assert (rc, err) == (0, "")
    whole = pcm_array(out)
    assert whole.shape == ref.shape  # round(150,000 * 48,000 / 44,100)
    assert snr_db(whole, ref) > 40
    rc, out, err = stream_run("-ss", "1.3", "-to", "2.2", "-d", str(songs["v193_44k"]))
    part = pcm_array(out)
    assert part.shape == (round(0.9 * RATE), 2)
    assert np.abs(part.astype(int) - whole[62_400:105_600]).max() <= 1
    assert snr_db(part, ref[62_400:105_600]) > 40


def test_24khz_file_is_resampled_and_duplicated(songs):
    ref = resampled_reference(synth.reference_pcm(songs["v0_24k"].read_bytes()), 24_000)
    rc, out, err = stream_run("-d", str(songs["v0_24k"]))
    assert (rc, err) == (0, "")
    pcm = pcm_array(out)
    assert len(pcm) == 2 * 72_000 == len(ref)
    assert (pcm[:, 0] == pcm[:, 1]).all()
    assert snr_db(pcm[:, 0], ref[:, 0]) > 40
    rc, out, err = stream_run("-ss", "1.2345", "-to", "2", "-d", str(songs["v0_24k"]))
    part = pcm_array(out)
    assert len(part) == 96_000 - round(1.2345 * RATE)
    assert np.abs(part.astype(int) - pcm[round(1.2345 * RATE) : 96_000]).max() <= 1


def test_24khz_seek_across_chunks(torch_home, tmp_path):
    """Past 10 s a 24 kHz file decodes in the core's chunks; seeks across a seam, with -b 0
    too, give the samples of the whole decode."""
    path = tmp_path / "long24.ecdc"
    path.write_bytes(synth.make_ecdc("encodec_24khz", 252_000, kbps=1.5))  # 10.5 s
    rc, out, err = stream_run("-d", str(path))
    assert (rc, err) == (0, "")
    whole = pcm_array(out)
    assert len(whole) == 504_000
    rc, out, err = stream_run("-b", "0", "-ss", "9.75", "-to", "10.25", "-d", str(path))
    assert np.abs(pcm_array(out).astype(int) - whole[468_000:492_000]).max() <= 1


def test_seek_into_an_lm_file_shows_indexing_progress(torch_home, tmp_path, monkeypatch):
    data = synth.make_ecdc("encodec_48khz", 2 * RATE + 1000, kbps=3, lm=True)  # 3 frames
    path = synth.write(tmp_path, "lm.ecdc", data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no index persisted yet
    rc, out, err = stream_run("-ss", "1.5", "-d", str(path), stderr=TerminalText())
    assert rc == 0 and "indexing" in err  # the codes of frames 0 and 1 come first
    assert out == synth.reference_pcm(data)[RATE * 3 // 2 :].astype("<i2").tobytes()
    # As -h says: the index persists in the cache dir and the next seek skips indexing.
    assert default_cache_dir() == tmp_path / "xdg" / "ecdcfs"
    assert len(list(default_cache_dir().glob("*.codes.npz"))) == 1
    rc, again, err = stream_run("-ss", "1.5", "-d", str(path), stderr=TerminalText())
    assert (rc, again) == (0, out) and "indexing" not in err


def test_closed_stdout_ends_quietly(songs):
    """| head -c: no traceback, the SIGPIPE-style status 141."""
    proc = subprocess.Popen(
        [*STREAM_CLI, "-g", "-1", "-d", str(songs["v0"])],
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
    rc, out, err = stream_run("-i", base + "/nothing.ecdc")
    assert rc == 1 and "404" in error_line(err)
    rc, out, err = stream_run("-i", "http://127.0.0.1:9/x.ecdc")  # nothing listens on port 9
    assert rc == 1 and "127.0.0.1:9" in error_line(err)


def test_url_info_fetches_only_the_header(songs, serve):
    data = synth.long_plain_file(songs["v0"].read_bytes(), 600)  # 10 minutes, ~450 KB
    base, server = serve({"/long.ecdc": data})
    (songs["v0"].parent / "long.ecdc").write_bytes(data)
    rc, out, err = ecdc_stream("-i", base + "/long.ecdc")
    assert (rc, err) == (0, "")
    assert out == stream_run("-i", str(songs["v0"].parent / "long.ecdc"))[1]
    assert f"Duration: {(600 * 47_520 + 7_440) / 48_000}".encode() in out
    assert server.served <= 8192 < len(data) // 50


def test_url_seek_fetches_only_what_it_decodes(songs, serve):
    data = synth.long_plain_file(songs["v0"].read_bytes(), 600)
    local = songs["v0"].parent / "long.ecdc"
    local.write_bytes(data)
    base, server = serve({"/long.ecdc": data})
    rc, out, err = ecdc_stream("-ss", "590", "-to", "590.5", "-d", base + "/long.ecdc")
    assert (rc, err) == (0, "")
    assert len(out) == 24_000 * 4
    assert out == stream_run("-ss", "590", "-to", "590.5", "-d", str(local))[1]
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
    rc, out, err = stream_run("-ss", "1", "-to", "2", "-d", base + "/a.ecdc")
    assert (rc, err) == (0, "")
    assert out == synth.reference_pcm(v0)[48_000:96_000].astype("<i2").tobytes()
    rc, out, err = stream_run("-i", base + "/a.ecdc")
    assert rc == 0 and out == stream_run("-i", str(songs["v0"]))[1]
