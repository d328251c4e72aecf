""".ecdc test files: synthetic audio encoded with upstream ``encodec.compress``."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import torch

from synth.audio import model_params, synth_audio
from synth.store import checkpoint_dir, disk_get, disk_put, generation_id

# One lock for the shared models (their bandwidth is state) and the caches.
MODEL_LOCK = threading.RLock()
_models: dict[tuple[str, str], torch.nn.Module] = {}
_ecdc_cache: dict[tuple, bytes] = {}


def load_model(model: str = "encodec_48khz"):
    """The (random-init) model as upstream loads it, cached per TORCH_HOME."""
    from encodec.compress import MODELS

    home = str(checkpoint_dir().parent.parent)
    key = (model, home)
    with MODEL_LOCK:
        if key not in _models:
            _models[key] = MODELS[model]()
        return _models[key]


def make_ecdc(
    model: str = "encodec_48khz",
    samples: int = 48000,
    kbps: float = 6,
    lm: bool = False,
    seed: int = 0,
) -> bytes:
    """Encode deterministic synthetic audio with upstream ``encodec.compress.compress``.

    ``samples`` per channel at the model's rate (stereo for 48 kHz, mono for 24 kHz).
    Returns the upstream version-0 .ecdc bytes. Cached per parameters (in memory, and
    on disk next to cached checkpoints).
    """
    assert samples > 0
    model_params(model)  # validates the name
    key = (model, int(samples), float(kbps), bool(lm), int(seed))
    gid = generation_id()
    with MODEL_LOCK:
        mem_key = (gid or checkpoint_dir().as_posix(), *key)
        if mem_key in _ecdc_cache:
            return _ecdc_cache[mem_key]
        disk_name = "ecdc-" + "-".join(str(k) for k in key) + ".ecdc"
        data = disk_get(disk_name)
        if data is None:
            data = encode_uncached(model, samples, kbps, lm, seed)
            disk_put(disk_name, data)
        _ecdc_cache[mem_key] = data
        return data


def encode_uncached(model: str, samples: int, kbps: float, lm: bool, seed: int) -> bytes:
    """``make_ecdc`` without any caching."""
    from encodec.compress import compress

    sr, channels = model_params(model)
    with MODEL_LOCK:
        m = load_model(model)
        m.set_target_bandwidth(kbps)
        wav = torch.from_numpy(synth_audio(sr, channels, samples, seed=seed))
        return compress(m, wav, use_lm=lm)


def lm_encode(lm, codes: np.ndarray) -> bytes:
    """Arithmetic-code ``codes`` ``[codebooks, steps]`` as one LM-coded frame (no scale).

    The loop of ``encodec.compress`` for one frame's codes, so tests can write LM-coded
    files of chosen codes (e.g. long random ones) without encoding audio.
    """
    from encodec.quantization.ac import ArithmeticCoder, build_stable_quantized_cdf

    out = io.BytesIO()
    coder = ArithmeticCoder(out)
    states, offset = None, 0
    previous = torch.zeros(1, codes.shape[0], 1, dtype=torch.long)
    frame = torch.from_numpy(codes.astype(np.int64))[None]
    with torch.no_grad():
        for t in range(codes.shape[1]):
            probas, states, offset = lm(previous, states, offset)
            previous = 1 + frame[:, :, t : t + 1]
            for k, value in enumerate(frame[0, :, t].tolist()):
                cdf = build_stable_quantized_cdf(
                    probas[0, :, k, 0], coder.total_range_bits, check=False
                )
                coder.push(value, cdf)
    coder.flush()
    return out.getvalue()


def write(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``directory / name`` and return the path."""
    path = directory / name
    path.write_bytes(data)
    return path
