"""A checkpoint that is missing (offline), copied in later or in the wrong place: one
line that names the file, the URL and the folder, from the engine, the ONNX graph store,
``ecdc-stream``, the view and a mount; reads work once the checkpoint is there."""

from __future__ import annotations

import errno
import logging
import os
import shutil

import pytest

import helpers
import synth
from ecdcfs import checkpoint, cli
from ecdcfs.decoder import ModelUnavailable
from ecdcfs.engine import Engine
from ecdcfs.settings import Settings
from ecdcfs.tree import SourceTree
from mounting import (
    Mount,
    mounts,
    source_folder,
)


def test_missing_checkpoint_names_file_and_directory(tmp_path, monkeypatch):
    data = synth.make_ecdc(samples=30_000, kbps=6)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setattr("ecdcfs.checkpoint.download", helpers.fail_download)
    engine = Engine(Settings(device="cpu", exact=True, cache_dir=None))
    try:
        audio = engine.open(synth.write(tmp_path, "x.ecdc", data))
        for _ in range(2):  # reported once, then remembered
            with pytest.raises(ModelUnavailable) as info:
                audio.read(0, 100_000)
            message = str(info.value)
            assert "encodec_48khz-7e698e3e.th" in message
            assert str(tmp_path / "empty-home" / "hub" / "checkpoints") in message
            assert f"from {CHECKPOINT_URL}encodec_48khz-7e698e3e.th " in message
    finally:
        engine.close()


