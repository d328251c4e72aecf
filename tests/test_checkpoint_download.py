"""Checkpoints fetched torch.hub-style from a local HTTP server: downloads, concurrent ones,
a wrong hash, a truncated body, 404 and a closed port (one line each), and a file already
there used without a request."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ecdcfs import checkpoint
from ecdcfs.checkpoint import load_state_dict
from ecdcfs.decoder import ModelUnavailable
from helpers import FileServer
from torchfiles import assert_same, install, one_line, tricky_tensors


@pytest.fixture
def server(home: Path, serve, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """Checkpoints served at ``checkpoint.BASE_URL``: ``server.files["/" + name]``."""
    base, server = serve({})
    monkeypatch.setattr(checkpoint, "BASE_URL", base + "/")
    return server


def named(data: bytes, stem: str = "encodec_48khz") -> str:
    """The torch.hub name of ``data``: the first 8 hex digits of its sha256 in it."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.th"


def listing(home: Path) -> list[str]:
    d = home / "hub" / "checkpoints"
    return sorted(os.listdir(d)) if d.exists() else []


def test_download(server: FileServer, home: Path) -> None:
    data = np.random.default_rng(0).bytes(300_000)
    name = named(data)
    server.files["/" + name] = data
    path = checkpoint.fetch(name, "test model")
    assert path == home / "hub" / "checkpoints" / name
    assert path.read_bytes() == data
    assert listing(home) == [name]
    assert server.requests == 1
    assert checkpoint.fetch(name, "test model") == path
    assert server.requests == 1


def test_download_and_load(server: FileServer, home: Path, tmp_path: Path) -> None:
    tensors = tricky_tensors()
    torch.save(tensors, tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    name = named(data, "encodec_lm_24khz")
    server.files["/" + name] = data
    assert_same(load_state_dict(name, "test model"), tensors)


def test_concurrent_downloads(server: FileServer, home: Path) -> None:
    data = np.random.default_rng(1).bytes(2_000_000)
    name = named(data)
    server.files["/" + name] = data
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(checkpoint.fetch(name, "m")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [home / "hub" / "checkpoints" / name] * 4
    assert (home / "hub" / "checkpoints" / name).read_bytes() == data
    assert listing(home) == [name]


def test_wrong_hash_is_refused(server: FileServer, home: Path) -> None:
    data = b"not the checkpoint you are looking for\n" * 1000
    digest = hashlib.sha256(data).hexdigest()
    name = f"encodec_48khz-{'0' if digest[0] != '0' else '1'}{digest[1:8]}.th"
    server.files["/" + name] = data
    with pytest.raises(ModelUnavailable) as error:
        checkpoint.fetch(name, "test model")
    message = one_line(error)
    assert f"its sha256 {digest} does not match the hash prefix" in message
    assert not (home / "hub" / "checkpoints" / name).exists()
    assert listing(home) == []


def test_truncated_download_is_refused(server: FileServer, home: Path) -> None:
    data = np.random.default_rng(2).bytes(100_000)
    name = named(data)
    server.files["/" + name] = data
    server.short.add("/" + name)
    with pytest.raises(ModelUnavailable) as error:
        checkpoint.fetch(name, "test model")
    assert "truncated: got 50000 of 100000 bytes" in one_line(error)
    assert listing(home) == []


def test_not_found(server: FileServer, home: Path) -> None:
    name = checkpoint.CHECKPOINTS["encodec_24khz"]
    with pytest.raises(ModelUnavailable) as error:
        load_state_dict(name, "encodec_24khz")
    message = one_line(error)
    directory = home / "hub" / "checkpoints"
    assert message == (
        f"encodec_24khz checkpoint {name} is missing and could not be downloaded from "
        f"{checkpoint.BASE_URL}{name} (HTTP 404 Not Found); put it in {directory}/ "
        "(or set TORCH_HOME)"
    )
    assert listing(home) == []
    assert checkpoint.fingerprint(name) == (str(directory / name), None)


def test_closed_port(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    monkeypatch.setattr(checkpoint, "BASE_URL", url)
    name = checkpoint.LM_CHECKPOINTS["encodec_48khz"]
    with pytest.raises(ModelUnavailable) as error:
        checkpoint.fetch(name, "encodec_48khz LM")
    message = one_line(error)
    assert message.startswith(f"encodec_48khz LM checkpoint {name} is missing")
    assert f"from {url}{name} (" in message
    assert f"put it in {home / 'hub' / 'checkpoints'}/ (or set TORCH_HOME)" in message
    assert listing(home) == []


def test_existing_file_is_used_without_a_request(server: FileServer, home: Path) -> None:
    name = checkpoint.CHECKPOINTS["encodec_48khz"]  # its content does not match its hash
    install(home, name, b"whatever is there")
    path = checkpoint.fetch(name, "test model")
    assert path.read_bytes() == b"whatever is there"
    assert server.requests == 0
    st = path.stat()
    assert checkpoint.fingerprint(name) == (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
