"""ecdcfs.checkpoint: torch-free checkpoint reading (torch.load is the oracle), refusal
of malicious pickles, and torch.hub-style downloads from a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import synth
from ecdcfs import checkpoint, torchfile
from ecdcfs.checkpoint import load_state_dict
from ecdcfs.decoder import ModelUnavailable
from ecdcfs.torchfile import read_state_dict

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def reference(t: torch.Tensor) -> np.ndarray:
    """What read_state_dict must return for ``t`` (bfloat16 widened to float32)."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def assert_same(ours: dict[str, np.ndarray], theirs: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order; each array equal in dtype, shape and bytes, and a
    contiguous, native-endian, writeable array of its own."""
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        want, got = reference(tensor), ours[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key
        assert got.flags.c_contiguous and got.flags.writeable and got.dtype.isnative, key


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert message and "\n" not in message and "\r" not in message
    return message


def write_zip(path: Path, members: dict[str, bytes], top: str = "archive") -> Path:
    """A zip laid out like torch's (``<top>/<member>``, stored), with a version record."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in {"version": b"3\n", **members}.items():
            z.writestr(f"{top}/{name}", data)
    return path


def write_legacy(path: Path, *pickles: bytes, payload: bytes = b"") -> Path:
    """A legacy-format file: magic, protocol, sys_info, then ``pickles``, then ``payload``."""
    head = [pickle.dumps(torchfile.LEGACY_MAGIC, 2), pickle.dumps(1001, 2)]
    head.append(pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2))
    path.write_bytes(b"".join(head) + b"".join(pickles) + payload)
    return path


def _int(v: int) -> bytes:
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)  # BININT
    data = v.to_bytes(16, "little", signed=True)
    return b"\x8a\x10" + data  # LONG1 of 16 bytes


def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s)) + s.encode()  # BINUNICODE


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def tensor_pickle(
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage: str = "FloatStorage",
    legacy: bool = False,
) -> bytes:
    """A hand-made data.pkl of ``{"w": <tensor view>}``: lets a test declare any view."""
    pid = [_str("storage"), b"ctorch\n" + storage.encode() + b"\n", _str("0"), _str("cpu")]
    pid.append(_int(numel))
    if legacy:
        pid.append(b"N")
    args = _tuple(
        _tuple(*pid) + b"Q",  # BINPERSID
        _int(offset),
        _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)),
        b"\x89",  # False
        b"ccollections\nOrderedDict\n)R",
    )
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    return b"\x80\x02}" + _str("w") + rebuild + args + b"Rs."


class Evil:
    """Unpickling this runs ``func(arg)``, e.g. a shell command."""

    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.func, (self.arg,))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", synth.CHECKPOINT_FILES)
def test_encodec_checkpoints_match_torch_load(torch_home: Path, file_name: str) -> None:
    path = checkpoint.checkpoint_path(file_name)
    assert path.parent == torch_home / "hub" / "checkpoints"
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    ours = read_state_dict(path)
    assert len(ours) > 50
    assert_same(ours, theirs)
    assert_same(load_state_dict(file_name, "test model"), theirs)