def test_missing_checkpoint_offline_is_one_line_naming_file_url_and_folder(tmp_path, monkeypatch):
    home = tmp_path / "empty-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(checkpoint, "BASE_URL", "http://127.0.0.1:9/encodec/v0/")  # refused
    with pytest.raises(ModelUnavailable) as error:
        helpers.load_onnx_decoder("encodec_24khz", tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message
    assert "encodec_24khz-d7cc33bc.th is missing" in message
    assert "http://127.0.0.1:9/encodec/v0/encodec_24khz-d7cc33bc.th" in message
    assert f"put it in {home / 'hub' / 'checkpoints'}/" in message
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_ecdc_stream_says_so_in_one_line(media, tmp_path):
    path = synth.write(tmp_path, "x.ecdc", media["short"])
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[proxy] = "http://127.0.0.1:9"  # offline, and fast about it
    rc, out, err = helpers.ecdc_stream("-d", str(path), env=env)
    assert rc == 1 and out == b""  # torch.hub's "Downloading: ..." goes to stderr
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ecdc-stream: ") and "encodec_48khz-7e698e3e.th is missing" in last


@mounts
def test_missing_checkpoint_fails_reads_with_one_log_line(small_library, tmp_path):
    env_home = os.environ.get("TORCH_HOME")
    empty = tmp_path / "empty-torch-home"
    empty.mkdir()
    os.environ["TORCH_HOME"] = str(empty)
    os.environ["https_proxy"] = os.environ["http_proxy"] = "http://127.0.0.1:9"  # no network
    try:
        m = Mount(small_library, tmp_path / "mnt", tmp_path / "log")
    finally:
        os.environ.pop("https_proxy")
        os.environ.pop("http_proxy")
        if env_home is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = env_home
    try:
        for _ in range(3):
            with pytest.raises(OSError) as info:
                (m.mnt / "x.wav").read_bytes()
            assert info.value.errno == errno.EIO
        assert (m.mnt / "a.txt").read_text() == "a"
        errors = [line for line in m.log_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors
        assert "encodec_48khz-7e698e3e.th" in errors[0] and str(empty) in errors[0]
        assert "Traceback" not in m.log_text()
    finally:
        m.stop()


def test_a_checkpoint_copied_in_is_used_at_the_next_read(
    torch_home, tmp_path, src, engine, monkeypatch, caplog
):
    """A model that failed to load is tried again when its checkpoint file changes (it
    appears, a partial copy is completed), not at every read: offline, no download is
    attempted twice."""
    for name, lm in (("x.ecdc", False), ("y.ecdc", True)):
        (src / name).write_bytes(synth.make_ecdc(samples=30_000, kbps=6, lm=lm, seed=3))
    expected = {n: read_whole(engine.open(src / f"{n}.ecdc")) for n in "xy"}
    seeded = synth.checkpoint_dir(torch_home)
    home = tmp_path / "home"
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    downloads = []

    def fail_download(url, *args, **kwargs):
        downloads.append(url.rsplit("/", 1)[-1])
        raise OSError("network is unreachable")

    def read(fh: int) -> bytes:
        return read_tree(tree, fh)

    monkeypatch.setattr("ecdcfs.checkpoint.download", fail_download)
    caplog.set_level(logging.INFO, logger="ecdcfs")
    tree = SourceTree(
        src, engine_factory=lambda: Engine(Settings(device="cpu", exact=True, cache_dir=None))
    )
    try:
        x, y = tree.open("/x.wav"), tree.open("/y.wav")
        for _ in range(3):
            for fh in (x, y):
                with pytest.raises(ModelUnavailable, match="encodec_48khz-7e698e3e.th is missing"):
                    read(fh)
        assert downloads == ["encodec_48khz-7e698e3e.th"]
        for path in ("/x.wav", "/y.wav"):  # the reason, with the URL, in the xattr
            assert f"from {CHECKPOINT_URL}encodec_48khz-7e698e3e.th " in tree.error(path)
        model = (seeded / "encodec_48khz-7e698e3e.th").read_bytes()
        (checkpoints / "encodec_48khz-7e698e3e.th").write_bytes(model[: len(model) // 2])
        assert tree.error("/x.wav") is None  # changed: the next read tries again
        for _ in range(2):
            with pytest.raises(ModelUnavailable, match="cannot load encodec_48khz from"):
                read(x)
        assert "partial or damaged copy" in tree.error("/x.wav")
        (checkpoints / "part").write_bytes(model)  # the copy completed
        os.replace(checkpoints / "part", checkpoints / "encodec_48khz-7e698e3e.th")
        assert read(x) == expected["x"]
        assert tree.error("/x.wav") is None
        for _ in range(2):  # the LM-coded file needs the LM checkpoint too
            with pytest.raises(ModelUnavailable, match="encodec_lm_48khz-7add9fc3.th is missing"):
                read(y)
        assert downloads == ["encodec_48khz-7e698e3e.th", "encodec_lm_48khz-7add9fc3.th"]
        assert "encodec_lm_48khz-7add9fc3.th is missing" in tree.error("/y.wav")
        assert tree.error("/x.wav") is None
        shutil.copy(seeded / "encodec_lm_48khz-7add9fc3.th", checkpoints)
        assert read(y) == expected["y"]
        assert tree.error("/y.wav") is None
    finally:
        tree.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3, errors  # missing, then a partial copy; the missing LM
    found = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
    found = [m for m in found if m not in errors and not m.startswith("downloading")]
    assert found == [
        "encodec_48khz loaded: its checkpoint encodec_48khz-7e698e3e.th was found",
        "encodec_48khz LM loaded: its checkpoint encodec_lm_48khz-7add9fc3.th was found",
    ]


def test_checkpoints_inside_the_mount_point_are_refused(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "mnt" / "torch"))
    with pytest.raises(cli.UsageError, match="checkpoints"):
        cli.check_paths(cli.parse_args([str(tmp_path / "src"), str(tmp_path / "mnt")]))


@mounts
def test_reasons_in_an_xattr_and_a_checkpoint_copied_in_while_mounted(
    tmp_path, media, torch_home, monkeypatch
):
    """getfattr shows why a file cannot be read; a missing checkpoint copied in while
    mounted is used at the next read, and the reason goes away."""
    src = source_folder(tmp_path, {"x.ecdc": media["short"], "bad.ecdc": b"not", "a.txt": b"a"})
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("http_proxy", "https_proxy"):  # offline: downloads fail at once
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    x, name = m.mnt / "x.wav", "user.ecdcfs.error"
    try:
        for path in (x, m.mnt / "a.txt", m.mnt):  # nothing known against them
            assert os.listxattr(path) == (["user.ecdcfs.stats"] if path == m.mnt else [])
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == errno.ENODATA
        assert os.listxattr(m.mnt / "bad.wav") == [name]
        bad_reason = b"file too short for an ECDC header (3 bytes)"
        assert os.getxattr(m.mnt / "bad.wav", name) == bad_reason
        for _ in range(2):
            with pytest.raises(OSError) as info:
                x.read_bytes()
            assert info.value.errno == errno.EIO
        reason = os.getxattr(x, name).decode()
        assert reason.startswith("encodec_48khz checkpoint encodec_48khz-7e698e3e.th is missing")
        assert "https://dl.fbaipublicfiles.com/encodec/v0/encodec_48khz-7e698e3e.th" in reason
        assert str(checkpoints) in reason and os.listxattr(x) == [name]
        shutil.copy(synth.checkpoint_dir(torch_home) / "encodec_48khz-7e698e3e.th", checkpoints)
        assert os.listxattr(x) == []
        assert x.read_bytes() == media["short_wav"]  # no remount
        assert os.listxattr(x) == []
        log = m.log_text()
        assert len(m.error_lines()) == 1, m.error_lines()  # bad.ecdc was never opened
        assert "encodec_48khz loaded: its checkpoint encodec_48khz-7e698e3e.th was found" in log
        assert "Traceback" not in log
    finally:
        m.stop()


def read_tree(tree: SourceTree, fh: int) -> bytes:
    """The whole file through the tree (a read of the header ends where the PCM begins)."""
    out = bytearray()
    while chunk := tree.read(fh, 1 << 20, len(out)):
        out += chunk
    return bytes(out)


def read_whole(audio) -> bytes:
    return audio.read(0, audio.size)


CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/encodec/v0/"  # encodec's ROOT_URL
