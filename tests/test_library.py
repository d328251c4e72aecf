"""``ecdcfs.open``: an .ecdc file (or URL) as a seekable binary WAV file, without a mount,
read by ``wave``, ``soundfile`` and ``shutil`` exactly as a mount shows it."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile

import ecdcfs
import synth
from ecdcfs import wavfile
from ecdcfs.container import EcdcError
from ecdcfs.settings import Settings
from helpers import SONG_SAMPLES, SONG_TAGS

SAMPLES, (NAME, SOURCE, THUMB) = SONG_SAMPLES, SONG_TAGS


@pytest.fixture
def cpu(tmp_path) -> Settings:
    """Settings of a file's own engine: the CPU (bit-exact), indexes persisted in tmp_path."""
    return Settings(device="cpu", exact=True, cache_dir=tmp_path / "cache")


def reference(path: Path) -> np.ndarray:
    """encodec's decode of ``path`` as int16 ``[samples, channels]``."""
    return synth.reference_pcm(path.read_bytes())


def decoders() -> int:
    return sum(t.name.startswith("ecdcfs-decoder-") for t in threading.enumerate())


@pytest.mark.parametrize("key", ["v0", "v193", "v0_24k", "lm"])
def test_wave_reads_frames_from_the_middle(songs, cpu, key):
    ref = reference(songs[key])
    with ecdcfs.open(songs[key], settings=cpu) as f, wave.open(f) as w:
        assert w.getnchannels() == ref.shape[1] and w.getsampwidth() == 2
        assert w.getnframes() == len(ref)
        assert w.getframerate() == (24_000 if key == "v0_24k" else 48_000)
        first, count = len(ref) * 2 // 5, len(ref) // 4
        w.setpos(first)
        assert w.readframes(count) == ref[first : first + count].tobytes()
        w.setpos(len(ref) - 100)
        assert w.readframes(1000) == ref[-100:].tobytes()  # short at the end


def test_soundfile_reads_the_middle(songs, cpu):
    ref = reference(songs["v193"])
    with ecdcfs.open(str(songs["v193"]), settings=cpu) as f:
        data, rate = soundfile.read(f, start=60_000, stop=100_001, dtype="int16")
    assert rate == 48_000
    assert np.array_equal(data, ref[60_000:100_001])


def test_copyfileobj_is_the_whole_wav(songs, engine):
    expected = engine.open(songs["v193"]).read(0, 1 << 30)
    with ecdcfs.open(songs["v193"], engine=engine) as f:
        copy = io.BytesIO()
        shutil.copyfileobj(f, copy)
        assert copy.getvalue() == expected and f.size == len(expected)
        f.seek(0)
        assert f.read() == expected  # readall
        assert f.read() == b""


def test_seek_and_tell(songs, engine):
    audio = engine.open(songs["v0"])
    with ecdcfs.open(songs["v0"], engine=engine) as f:
        assert f.readable() and f.seekable() and not f.writable()
        assert f.tell() == 0
        header = len(audio.wav.header)
        assert f.seek(header - 3) == header - 3
        assert f.read(10) == audio.read(header - 3, 10)  # across the header's end
        assert f.tell() == header + 7
        assert f.seek(1001, io.SEEK_CUR) == header + 1008
        assert f.read(5) == audio.read(header + 1008, 5)  # not on a sample boundary
        assert f.seek(-6, io.SEEK_END) == audio.size - 6
        assert f.read(100) == audio.read(audio.size - 6, 6)
        buffer = bytearray(8)
        f.seek(header)
        assert f.readinto(buffer) == 8 and bytes(buffer) == audio.read(header, 8)
        assert f.readinto(memoryview(np.zeros(3, np.int32))) == 12  # any writable buffer
        assert f.seek(10, io.SEEK_END) == audio.size + 10  # past the end: reads nothing
        assert f.read(10) == b"" and f.readinto(buffer) == 0
        with pytest.raises(ValueError, match="negative"):
            f.seek(-1)
        with pytest.raises(ValueError, match="negative"):
            f.seek(-audio.size - 11, io.SEEK_CUR)
        with pytest.raises(ValueError, match="whence"):
            f.seek(0, 3)
        assert f.tell() == audio.size + 10  # a failed seek moves nothing
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()