def tricky_tensors() -> dict[str, torch.Tensor]:
    """Views, shared storages and every dtype a state dict may hold."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 6, generator=g)
    flat = torch.arange(40, dtype=torch.int64)
    return {
        "base": base,
        "transposed": base.t(),
        "stepped": base[1:, ::2],
        "offset": flat[7:19],
        "offset_2d": flat[3:].view(-1)[5:25].view(4, 5)[:, 1:4],
        "shared_row": base[2],
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "scalar_view": flat[11],
        "empty": torch.empty(0, 3),
        "empty_view": base[:, 4:4],
        "int64": torch.randint(-(2**62), 2**62, (3, 4), generator=g),
        "int32": torch.randint(-(2**31), 2**31 - 1, (6,), generator=g, dtype=torch.int32),
        "int16": torch.randint(-(2**15), 2**15 - 1, (6,), generator=g, dtype=torch.int16),
        "bool": torch.rand(3, 7, generator=g) > 0.5,
        "float16": torch.randn(4, 3, generator=g).half().t(),
        "bfloat16": torch.randn(2, 8, generator=g).bfloat16()[:, 1::3],
        "int8": torch.randint(-128, 128, (9,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 256, (3, 3), generator=g, dtype=torch.uint8).t(),
        "float64": torch.randn(2, 3, 4, generator=g, dtype=torch.float64).permute(2, 0, 1),
        "parameter": torch.nn.Parameter(torch.randn(3, generator=g)),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_views_and_dtypes_match_torch(tmp_path: Path, zip_format: bool) -> None:
    tensors = tricky_tensors()
    path = tmp_path / "tricky.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    assert_same(read_state_dict(path), tensors)
    # Sharing storages is what the views test: torch.load agrees with the tensors.
    assert_same(read_state_dict(path), torch.load(path, weights_only=True))


def test_zip_top_folder_and_big_endian_byte_order(tmp_path: Path) -> None:
    tensors = {"f": torch.randn(3, 4).t(), "i": torch.arange(-3, 9), "b": torch.randn(5).bfloat16()}
    path = tmp_path / "le.pt"
    torch.save(tensors, path)
    with zipfile.ZipFile(path) as z:
        members = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    widths = {"f": 4, "i": 8, "b": 2}
    pkl = members["data.pkl"]
    # Storage keys in data.pkl are numbered in order of first appearance.
    for key, name in enumerate(tensors):
        le = np.frombuffer(members[f"data/{key}"], dtype=f"<u{widths[name]}")
        members[f"data/{key}"] = le.astype(f">u{widths[name]}").tobytes()
    members["byteorder"] = b"big"
    members["data.pkl"] = pkl
    big = write_zip(tmp_path / "big.pt", members, top="some-other-name")
    assert_same(read_state_dict(big), tensors)
    members["byteorder"] = b"little"  # now the bytes are wrong: the mark is what counts
    wrong = read_state_dict(write_zip(tmp_path / "wrong.pt", members))
    assert not np.array_equal(wrong["i"], reference(tensors["i"]))


def test_hand_made_view_is_read(tmp_path: Path) -> None:
    """The hand-made pickle the bounds tests use is a valid checkpoint when in bounds."""
    data = np.arange(12, dtype="<f4")
    pkl = tensor_pickle(numel=12, offset=1, size=(2, 3), stride=(4, 2))
    got = read_state_dict(
        write_zip(tmp_path / "ok.pt", {"data.pkl": pkl, "data/0": data.tobytes()})
    )
    np.testing.assert_array_equal(got["w"], [[1, 3, 5], [5, 7, 9]])
    legacy = tensor_pickle(numel=12, offset=1, size=(2, 3), stride=(4, 2), legacy=True)
    keys = pickle.dumps(["0"], 2)
    payload = struct.pack("<q", 12) + data.tobytes()
    got = read_state_dict(write_legacy(tmp_path / "ok.legacy", legacy, keys, payload=payload))
    np.testing.assert_array_equal(got["w"], [[1, 3, 5], [5, 7, 9]])


@pytest.mark.parametrize(
    "numel, offset, size, stride, stored, match",
    [
        (12, 0, (13,), (1,), 12, "overruns"),
        (12, 12, (1,), (1,), 12, "overruns"),
        (12, 0, (2, 3), (4, 5), 12, "overruns"),
        (12, 5, (), (), 4, "only 16 bytes"),
        (1 << 40, 0, (1,), (1,), 12, "only 48 bytes"),
        (12, 0, (3, -1), (1, 1), 12, "bad tensor view"),
        (12, 0, (3,), (-1,), 12, "bad tensor view"),
        (12, -1, (3,), (1,), 12, "bad tensor view"),
        (12, 0, (3, 2), (1,), 12, "bad tensor view"),
        (12, 0, (40,), (0,), 12, "more elements than its storage"),
    ],
)
def test_out_of_bounds_views_are_refused(
    tmp_path: Path,
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    stored: int,
    match: str,
) -> None:
    data = np.arange(stored, dtype="<f4").tobytes()
    pkl = tensor_pickle(numel, offset, size, stride)
    path = write_zip(tmp_path / "bad.pt", {"data.pkl": pkl, "data/0": data})
    with pytest.raises(checkpoint.CheckpointError, match=match):
        read_state_dict(path)


def test_scalar_and_empty_hand_made_views(tmp_path: Path) -> None:
    data = np.arange(4, dtype="<f4")
    for size, stride, offset, want in [((), (), 3, np.float32(3)), ((0, 5), (9, 9), 4, None)]:
        pkl = tensor_pickle(4, offset, size, stride)
        path = write_zip(tmp_path / "v.pt", {"data.pkl": pkl, "data/0": data.tobytes()})
        got = read_state_dict(path)["w"]
        assert got.shape == size and got.dtype == np.float32
        if want is not None:
            assert got == want


def test_not_a_state_dict(tmp_path: Path) -> None:
    for obj, match in [([1, 2], "not a state dict"), ({"w": 3}, "not a tensor")]:
        path = tmp_path / "x.pt"
        torch.save(obj, path)
        with pytest.raises(checkpoint.CheckpointError, match=match):
            read_state_dict(path)
    path = tmp_path / "missing-storage.pt"
    write_zip(path, {"data.pkl": tensor_pickle(4, 0, (4,), (1,))})
    with pytest.raises(checkpoint.CheckpointError, match="archive/data/0 is missing"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------
# Malicious and damaged files
# --------------------------------------------------------------------------------------


def install(torch_home_dir: Path, file_name: str, data: bytes) -> None:
    d = torch_home_dir / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    (d / file_name).write_bytes(data)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME of this test's own."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def evil_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickles that run code when loaded, and the global each one needs."""
    shell = f"touch {marker}"
    opener = f"open({str(marker)!r}, 'w')"
    return {
        "os.system": (
            pickle.dumps({"w": Evil(os.system, shell)}),
            f"{os.system.__module__}.system",
        ),
        "eval": (pickle.dumps({"w": Evil(eval, opener)}), "builtins.eval"),
        # Protocol 2 writes Python 2 module names; find_class sees them unmapped.
        "eval-protocol-2": (pickle.dumps({"w": Evil(eval, opener)}, 2), "__builtin__.eval"),
    }


