"""ecdcfs.checkpoint and ecdcfs.torchfile: torch-free checkpoint reading (torch.load is the
oracle) and refusal of malicious pickles and damaged files. Downloads are in
test_checkpoint_download.py."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import synth
from ecdcfs import checkpoint, torchfile
from ecdcfs.checkpoint import load_state_dict
from ecdcfs.decoder import ModelUnavailable
from ecdcfs.torchfile import read_state_dict
from torchfiles import (
    Evil,
    assert_same,
    install,
    one_line,
    reference,
    tensor_pickle,
    tricky_tensors,
    write_legacy,
    write_zip,
)

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
# No torch
# --------------------------------------------------------------------------------------


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
