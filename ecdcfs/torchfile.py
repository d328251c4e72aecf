"""``torch.save`` files read without torch (:func:`read_state_dict`), safely.

Encodec's checkpoints are ``torch.save`` files of a flat state dict. Importing torch costs
seconds, and ``torch.load`` of an untrusted pickle can run code, so this module reads both
of torch's formats with the standard library and numpy (never torch, not even lazily):

* the zip format: ``<top>/data.pkl`` plus one ``<top>/data/<key>`` member per storage;
* the legacy format (``_use_new_zipfile_serialization=False``): pickles of the magic
  number, the protocol version, the system info, the object, the storage keys, then each
  storage as a little-endian int64 element count and its little-endian bytes.

Every pickle goes through ``_Unpickler``, which resolves only the handful of globals a
state dict needs, each to a harmless stand-in of ours: anything else is refused, so a
malicious checkpoint cannot run code. Tensors come back as contiguous native numpy arrays
(bfloat16 as float32).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np


class CheckpointError(Exception):
    """A file is not a torch checkpoint of a state dict this module can read safely."""


MAX_PICKLE_BYTES = 64 << 20  # a state dict's data.pkl is kilobytes; refuse to inflate a bomb
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
ZIP_MAGIC = b"PK\x03\x04"
_COUNT = struct.Struct("<q")  # a legacy storage's element count

# Whatever a damaged or hostile file can make the parsers raise (not OSError: I/O errors
# are reported as such).
_PARSE_ERRORS = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    struct.error,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    MemoryError,
    RecursionError,
    NotImplementedError,
)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------
# Reading torch.save files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class: the dtype of its elements in the file
    (little-endian; ``big`` gives the big-endian one)."""

    name: str
    code: str  # numpy type code without byte order
    bfloat16: bool = False

    def dtype(self, big: bool = False) -> np.dtype:
        return np.dtype(("<", ">")[big] + self.code)


_STORAGE_TYPES = {
    t.name: t
    for t in (
        _StorageType("FloatStorage", "f4"),
        _StorageType("DoubleStorage", "f8"),
        _StorageType("HalfStorage", "f2"),
        _StorageType("BFloat16Storage", "u2", bfloat16=True),
        _StorageType("LongStorage", "i8"),
        _StorageType("IntStorage", "i4"),
        _StorageType("ShortStorage", "i2"),
        _StorageType("CharStorage", "i1"),
        _StorageType("ByteStorage", "u1"),
        _StorageType("BoolStorage", "b1"),
        _StorageType("UntypedStorage", "u1"),  # torch reads its bytes as uint8
    )
}


@dataclass(eq=False)
class _Storage:
    """One storage: its type, its element count, and its elements once read (shared by
    every tensor that views it, read at most once)."""

    type: _StorageType
    numel: int
    read: Callable[[], np.ndarray] | None = None  # zip: reads the member when first needed
    data: np.ndarray | None = field(default=None, repr=False)

    def array(self) -> np.ndarray:
        if self.data is None:
            if self.read is None:
                raise CheckpointError("a storage has no data in the file")
            self.data = self.read()
            self.read = None
        return self.data


@dataclass(frozen=True)
class _Tensor:
    """A tensor as the pickle describes it; made an array once the storages are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int(value: object) -> bool:
    return type(value) is int


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> _Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor``: checks the view, builds nothing yet."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("a tensor's storage is not a storage")
    if not (
        _is_int(offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(_is_int(n) and n >= 0 for n in size)
        and all(_is_int(s) and s >= 0 for s in stride)
    ):
        raise CheckpointError(f"bad tensor view: offset {offset!r} size {size!r} stride {stride!r}")
    assert isinstance(offset, int)  # for mypy
    if offset < 0:
        raise CheckpointError(f"bad tensor view: negative offset {offset}")
    return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (autograd details are dropped)."""
    if metadata:
        raise CheckpointError(f"unsupported tensor metadata {metadata!r}")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: object, requires_grad: object = False, hooks: object = None) -> object:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its tensor."""
    if not isinstance(data, _Tensor):
        raise CheckpointError("a parameter's data is not a tensor")
    return data


_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _STORAGE_TYPES["UntypedStorage"],
    **{("torch", name): t for name, t in _STORAGE_TYPES.items()},
}


def _ascii(value: object) -> object:
    """Py2-era pickles store torch's internal names as bytes."""
    return value.decode("ascii") if isinstance(value, bytes) else value


class _Unpickler(pickle.Unpickler):
    """An unpickler that can build nothing but dicts, tensor stand-ins and plain data.

    ``legacy`` selects the persistent id layout of storages: ``(storage, type, key,
    location, numel)`` in zip files, with a trailing view (always None since torch 1.x)
    in legacy ones. Storages are registered in ``storages`` by key, one object per key.
    """

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage] | None, legacy: bool):
        super().__init__(file)
        self.storages = storages
        self.legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a checkpoint may hold only tensors"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self.storages is None:
            raise pickle.UnpicklingError("a storage reference outside the state dict pickle")
        if not isinstance(pid, tuple) or len(pid) != (6 if self.legacy else 5):
            raise CheckpointError(f"bad storage reference {pid!r}")
        kind, storage_type, key, location, numel, *view = pid
        if _ascii(kind) != "storage" or not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"bad storage reference {pid!r}")
        key = _ascii(key)
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise CheckpointError(f"bad storage reference {pid!r}")
        if view and view[0] is not None:
            raise CheckpointError("legacy storage views (torch < 1.0) are not supported")
        storage = self.storages.setdefault(key, _Storage(storage_type, numel))
        if storage.type != storage_type or storage.numel != numel:
            raise CheckpointError(f"storage {key} is referenced with different types or sizes")
        return storage


