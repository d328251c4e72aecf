"""Exporting encodec's decoder to ONNX (torch and encodec: only ever in a child process).

The graph is exported from the user's own checkpoint with torch's TorchScript-based
exporter, once, by ``python -m ecdcfs.graph MODEL SHA256 OUT`` (:func:`build_artifact`,
started by :func:`ecdcfs.onnx_decoder.build`), so the process that decodes never imports
torch. It is the SEANet decoder from embedding to audio, built from encodec's own layers and
weights (:func:`exportable`); the quantizer's lookup (a sum of codebook rows), the first
convolution's padding and the frame's scale stay outside, so one graph serves every code
count and every length.

What the export must avoid (each measured): encodec's ``SConv1d`` computes its extra
padding with ``math.ceil`` of the traced length, so a graph traced at 150 steps pads every
other length to 150 steps' worth and fails; the decoder's convolutions all have stride 1,
so that padding is 0 and is left out here, and ``SConvTranspose1d``'s trimming becomes a
slice relative to the end. The first convolution's reflect padding branches on the input
length (zeros first when the input is shorter than the padding: 1 to 3 steps at 48 kHz, 1
to 6 at 24 kHz), so it runs outside the graph. ONNX's GroupNorm (InstanceNormalization)
sums its statistics in float32, which cost 48 kHz frames ~20 dB (101 dB SNR against
encodec at 150 steps); the graph takes them in float64 (120 dB). ``torch.export``
(``dynamo=True``) exports this module too, but bakes the LSTM's length in: any other step
count fails in a Reshape.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from encodec.modules.conv import (
    NormConv1d,
    NormConvTranspose1d,
    SConv1d,
    SConvTranspose1d,
)
from encodec.modules.seanet import SEANetResnetBlock
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .codec import ModelUnavailable, TorchCodec
from .container import MODELS
from .onnx_decoder import (
    CANNOT_WRITE_EXIT,
    MODEL_UNAVAILABLE_EXIT,
    OPSET,
    PROBE_STEPS,
    Artifact,
    GraphUnusable,
    file_digest,
)
from .settings import checkpoint_dir, write_atomically

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent exits


class _Conv(nn.Module):
    """encodec's ``SConv1d`` with its padding as constants (stride 1: no extra padding)."""

    def __init__(self, layer: SConv1d, padded_outside: bool = False) -> None:
        super().__init__()
        self.conv = exportable(layer.conv)
        self.padding = (0, 0) if padded_outside else conv_padding(layer)
        self.mode = layer.pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad, then convolve (and normalise) with encodec's layer."""
        if any(self.padding):
            x = F.pad(x, self.padding, self.mode)
        return self.conv(x)


