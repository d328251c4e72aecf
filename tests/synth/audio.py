"""Deterministic synthetic test audio: tones, a chirp and noise, slowly modulated."""

from __future__ import annotations

import numpy as np


def model_params(model: str) -> tuple[int, int]:
    """(sample_rate, channels) of a model name."""
    if model == "encodec_48khz":
        return 48_000, 2
    if model == "encodec_24khz":
        return 24_000, 1
    raise ValueError(f"unknown model {model!r}")


def synth_audio(
    sample_rate: int, channels: int, samples: int, seed: int = 0, amplitude: float = 0.3
) -> np.ndarray:
    """Deterministic test audio: tones + a chirp + noise, slowly modulated.

    Returns float32 ``[channels, samples]`` with peak magnitude about ``amplitude``.
    """
    rng = np.random.default_rng([seed, sample_rate, channels, 0x5EED])
    t = np.arange(samples, dtype=np.float64) / sample_rate
    duration = max(samples / sample_rate, 1e-3)
    nyq = sample_rate / 2
    out = np.zeros((channels, samples), dtype=np.float64)
    for c in range(channels):
        f1, f2 = rng.uniform(60, 1500), rng.uniform(300, min(6000, 0.4 * nyq))
        p1, p2, p3 = rng.uniform(0, 2 * np.pi, size=3)
        c0, c1 = rng.uniform(50, 500), rng.uniform(2000, 0.8 * nyq)
        chirp_phase = 2 * np.pi * (c0 * t + (c1 - c0) * t * t / (2 * duration))
        env = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.3, 3.0) * t + p3)
        sig = (
            0.35 * np.sin(2 * np.pi * f1 * t + p1)
            + 0.2 * np.sin(2 * np.pi * f2 * t + p2)
            + 0.25 * np.sin(chirp_phase)
        ) * env
        sig += 0.1 * rng.standard_normal(samples)
        out[c] = sig
    return (amplitude * out).astype(np.float32)
