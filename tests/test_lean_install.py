"""The core install, without the torch extra, as a user gets it: ``pip install ecdcfs``
into a fresh venv holds no torch, encodec or CUDA package and stays small; it mounts and
reads plain 48 and 24 kHz files within 2 LSB of encodec; whatever needs torch says so in
one line; a checkpoint whose pickle would run code is refused without running it.

The venv is real (created here, the package installed from PyPI's wheels as a user's
would be), so what it checks holds for a user's machine, not for this test process.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import synth
from ecdcfs.decoder import LM_NEEDS_TORCH
from mounting import Mount, mounts, wav_size

REPO = Path(__file__).resolve().parents[1]
MAX_CORE_MB = 300
TORCH_PACKAGES = ("torch", "encodec", "triton")  # and every nvidia-* package


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install`` of this checkout, no extras: its ``bin``."""
    work = tmp_path_factory.mktemp("lean")
    project = work / "project"
    shutil.copytree(
        REPO / "ecdcfs", project / "ecdcfs", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-cache-dir",
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return venv / "bin"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of the lean processes: their own cache and state dirs."""
    return {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
    }


def tree_megabytes(folder: Path) -> float:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if not p.is_symlink()) / 1e6


def test_the_core_install_has_no_torch_and_stays_small(lean):
    listed = subprocess.run(
        [str(lean / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    names = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "ecdcfs" in names and "onnxruntime" in names
    assert not names & set(TORCH_PACKAGES)
    assert not [name for name in names if name.startswith("nvidia")]
    size = tree_megabytes(lean.parent)
    assert size <= MAX_CORE_MB, f"the core venv weighs {size:.0f} MB"


FILES = {
    "a48.ecdc": ("encodec_48khz", 2 * 47_520 + 300, 6, False),
    "b24.ecdc": ("encodec_24khz", 24_000 * 6 + 77, 3, False),
    "lm.ecdc": ("encodec_48khz", 30_000, 6, True),
}


@pytest.fixture
def library(torch_home, tmp_path) -> dict[str, bytes]:
    """A SOURCE folder of plain 48 kHz (v0 and Encodec-Stream v193), 24 kHz and LM files."""
    files = {name: synth.make_ecdc(m, n, kbps, lm=lm) for name, (m, n, kbps, lm) in FILES.items()}
    files["v193.ecdc"] = synth.to_v193(files["a48.ecdc"], 48_000, name="Été")
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    return files


def assert_within_2_lsb(wav: bytes, data: bytes) -> None:
    expected = synth.reference_pcm(data)
    start = wav.index(b"data") + 8
    pcm = np.frombuffer(wav[start : start + expected.size * 2], "<i2").reshape(expected.shape)
    assert np.abs(pcm.astype(np.int32) - expected).max() <= 2


@mounts
def test_a_lean_mount_reads_plain_files_and_refuses_lm_coded_ones_saying_why(
    lean, library, tmp_path, env
):
    src, cache = tmp_path / "src", tmp_path / "cache"
    mount = Mount(
        src, tmp_path / "mnt", tmp_path / "log", "--cache-dir", str(cache),
        exact=False, python=str(lean / "python"), env=env,
    )  # fmt: skip
    try:
        for name in ("a48", "b24", "v193"):
            wav = (mount.mnt / f"{name}.wav").read_bytes()
            assert len(wav) == os.stat(mount.mnt / f"{name}.wav").st_size
            assert_within_2_lsb(wav, library[f"{name}.ecdc"])
        lm = mount.mnt / "lm.wav"
        samples = synth.reference_pcm(library["lm.ecdc"]).size
        assert lm.stat().st_size == wav_size(2 * samples)  # its exact size, from the header
        for _ in range(2):
            with pytest.raises(OSError) as error:
                lm.read_bytes()
            assert error.value.errno == errno.EIO
        assert os.getxattr(lm, "user.ecdcfs.error").decode() == LM_NEEDS_TORCH
        built = {p.name.split("-", 1)[0] for p in (cache / "graphs").glob("*.npz")}
        assert built == {"encodec_48khz", "encodec_24khz"}  # without torch
    finally:
        mount.stop()
    log = mount.log_text()
    assert log.count(LM_NEEDS_TORCH) == 1, log
    assert "Traceback" not in log


def run(
    lean: Path, program: str, *args: str, env: dict, stdin: bytes = b""
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(lean / program), *args], input=stdin, capture_output=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    ("program", "args", "what"),
    [
        ("ecdcfs", ["--exact"], "--exact"),
        ("ecdcfs", ["--device", "cuda"], "--device cuda"),
        ("ecdcfs", ["-o", "exact"], "--exact"),
        ("ecdc-stream", ["-e", "{out}"], "-e"),
        ("ecdc-stream", ["--exact", "-d", "{a48}"], "--exact"),
        ("ecdc-stream", ["-g", "0", "-d", "{a48}"], "-g 0"),
    ],
)
def test_what_needs_torch_exits_2_with_one_line(lean, library, tmp_path, env, program, args, what):
    paths = {"out": str(tmp_path / "out.ecdc"), "a48": str(tmp_path / "src" / "a48.ecdc")}
    if program == "ecdcfs":
        (tmp_path / "mnt").mkdir()
        args = [str(tmp_path / "src"), str(tmp_path / "mnt"), *args]
    done = run(lean, program, *(a.format(**paths) for a in args), env=env, stdin=b"\0" * 400)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert f"{what} needs torch: pip install 'ecdcfs[torch]'" in line
    assert not (tmp_path / "out.ecdc").exists()


def test_ecdc_stream_and_the_library_work_without_torch(lean, library, tmp_path, env):
    a48 = tmp_path / "src" / "a48.ecdc"
    info = run(lean, "ecdc-stream", "-i", str(tmp_path / "src" / "v193.ecdc"), env=env)
    assert info.returncode == 0 and b'Name: "\\u00c9t\\u00e9"' in info.stdout
    pcm = run(lean, "ecdc-stream", "-d", str(a48), env=env)
    assert pcm.returncode == 0, pcm.stderr
    expected = synth.reference_pcm(library["a48.ecdc"])
    got = np.frombuffer(pcm.stdout, "<i2").reshape(expected.shape)
    assert np.abs(got.astype(np.int32) - expected).max() <= 2
    code = (
        "import sys, ecdcfs\n"
        "with ecdcfs.open(sys.argv[1]) as f: sys.stdout.buffer.write(f.read())\n"
        "assert 'torch' not in sys.modules\n"
    )
    wav = run(lean, "python", "-c", code, str(tmp_path / "src" / "b24.ecdc"), env=env)
    assert wav.returncode == 0, wav.stderr
    assert_within_2_lsb(wav.stdout, library["b24.ecdc"])


class _RunsCode:
    """Unpickled by a plain unpickler, this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_calls_os_system_is_refused_without_running_it(
    lean, library, tmp_path, env
):
    marker = tmp_path / "ran"
    checkpoints = tmp_path / "home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with zipfile.ZipFile(checkpoints / "encodec_48khz-7e698e3e.th", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
        archive.writestr("archive/version", "3\n")
    code = (
        "import sys, ecdcfs\n"
        "from ecdcfs.container import EcdcError\n"
        "try:\n"
        "    ecdcfs.open(sys.argv[1]).read()\n"
        "except EcdcError as error:\n"
        "    print(error)\n"
    )
    done = run(lean, "python", "-c", code, str(tmp_path / "src" / "a48.ecdc"),
               env={**env, "TORCH_HOME": str(tmp_path / "home")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"system" in done.stdout and b"encodec_48khz-7e698e3e.th" in done.stdout
    assert not marker.exists()


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path) -> Iterator[None]:
    yield
    from mounting import unmount

    unmount(tmp_path / "mnt")