def _unpickle(file: IO[bytes], storages: dict[str, _Storage] | None, legacy: bool) -> Any:
    return _Unpickler(file, storages, legacy).load()


def _elements(raw: bytes, storage_type: _StorageType, numel: int, big: bool) -> np.ndarray:
    """The first ``numel`` elements of ``raw``, refusing a storage shorter than declared."""
    dtype = storage_type.dtype(big)
    nbytes = numel * dtype.itemsize
    if len(raw) < nbytes:
        raise CheckpointError(f"a storage of {numel} elements has only {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, count=numel)


def _read_zip(archive: zipfile.ZipFile) -> object:
    """The unpickled object of a zip-format checkpoint; its storages are read from
    ``archive`` when a tensor first needs them."""
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise CheckpointError(f"a zip file with {len(pickles)} top-level data.pkl (needs 1)")
    top = pickles[0].split("/")[0]
    if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{pickles[0]} is implausibly large")
    byteorder = b"little"
    if f"{top}/byteorder" in archive.namelist():
        byteorder = archive.read(f"{top}/byteorder").strip()
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(f"unknown byte order {byteorder!r}")

    def reader(key: str, storage: _Storage) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            name = f"{top}/data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise CheckpointError(f"storage {name} is missing") from None
            # torch stores storages uncompressed: then reading costs no more memory than
            # the file really holds, whatever its headers claim.
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"storage {name} is compressed")
            nbytes = storage.numel * storage.type.dtype().itemsize
            if info.file_size < nbytes:
                raise CheckpointError(
                    f"storage {name} of {storage.numel} elements has only {info.file_size} bytes"
                )
            with archive.open(info) as member:
                raw = member.read(nbytes)
            return _elements(raw, storage.type, storage.numel, byteorder == b"big")

        return read

    storages: dict[str, _Storage] = {}
    obj = _unpickle(io.BytesIO(archive.read(pickles[0])), storages, legacy=False)
    for key, storage in storages.items():
        storage.read = reader(key, storage)
    return obj


def _read_legacy(file: BinaryIO) -> object:
    """The unpickled object of a legacy-format checkpoint, its storages all read."""
    try:
        magic = _unpickle(file, None, legacy=True)
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"not a torch checkpoint ({one_line(str(e))})") from e
    if magic != LEGACY_MAGIC:
        raise CheckpointError("not a torch checkpoint (no zip archive, no legacy magic number)")
    version = _unpickle(file, None, legacy=True)
    if version != LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported legacy protocol version {version!r}")
    _unpickle(file, None, legacy=True)  # sys_info: storages are little-endian regardless
    storages: dict[str, _Storage] = {}
    obj = _unpickle(file, storages, legacy=True)
    keys = _unpickle(file, None, legacy=True)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError("bad storage key list")
    file_size = os.fstat(file.fileno()).st_size
    for key in keys:
        storage = storages.get(key)
        if storage is None or storage.data is not None:
            raise CheckpointError(f"storage key {key!r} unknown or repeated")
        (count,) = _COUNT.unpack(file.read(_COUNT.size))
        if count != storage.numel:
            raise CheckpointError(f"storage {key} has {count} elements, {storage.numel} declared")
        nbytes = count * storage.type.dtype().itemsize
        if nbytes > file_size - file.tell():  # never ask read() for more than the file has
            raise CheckpointError(f"storage {key} of {count} elements is cut short")
        storage.data = _elements(file.read(nbytes), storage.type, count, big=False)
    return obj


def _to_array(tensor: _Tensor) -> np.ndarray:
    """A contiguous native-endian copy of ``tensor``'s view of its storage, after checking
    that the view stays inside the storage."""
    raw = tensor.storage.array()
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    count = math.prod(size)
    if count == 0:
        out = np.empty(size, dtype=raw.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= raw.size:
            raise CheckpointError(
                f"tensor view {size} stride {stride} offset {offset} overruns its storage "
                f"of {raw.size} elements"
            )
        if count > raw.size:  # only overlapping (broadcast) views: state dicts hold none
            raise CheckpointError(f"tensor {size} has more elements than its storage")
        itemsize = raw.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            raw[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
        )
        out = np.array(view, order="C")
    if tensor.storage.type.bfloat16:
        return (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False)  # a C-order copy already


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The state dict saved by ``torch.save`` at ``path``, as numpy arrays, in file order.

    Raises CheckpointError for anything that is not such a file (the pickle never runs
    code: only tensor globals are admitted), OSError if it cannot be read.
    """
    with open(path, "rb") as file:
        try:
            if file.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
                file.seek(0)
                with zipfile.ZipFile(file) as archive:
                    return _arrays(_read_zip(archive))
            file.seek(0)
            return _arrays(_read_legacy(file))
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"a damaged zip archive ({one_line(str(e))})") from e
        except _PARSE_ERRORS as e:
            raise CheckpointError(one_line(str(e)) or type(e).__name__) from e


def _arrays(obj: object) -> dict[str, np.ndarray]:
    """The arrays of the unpickled state dict ``obj``, refusing anything else."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict")
    result: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            raise CheckpointError(f"entry {key!r} is not a tensor")
        result[key] = _to_array(value)
    return result