def test_evil_payloads_are_live(tmp_path: Path) -> None:
    """The payloads below really run code under a plain unpickler (so the tests can fail)."""
    for name, (payload, _) in evil_payloads(tmp_path / "marker").items():
        pickle.loads(payload)
        assert (tmp_path / "marker").exists(), name
        (tmp_path / "marker").unlink()


@pytest.mark.parametrize("kind", ["os.system", "eval", "eval-protocol-2"])
def test_malicious_zip_is_refused(tmp_path: Path, home: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    payload, refused = evil_payloads(marker)[kind]
    write_zip(tmp_path / "evil.pt", {"data.pkl": payload, "byteorder": b"little"})
    install(home, "evil.th", (tmp_path / "evil.pt").read_bytes())
    with pytest.raises(ModelUnavailable) as error:
        load_state_dict("evil.th", "evil model")
    message = one_line(error)
    assert f"refused global {refused}" in message
    assert "cannot load evil model from " in message and "evil.th" in message
    assert not marker.exists()


@pytest.mark.parametrize("position", range(5))
def test_malicious_legacy_is_refused(tmp_path: Path, home: Path, position: int) -> None:
    """Every pickle of a legacy file is restricted, the header ones included."""
    marker = tmp_path / "marker"
    payload, refused = evil_payloads(marker)["os.system"]
    good = write_legacy(tmp_path / "good.pt", pickle.dumps({}, 2), pickle.dumps([], 2))
    bounds = [0]
    with open(good, "rb") as f:
        for _ in range(5):
            pickle.load(f)
            bounds.append(f.tell())
    raw = good.read_bytes()
    pickles = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert b"".join(pickles) == raw
    assert read_state_dict(good) == {}
    pickles[position] = payload
    install(home, "evil.th", b"".join(pickles))
    with pytest.raises(ModelUnavailable) as error:
        load_state_dict("evil.th", "evil model")
    assert f"refused global {refused}" in one_line(error)
    assert not marker.exists()


def test_refuses_other_torch_globals(tmp_path: Path) -> None:
    """Even torch's own globals are refused beyond the few a state dict needs."""
    pkl = tensor_pickle(4, 0, (4,), (1,)).replace(b"_rebuild_tensor_v2", b"_rebuild_tensor_v3")
    path = write_zip(tmp_path / "v3.pt", {"data.pkl": pkl, "data/0": bytes(16)})
    with pytest.raises(checkpoint.CheckpointError, match=r"torch\._utils\._rebuild_tensor_v3"):
        read_state_dict(path)


def damaged_files(torch_home: Path) -> dict[str, bytes]:
    real = (torch_home / "hub" / "checkpoints" / synth.CHECKPOINT_FILES[-1]).read_bytes()
    legacy = io.BytesIO()
    torch.save(tricky_tensors(), legacy, _use_new_zipfile_serialization=False)
    rng = np.random.default_rng(3)
    files = {f"random-{i}": rng.bytes(int(rng.integers(1, 5000))) for i in range(20)}
    files["random-pk"] = b"PK\x03\x04" + rng.bytes(3000)
    files["empty"] = b""
    files["truncated-zip"] = real[: len(real) // 2]
    files["zip-missing-its-end"] = real[:-10]
    files["truncated-legacy"] = legacy.getvalue()[:-100]
    files["legacy-header-only"] = legacy.getvalue()[:60]
    return files


def test_damaged_files_are_unavailable_in_one_line(torch_home: Path, home: Path) -> None:
    for name, data in damaged_files(torch_home).items():
        install(home, name, data)
        with pytest.raises(ModelUnavailable) as error:
            load_state_dict(name, "test model")
        message = one_line(error)
        assert message.startswith(f"cannot load test model from {home}"), name
        assert f"it comes from {checkpoint.BASE_URL}{name})" in message, name


# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------


class Server:
    """A local HTTP server of ``files`` (name -> bytes) that counts its requests;
    ``short`` names are sent cut short of their Content-Length."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.path.lstrip("/") in server.short:
                    data = data[: len(data) // 2]
                    self.close_connection = True
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    server = Server()
    monkeypatch.setattr(checkpoint, "BASE_URL", server.url)
    yield server
    server.close()


def named(data: bytes, stem: str = "encodec_48khz") -> str:
    """The torch.hub name of ``data``: the first 8 hex digits of its sha256 in it."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.th"


def listing(home: Path) -> list[str]:
    d = home / "hub" / "checkpoints"
    return sorted(os.listdir(d)) if d.exists() else []


def test_download(server: Server, home: Path) -> None:
    data = np.random.default_rng(0).bytes(300_000)
    name = named(data)
    server.files[name] = data
    path = checkpoint.fetch(name, "test model")
    assert path == home / "hub" / "checkpoints" / name
    assert path.read_bytes() == data
    assert listing(home) == [name]
    assert server.requests == 1
    assert checkpoint.fetch(name, "test model") == path
    assert server.requests == 1


def test_download_and_load(server: Server, home: Path, tmp_path: Path) -> None:
    tensors = tricky_tensors()
    torch.save(tensors, tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    name = named(data, "encodec_lm_24khz")
    server.files[name] = data
    assert_same(load_state_dict(name, "test model"), tensors)


def test_concurrent_downloads(server: Server, home: Path) -> None:
    data = np.random.default_rng(1).bytes(2_000_000)
    name = named(data)
    server.files[name] = data
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


def test_wrong_hash_is_refused(server: Server, home: Path) -> None:
    data = b"not the checkpoint you are looking for\n" * 1000
    digest = hashlib.sha256(data).hexdigest()
    name = f"encodec_48khz-{'0' if digest[0] != '0' else '1'}{digest[1:8]}.th"
    server.files[name] = data
    with pytest.raises(ModelUnavailable) as error:
        checkpoint.fetch(name, "test model")
    message = one_line(error)
    assert f"its sha256 {digest} does not match the hash prefix" in message
    assert not (home / "hub" / "checkpoints" / name).exists()
    assert listing(home) == []


def test_truncated_download_is_refused(server: Server, home: Path) -> None:
    data = np.random.default_rng(2).bytes(100_000)
    name = named(data)
    server.files[name] = data
    server.short.add(name)
    with pytest.raises(ModelUnavailable) as error:
        checkpoint.fetch(name, "test model")
    assert "truncated: got 50000 of 100000 bytes" in one_line(error)
    assert listing(home) == []


def test_not_found(server: Server, home: Path) -> None:
    name = checkpoint.CHECKPOINTS["encodec_24khz"]
    with pytest.raises(ModelUnavailable) as error:
        load_state_dict(name, "encodec_24khz")
    message = one_line(error)
    directory = home / "hub" / "checkpoints"
    assert message == (
        f"encodec_24khz checkpoint {name} is missing and could not be downloaded from "
        f"{server.url}{name} (HTTP 404 Not Found); put it in {directory}/ (or set TORCH_HOME)"
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


def test_existing_file_is_used_without_a_request(server: Server, home: Path) -> None:
    name = checkpoint.CHECKPOINTS["encodec_48khz"]  # its content does not match its hash
    install(home, name, b"whatever is there")
    path = checkpoint.fetch(name, "test model")
    assert path.read_bytes() == b"whatever is there"
    assert server.requests == 0
    st = path.stat()
    assert checkpoint.fingerprint(name) == (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def test_no_torch_import() -> None:
    for module in (checkpoint, torchfile):
        source = Path(module.__file__).read_text()
        for name in ("import torch", "__import__", "importlib"):
            assert name not in source, module


def test_reading_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess

    torch.save(tricky_tensors(), tmp_path / "x.pt")
    code = (
        "import sys; from pathlib import Path; from ecdcfs.torchfile import read_state_dict; "
        f"d = read_state_dict(Path({str(tmp_path / 'x.pt')!r})); "
        "assert len(d) > 10; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