def test_closed_file(songs, cpu):
    before = decoders()
    f = ecdcfs.open(songs["v0"], settings=cpu)
    assert decoders() == before + 1  # its own engine
    f.read(100)
    f.close()
    assert f.closed and decoders() == before  # closed with the file
    f.close()  # twice is fine
    for call in (f.read, f.readall, f.tell, lambda: f.seek(0), lambda: f.readinto(bytearray(4))):
        with pytest.raises(ValueError, match="closed"):
            call()
    with ecdcfs.open(songs["v0"], settings=cpu) as g:
        assert not g.closed
    assert g.closed


def test_a_given_engine_outlives_its_files(songs, engine):
    ref = reference(songs["v0"])
    with ecdcfs.open(songs["v0"], engine=engine) as f:
        f.read(1000)
    with ecdcfs.open(songs["v0"], engine=engine) as f, wave.open(f) as w:
        w.setpos(50_000)
        assert w.readframes(10) == ref[50_000:50_010].tobytes()


def test_default_engine_is_shared(songs):
    with ecdcfs.open(songs["v0"]) as f, ecdcfs.open(str(songs["v193"])) as g:
        assert f.audio.engine is g.audio.engine is wavfile.default_engine()
        data = f.read(4096)
    with ecdcfs.open(songs["v0"]) as h:  # the engine stays open after its files
        assert h.audio.engine is wavfile.default_engine() and h.read(4096) == data


def test_errors_at_open(songs, tmp_path, engine):
    with pytest.raises(EcdcError, match="missing.ecdc: No such file"):
        ecdcfs.open(tmp_path / "missing.ecdc")
    with pytest.raises(EcdcError, match="Is a directory"):
        ecdcfs.open(tmp_path)
    junk = synth.write(tmp_path, "junk.ecdc", b"RIFF" + bytes(100))
    with pytest.raises(EcdcError, match="not an ECDC file"):
        ecdcfs.open(junk, engine=engine)
    cut = synth.write(tmp_path, "cut.ecdc", songs["v0"].read_bytes()[:20])
    with pytest.raises(EcdcError):
        ecdcfs.open(cut, engine=engine)
    with pytest.raises(EcdcError, match="only http and https"):
        ecdcfs.open("ftp://example.org/a.ecdc")
    with pytest.raises(TypeError, match="engine or settings"):
        ecdcfs.open(songs["v0"], engine=engine, settings=Settings())


def test_a_failed_open_closes_the_engine_it_made(tmp_path, cpu):
    junk = synth.write(tmp_path, "junk.ecdc", b"ECDC" + bytes(100))
    before = decoders()
    with pytest.raises(EcdcError):
        ecdcfs.open(junk, settings=cpu)
    assert decoders() == before


def test_url(songs, serve, cpu, engine):
    v0 = songs["v0"].read_bytes()
    long = synth.long_plain_file(v0, 600)  # 10 minutes, bit-packed
    base, server = serve({"/a.ecdc": v0, "/long.ecdc": long})
    ref = reference(songs["v0"])
    with ecdcfs.open(base + "/a.ecdc", settings=cpu) as f:
        data, rate = soundfile.read(f, start=70_000, stop=90_000, dtype="int16")
    assert rate == 48_000 and np.array_equal(data, ref[70_000:90_000])
    local = synth.write(songs["v0"].parent, "long.ecdc", long)
    expected = engine.open(local).samples(500 * 48_000, 501 * 48_000)
    served = server.served
    with ecdcfs.open(base + "/long.ecdc", settings=cpu) as f, wave.open(f) as w:
        w.setpos(500 * 48_000)
        assert w.readframes(48_000) == synth.float_to_pcm16(expected).T.tobytes()
    assert server.served - served < len(long) // 4  # only the frames it decodes


def test_importing_ecdcfs_is_light():
    code = (
        "import sys, ecdcfs\n"
        "assert callable(ecdcfs.open)\n"
        "heavy = {'numpy', 'torch', 'encodec', 'soxr'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")


def readme_example() -> str:
    """The ``ecdcfs.open`` example of the README's "Python library" section."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Python library", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example(songs, tmp_path, monkeypatch):
    shutil.copy(songs["v0"], tmp_path / "song.ecdc")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(readme_example(), names)
    audio = wavfile.default_engine().open(tmp_path / "song.ecdc")
    offset = len(audio.wav.header) + 48_000 * audio.wav.block_align
    assert names["pcm"] == audio.read(offset, 48_000 * audio.wav.block_align)
