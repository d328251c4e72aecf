"""Hand-made torch checkpoint files for the tests of ecdcfs's own reader (torch.load is the
oracle): zip and legacy formats, tricky views and dtypes, malicious pickles."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ecdcfs import torchfile


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


def install(torch_home_dir: Path, file_name: str, data: bytes) -> None:
    d = torch_home_dir / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    (d / file_name).write_bytes(data)