class _ConvTranspose(nn.Module):
    """encodec's ``SConvTranspose1d``, trimming with a slice relative to the end."""

    def __init__(self, layer: SConvTranspose1d) -> None:
        super().__init__()
        self.convtr = exportable(layer.convtr)
        conv = layer.convtr.convtr
        total = conv.kernel_size[0] - conv.stride[0]
        right = math.ceil(total * layer.trim_right_ratio) if layer.causal else total // 2
        self.left, self.right = total - right, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transposed convolution, then drop its fixed padding (as encodec's ``unpad1d``)."""
        y = self.convtr(x)
        return y[..., self.left : y.shape[-1] - self.right]


class _Residual(nn.Module):
    """encodec's ``SEANetResnetBlock`` over exportable layers."""

    def __init__(self, layer: SEANetResnetBlock) -> None:
        super().__init__()
        self.block, self.shortcut = exportable(layer.block), exportable(layer.shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shortcut plus block, in encodec's order."""
        return self.shortcut(x) + self.block(x)


class _GroupNorm(nn.Module):
    """``GroupNorm(1, C)`` (encodec's time_group_norm) with its statistics in float64."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's formula: ``x * scale + bias``, per channel."""
        wide = x.double()
        mean = wide.mean(dim=(1, 2), keepdim=True)
        variance = ((wide - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        rstd = (variance + self.norm.eps).rsqrt().float()
        scale = rstd * self.norm.weight[:, None]
        return x * scale + (self.norm.bias[:, None] - scale * mean.float())


def conv_padding(layer: SConv1d) -> tuple[int, int]:
    """``(left, right)`` padding of a stride-1 ``SConv1d``, as its ``forward`` computes it."""
    conv = layer.conv.conv
    if conv.stride[0] != 1:
        raise GraphUnusable("a strided convolution's padding depends on the length")
    total = (conv.kernel_size[0] - 1) * conv.dilation[0]
    return (total, 0) if layer.causal else (total - total // 2, total // 2)


def exportable(module: nn.Module) -> nn.Module:
    """``module`` with encodec's length-dependent layers replaced by traceable ones.

    The replacements hold encodec's own submodules (and so its weights); other modules are
    returned as they are.
    """
    if isinstance(module, SConv1d):
        return _Conv(module)
    if isinstance(module, SConvTranspose1d):
        return _ConvTranspose(module)
    if isinstance(module, SEANetResnetBlock):
        return _Residual(module)
    if isinstance(module, nn.GroupNorm) and module.num_groups == 1:
        return _GroupNorm(module)
    if isinstance(module, nn.Sequential):
        return nn.Sequential(*map(exportable, module))
    if isinstance(module, NormConv1d):
        return nn.Sequential(module.conv, exportable(module.norm))
    if isinstance(module, NormConvTranspose1d):
        return nn.Sequential(module.convtr, exportable(module.norm))
    return module


def export_graph(decoder: nn.Module) -> bytes:
    """The ONNX graph of encodec's SEANet ``decoder``: padded embedding -> audio.

    Input ``emb``: float32 ``[1, dimension, steps + first conv's padding]``; output
    ``audio``: float32 ``[1, channels, steps * hop]``.
    """
    first, *rest = decoder.model
    graph = nn.Sequential(_Conv(first, padded_outside=True), *map(exportable, rest)).eval()
    left, right = conv_padding(first)
    example = torch.zeros(1, decoder.dimension, PROBE_STEPS + left + right)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Its warnings are not actionable: the TorchScript exporter is deprecated (but
        # torch.export cannot vary the LSTM's length: see the module docstring), tracer and
        # constant-folding notes; the probe checks what came out.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["emb"],
            output_names=["audio"],
            dynamic_axes={"emb": {2: "steps"}, "audio": {2: "samples"}},  # batch: 1
        )
    return buffer.getvalue()


def build_artifact(name: str, checkpoint_sha: str | None) -> Artifact:
    """Export model ``name``'s decoder and check it against encodec's decode of the probe.

    ``checkpoint_sha`` is the hash the caller keyed the graph with (None: the checkpoint
    was missing, and encodec's loader fetched it); a checkpoint that changed since is
    refused, so a graph never carries another checkpoint's name.
    """
    steps = tqdm(total=3, desc=f"building the {name} decoder graph", unit="step", disable=None)
    with steps:
        codec = TorchCodec(MODELS[name], "cpu")
        checkpoint = checkpoint_dir() / codec.checkpoint
        sha = file_digest(checkpoint)
        if checkpoint_sha is not None and sha != checkpoint_sha:
            raise GraphUnusable(f"{checkpoint} changed while its graph was being built")
        steps.update()
        model = codec.model
        layers = model.quantizer.vq.layers
        if not all(isinstance(layer.project_out, nn.Identity) for layer in layers):
            raise GraphUnusable("codebooks with a projection")
        first = model.decoder.model[0]
        n_q, bins = len(layers), layers[0].codebook.shape[0]
        probe_codes = np.random.default_rng(0).integers(0, bins, (n_q, PROBE_STEPS))
        with torch.no_grad():
            probe_audio = model._decode_frame((torch.from_numpy(probe_codes)[None], None))
        artifact = Artifact(
            graph=export_graph(model.decoder),
            codebooks=np.stack([layer.codebook.detach().numpy() for layer in layers]),
            padding=conv_padding(first),
            pad_mode=first.pad_mode,
            probe_codes=probe_codes,
            probe_audio=probe_audio.numpy()[0],
            checkpoint_sha=sha,
        )
        steps.update()
        artifact.check()  # before it is saved: never cache a graph that decodes wrong
        steps.update()
        return artifact


def _die_with_parent() -> None:
    """Exit when the process that asked for the graph exits (Linux), so an unmount never
    leaves an export running."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it exited before prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """``python -m ecdcfs.graph MODEL SHA256 OUT``: write model MODEL's decoder artifact."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m ecdcfs.graph", description=main.__doc__)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("checkpoint_sha", help="its sha256, or - if it was missing")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    try:
        sha = None if args.checkpoint_sha == "-" else args.checkpoint_sha
        artifact = build_artifact(args.model, sha)
    except ModelUnavailable as exc:
        print(exc)  # the parent reads it from stdout (stderr is the user's progress bar)
        return MODEL_UNAVAILABLE_EXIT
    except (GraphUnusable, OSError) as exc:
        print(exc)
        return 1
    try:
        write_atomically(Path(args.out), artifact.save)
    except OSError as exc:  # full, read-only: the parent keeps the graph in memory instead
        print(exc)
        return CANNOT_WRITE_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
