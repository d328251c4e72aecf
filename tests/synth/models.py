"""Seeded random-init Encodec models and LMs, saved under the official checkpoint names.

A naive random init is useless for codec tests: the quantizer codebooks start at zero
(they are k-means initialised during training) so every frame would get code 0, and the
24 kHz model (weight norm, no activation normalisation) squashes its signal to an
almost time-invariant embedding and near-silent output. So, deterministically (seeded):

* the weight-norm convolutions of the 24 kHz encoder/decoder get a data-dependent
  rescale (LSUV style) so activations stay around unit variance;
* every codebook of the residual quantizer is initialised from encoder embeddings
  of synthetic audio (samples of the residual at that stage, jittered), then marked
  ``inited``, so the codes of real inputs vary in every codebook;
* the 24 kHz decoder output is scaled to roughly the input loudness (the 48 kHz
  decoder ends with a GroupNorm and is rescaled by the input RMS already);
* the LMs are ``LMModel`` instances built exactly like ``get_lm_model`` does, with
  output projections scaled up 3x so the arithmetic coder sees non-uniform
  distributions.

Generation takes a few seconds and is bitwise reproducible for a given torch version
and thread count (a different thread count gives slightly different codebooks, which
is harmless: everything in a session uses the same files). Everything here runs on
the CPU and leaves torch's thread settings alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from synth.audio import synth_audio

# Bump when the generated checkpoints change in a way the source hash would not show.
GENERATOR_VERSION = 1
SEED = 1234

MODEL_CHECKPOINTS = {
    "encodec_48khz": "encodec_48khz-7e698e3e.th",
    "encodec_24khz": "encodec_24khz-d7cc33bc.th",
}
LM_CHECKPOINTS = {
    "encodec_48khz": "encodec_lm_48khz-7add9fc3.th",
    "encodec_24khz": "encodec_lm_24khz-1608e3c0.th",
}
CHECKPOINT_FILES = tuple(MODEL_CHECKPOINTS.values()) + tuple(LM_CHECKPOINTS.values())


def _calibration_audio(sample_rate: int, channels: int, clips: int, samples: int) -> torch.Tensor:
    """A batch of varied synthetic clips (different seeds and loudness)."""
    amps = np.geomspace(0.03, 0.6, clips)
    batch = [
        synth_audio(sample_rate, channels, samples, seed=10_000 + i, amplitude=float(a))
        for i, a in enumerate(amps)
    ]
    return torch.from_numpy(np.stack(batch))


def _normalize_input(model, x: torch.Tensor) -> torch.Tensor:
    # Same as EncodecModel._encode_frame.
    if not model.normalize:
        return x
    mono = x.mean(dim=1, keepdim=True)
    volume = mono.pow(2).mean(dim=2, keepdim=True).sqrt()
    return x / (1e-8 + volume)


def _weight_norm_convs(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d) and hasattr(m, "weight_g")
    ]


@torch.no_grad()
def _lsuv(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rescale every weight-norm conv so its output has zero mean per channel and unit
    variance overall on ``x``, in one forward pass (hooks adjust the layers in execution
    order and patch their outputs). Returns the output of ``module``."""

    def hook(conv, _inputs, out):
        mean = out.mean(dim=(0, 2))
        std = (out - mean[None, :, None]).std().clamp_min(1e-8)
        conv.weight_g.data /= std
        conv.bias.data.copy_((conv.bias.data - mean) / std)
        return (out - mean[None, :, None]) / std

    handles = [c.register_forward_hook(hook) for c in _weight_norm_convs(module)]
    try:
        return module(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _init_codebooks(model, emb: torch.Tensor, gen: torch.Generator, noise: float = 0.5) -> None:
    """Initialise the RVQ codebooks from embeddings ``emb`` ``[B, D, T]``.

    Each layer's codebook is a random sample of the current residuals plus Gaussian noise
    (``noise`` times the per-dimension residual spread). No k-means: with fewer frames
    than codebook entries a fitted codebook would drive the residual of the calibration
    data to zero and all later codebooks would collapse to (almost) zero vectors.
    """
    residual = emb.permute(0, 2, 1).reshape(-1, emb.shape[1]).double()
    for layer in model.quantizer.vq.layers:
        cb = layer._codebook
        size, dim = cb.embed.shape
        idx = torch.randint(0, residual.shape[0], (size,), generator=gen)
        spread = residual.std(dim=0, keepdim=True)
        jitter = torch.randn(size, dim, generator=gen, dtype=torch.float64)
        centers = residual[idx] + noise * spread * jitter
        embed = centers.float()
        cb.embed.data.copy_(embed)
        cb.embed_avg.data.copy_(embed)
        cb.cluster_size.data.fill_(1.0)
        cb.inited.data.fill_(1.0)
        residual = residual - centers[torch.cdist(residual, centers).argmin(dim=1)]


def _build_model(name: str, seed: int) -> torch.nn.Module:
    from encodec.model import EncodecModel

    ctor = {
        "encodec_48khz": EncodecModel.encodec_model_48khz,
        "encodec_24khz": EncodecModel.encodec_model_24khz,
    }[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor(pretrained=False)
    model.eval()
    sr, channels = model.sample_rate, model.channels
    gen = torch.Generator().manual_seed(seed + 1)
    # 4 s of calibration audio (600 embedding frames): varied enough, fast enough.
    x = _calibration_audio(sr, channels, clips=4, samples=sr if sr == 48_000 else 2 * sr)
    with torch.no_grad():
        xin = _normalize_input(model, x)
        emb = _lsuv(model.encoder, xin) if name == "encodec_24khz" else model.encoder(xin)
        _init_codebooks(model, emb, gen)
        if name == "encodec_24khz":
            codes = model.quantizer.encode(emb, model.frame_rate, None)
            q = model.quantizer.decode(codes)
            y = _lsuv(model.decoder, q)
            # Scale the final conv so the output is about as loud as the input.
            last = _weight_norm_convs(model.decoder)[-1]
            gain = (x.pow(2).mean().sqrt() / y.pow(2).mean().sqrt().clamp_min(1e-8)).item()
            last.weight_g.data *= gain
            last.bias.data *= gain
    return model


def _build_lm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    from encodec.model import LMModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LMModel(
            model.quantizer.n_q,
            model.quantizer.bins,
            num_layers=5,
            dim=200,
            past_context=int(3.5 * model.frame_rate),
        )
    with torch.no_grad():
        for lin in lm.linears:
            lin.weight.mul_(3.0)
    lm.eval()
    return lm


def generate_checkpoints(dest: Path, seed: int = SEED) -> None:
    """Write the four checkpoint files into ``dest`` (a ``hub/checkpoints`` dir)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(MODEL_CHECKPOINTS):
        model = _build_model(name, seed + 100 * i)
        lm = _build_lm(model, seed + 100 * i + 50)
        for file, module in ((MODEL_CHECKPOINTS[name], model), (LM_CHECKPOINTS[name], lm)):
            tmp = dest / (file + ".tmp")
            torch.save(module.state_dict(), tmp)
            os.replace(tmp, dest / file)


def generator_key() -> str:
    """Hash of everything the generated checkpoints depend on."""
    import encodec

    h = hashlib.sha256()
    for module in ("models.py", "audio.py"):  # the generator and its calibration audio
        h.update((Path(__file__).parent / module).read_bytes())
    h.update(f"{GENERATOR_VERSION}|{SEED}|{torch.__version__}|{encodec.__version__}".encode())
    h.update(f"{np.__version__}".encode())
    return h.hexdigest()[:16]
