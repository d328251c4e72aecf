"""The .ecdc container, written from the format: an independent oracle that imports
nothing from ecdcfs (do not replace it with calls into ecdcfs)."""

from __future__ import annotations

import json
import struct

import numpy as np

_HEADER = struct.Struct("!4sBI")
_MAGIC = b"ECDC"


def parse_header(data: bytes) -> tuple[int, dict, int]:
    """(version, metadata, payload offset) of an .ecdc file."""
    magic, version, size = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC:
        raise ValueError("not an ECDC file")
    start = _HEADER.size
    meta = json.loads(data[start : start + size].decode("utf-8"))
    return version, meta, start + size


def to_v193(
    v0: bytes,
    sr: int,
    name: str | None = None,
    source: str | None = None,
    thumbnail: str | None = None,
    br: float | None = None,
    version: int = 193,
) -> bytes:
    """Rewrite an upstream v0 header the way Encodec-Stream does (version 192/193,
    compact JSON with extra keys ``br``, ``sr`` and optional ``n``, ``s``, ``t``).
    The payload bytes are unchanged."""
    old_version, meta, off = parse_header(v0)
    assert old_version == 0, f"expected a version-0 file, got version {old_version}"
    if br is None:
        # bits per codebook (10) * codebooks * frame rate / 1000
        frame_rate = {"encodec_48khz": 150, "encodec_24khz": 75}[meta["m"]]
        br = meta["nc"] * 10 * frame_rate / 1000
    new = {"m": meta["m"], "al": meta["al"], "nc": meta["nc"], "lm": meta["lm"], "br": br, "sr": sr}
    if name is not None:
        new["n"] = name
    if source is not None:
        new["s"] = source
    if thumbnail is not None:
        new["t"] = thumbnail
    dumped = json.dumps(new, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(_MAGIC, version, len(dumped)) + dumped + v0[off:]


def to_v0(data: bytes) -> bytes:
    """Inverse of ``to_v193``: upstream version-0 header (keys m, al, nc, lm)."""
    version, meta, off = parse_header(data)
    if version == 0:
        return data
    new = {"m": meta["m"], "al": meta["al"], "nc": meta["nc"], "lm": meta["lm"]}
    dumped = json.dumps(new).encode("utf-8")
    return _HEADER.pack(_MAGIC, 0, len(dumped)) + dumped + data[off:]


def container_24khz(samples: int, nc: int, payload: bytes, lm: bool = False) -> bytes:
    """A version-0 ``encodec_24khz`` file of ``samples`` with ``payload`` (any bytes)."""
    return container_bytes({"m": "encodec_24khz", "al": samples, "nc": nc, "lm": lm}, payload)


def random_packed_24khz(samples: int, nc: int, seed: int = 0) -> bytes:
    """Bit-packed random codes for a 24 kHz file of ``samples`` (no encoder needed)."""
    steps = -(-samples // 320)
    codes = np.random.default_rng(seed).integers(0, 1024, steps * nc, dtype=np.uint16)
    bits = ((codes[:, None] >> np.arange(10, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def long_plain_file(v0: bytes, frames: int) -> bytes:
    """A long bit-packed 48 kHz file made of ``v0``'s full frames over and over, then its
    short last frame (any codes decode; no encoding needed)."""
    _, meta, offset = parse_header(v0)
    assert meta["m"] == "encodec_48khz" and not meta["lm"]
    full_frames, tail = divmod(meta["al"] - 480, 47_520)
    frame_bytes = 4 + 150 * meta["nc"] * 10 // 8
    payload = v0[offset:]
    full = [payload[i * frame_bytes : (i + 1) * frame_bytes] for i in range(full_frames)]
    body = b"".join(full[i % full_frames] for i in range(frames))
    body += payload[full_frames * frame_bytes :]
    header = {**meta, "al": frames * 47_520 + tail + 480}
    dumped = json.dumps(header).encode()
    return b"ECDC\0" + len(dumped).to_bytes(4, "big") + dumped + body


def container_bytes(meta: dict | list | bytes, payload: bytes = b"", version: int = 0) -> bytes:
    """A container of ``meta`` (JSON, or bytes as they are) and ``payload``."""
    body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return _HEADER.pack(_MAGIC, version, len(body)) + body + payload


def plain_payload_bytes(model: str, samples: int, nc: int) -> int:
    """Bytes of a bit-packed payload, as ``encodec.compress`` writes it: per frame (48 kHz:
    1 s segments every 0.99 s, each with a 4-byte scale; 24 kHz: one frame), 10-bit codes
    of ``nc`` codebooks for each 320-sample step, flushed to a whole byte."""
    if model == "encodec_48khz":
        segment, stride, scale = 48_000, 47_520, 4
    else:
        segment, stride, scale = samples, samples, 0
    total = 0
    for offset in range(0, samples, stride):
        steps = -(-min(samples - offset, segment) // 320)
        total += scale + -(-steps * nc * 10 // 8)
    return total


def zero_codes(
    samples: int = 4800, model: str = "encodec_48khz", nc: int = 2, version: int = 0, **extra
) -> bytes:
    """A valid bit-packed file whose payload is zeros, of exactly the size its header needs:
    enough to list, stat and open, and to decode where a test decodes."""
    meta = {"m": model, "al": samples, "nc": nc, "lm": False, **extra}
    return container_bytes(meta, bytes(plain_payload_bytes(model, samples, nc)), version)
