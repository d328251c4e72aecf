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
to 6 at 24 kHz), so it runs outside the graph. ``torch.export`` (``dynamo=True``) exports
this module too, but bakes the LSTM's length in: any other step count fails in a Reshape.

What makes it fast and thread-count-independent (measured on 48 kHz frames, one thread:
130-138 ms a frame before, 93-100 ms after): every convolution is a ``1 x k`` 2-D one, so ONNX
Runtime runs it with its NCHWc kernels, and the transposed convolutions are plain ones per
output phase (:class:`_ConvTranspose`); ELU is built from Exp, Min and Max (ONNX Runtime's
Elu is slower and its samples change with the thread count); GroupNorm's statistics are
per-channel float32 sums added up in float64 (whole-tensor float32 sums cost ~20 dB, a
float64 pass over every sample ~30 ms a frame).

Changing what is exported: bump ``onnx_decoder.GRAPH_FORMAT``, so cached graphs are rebuilt.
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
from encodec.modules.conv import SConv1d, SConvTranspose1d
from encodec.modules.lstm import SLSTM
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


def effective_weight(conv: nn.Module) -> torch.Tensor:
    """A convolution's weight as its forward uses it (weight_norm sets it in a pre-hook)."""
    with torch.no_grad():
        conv(torch.zeros(1, conv.in_channels, conv.kernel_size[0] * conv.dilation[0]))
    return conv.weight.detach().clone()


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """``tensor`` as a parameter without gradient (exported as an initializer)."""
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=False)


class _Conv(nn.Module):
    """encodec's ``SConv1d`` (and its norm) as a ``1 x k`` 2-D convolution; its padding
    as constants (stride 1: no extra padding). Its input must be longer than the reflect
    padding (always, inside the decoder; encodec's zero-padding of shorter inputs is done
    outside, for the first convolution only)."""

    def __init__(self, layer: SConv1d, padded_outside: bool = False) -> None:
        super().__init__()
        conv = layer.conv.conv
        if conv.stride[0] != 1 or conv.groups != 1:
            raise GraphUnusable("a strided or grouped convolution")
        self.weight = frozen(effective_weight(conv)[:, :, None, :])
        self.bias = None if conv.bias is None else frozen(conv.bias)
        self.dilation = conv.dilation[0]
        self.padding = (0, 0) if padded_outside else conv_padding(layer)
        self.mode = layer.pad_mode
        self.norm = exportable(layer.conv.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad, convolve, normalise: ``[1, C, 1, T]`` -> ``[1, C', 1, T']``."""
        if any(self.padding):
            x = F.pad(x, (*self.padding, 0, 0), self.mode)
        return self.norm(F.conv2d(x, self.weight, self.bias, dilation=(1, self.dilation)))


class _ConvTranspose(nn.Module):
    """encodec's ``SConvTranspose1d`` (and its norm) as one 2-D convolution per output phase.

    Output sample ``q * stride + p`` of a transposed convolution is a plain convolution of
    the input with kernel taps ``p, p + stride, ...`` reversed, so ``stride`` phases of
    ``ceil(kernel / stride)`` taps, interleaved, give the same samples; unlike
    ConvTranspose, Conv gets ONNX Runtime's fast NCHWc kernels. The phases produce up to
    ``stride - 1`` samples past the transposed convolution's length: cut before the norm,
    which encodec applies to the untrimmed output; its trimming is a slice from the end.
    """

    def __init__(self, layer: SConvTranspose1d) -> None:
        super().__init__()
        conv = layer.convtr.convtr
        kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        if conv.padding[0] or conv.output_padding[0] or conv.dilation[0] != 1 or conv.groups != 1:
            raise GraphUnusable("a transposed convolution with padding, dilation or groups")
        if kernel < self.stride:  # encodec's unpad1d refuses it too
            raise GraphUnusable("a transposed convolution with a kernel shorter than its stride")
        weight = effective_weight(conv)  # [in, out, kernel]
        self.taps = -(-kernel // self.stride)
        # samples the phases give past the transposed convolution's (T - 1) * stride + kernel
        self.overhang = self.taps * self.stride - kernel
        weight = F.pad(weight, (0, self.overhang))
        weight = weight.reshape(*weight.shape[:2], self.taps, self.stride)
        # phase weights [out * stride, in, 1, taps]: tap m reads input step q - (taps - 1 - m)
        phases = weight.flip(2).permute(1, 3, 0, 2).reshape(-1, weight.shape[0], 1, self.taps)
        self.weight = frozen(phases)
        self.bias = None if conv.bias is None else frozen(conv.bias.repeat_interleave(self.stride))
        self.norm = exportable(layer.convtr.norm)
        total = kernel - self.stride
        right = math.ceil(total * layer.trim_right_ratio) if layer.causal else total // 2
        self.left, self.right = total - right, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, C, 1, T]`` -> ``[1, C', 1, T * stride]``, trimmed like encodec's ``unpad1d``."""
        y = F.conv2d(F.pad(x, (self.taps - 1, self.taps - 1)), self.weight, self.bias)
        batch, channels, _, steps = y.shape
        y = y.reshape(batch, channels // self.stride, self.stride, steps)
        y = y.transpose(2, 3).reshape(batch, channels // self.stride, 1, steps * self.stride)
        if self.overhang:
            y = y[..., : y.shape[-1] - self.overhang]
        y = self.norm(y)
        return y[..., self.left : y.shape[-1] - self.right]


class _Residual(nn.Module):
    """encodec's ``SEANetResnetBlock`` over exportable layers."""

    def __init__(self, layer: SEANetResnetBlock) -> None:
        super().__init__()
        self.block, self.shortcut = exportable(layer.block), exportable(layer.shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shortcut plus block, in encodec's order."""
        return self.shortcut(x) + self.block(x)


class _LSTM(nn.Module):
    """encodec's ``SLSTM`` on the 2-D layout."""

    def __init__(self, layer: SLSTM) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, C, 1, T]`` through encodec's LSTM and skip."""
        return self.layer(x[:, :, 0]).unsqueeze(2)


class _Elu(nn.Module):
    """ELU (alpha 1) as ``max(x, exp(min(x, 0)) - 1)``: ``exp(x) - 1 >= x``, so the max
    picks ``x`` above 0 and ``exp(x) - 1`` below. ONNX Runtime's own Elu is 3x slower and
    its samples depend on the thread count; Exp, Min and Max do not (both measured)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ELU."""
        return torch.maximum(x, torch.exp(torch.clamp(x, max=0.0)) - 1.0)


class _GroupNorm(nn.Module):
    """``GroupNorm(1, C)`` (encodec's time_group_norm): its statistics as per-channel
    float32 sums added up in float64 (whole-tensor float32 sums cost 48 kHz frames ~20 dB,
    and a float64 pass over every sample ~30 ms a frame)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's formula, ``x * scale + bias`` per channel, on ``[1, C, 1, T]``."""
        count = x.shape[1] * x.shape[3]
        mean = x.sum(dim=(2, 3), keepdim=True).double().sum(dim=1, keepdim=True) / count
        centred = x - mean.float()
        squares = (centred * centred).sum(dim=(2, 3), keepdim=True)
        variance = squares.double().sum(dim=1, keepdim=True) / count
        scale = (variance + self.norm.eps).rsqrt().float() * self.norm.weight[:, None, None]
        return x * scale + (self.norm.bias[:, None, None] - scale * mean.float())


def conv_padding(layer: SConv1d) -> tuple[int, int]:
    """``(left, right)`` padding of a stride-1 ``SConv1d``, as its ``forward`` computes it."""
    conv = layer.conv.conv
    if conv.stride[0] != 1:
        raise GraphUnusable("a strided convolution's padding depends on the length")
    total = (conv.kernel_size[0] - 1) * conv.dilation[0]
    return (total, 0) if layer.causal else (total - total // 2, total // 2)


def exportable(module: nn.Module) -> nn.Module:
    """``module`` as traceable layers on the 2-D ``[1, C, 1, T]`` layout.

    The replacements hold encodec's own submodules or weights; a module without one is
    refused rather than exported in a form nobody checked.
    """
    if isinstance(module, SConv1d):
        return _Conv(module)
    if isinstance(module, SConvTranspose1d):
        return _ConvTranspose(module)
    if isinstance(module, SEANetResnetBlock):
        return _Residual(module)
    if isinstance(module, SLSTM):
        return _LSTM(module)
    if isinstance(module, nn.GroupNorm) and module.num_groups == 1 and module.affine:
        return _GroupNorm(module)
    if isinstance(module, nn.ELU):
        if module.alpha != 1.0:
            raise GraphUnusable(f"ELU with alpha {module.alpha}")
        return _Elu()
    if isinstance(module, nn.Sequential):
        return nn.Sequential(*map(exportable, module))
    if isinstance(module, nn.Identity):
        return module
    raise GraphUnusable(f"no exportable form of {type(module).__name__}")


class _Decoder(nn.Module):
    """The decoder on the 2-D layout, from the padded embedding: ``[1, D, T]`` -> audio."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        first, *rest = decoder.model
        self.layers = nn.Sequential(_Conv(first, padded_outside=True), *map(exportable, rest))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Embedding ``[1, D, T + padding]`` -> audio ``[1, channels, T * hop]``."""
        return self.layers(emb.unsqueeze(2))[:, :, 0]


def export_graph(decoder: nn.Module) -> bytes:
    """The ONNX graph of encodec's SEANet ``decoder``: padded embedding -> audio.

    Input ``emb``: float32 ``[1, dimension, steps + first conv's padding]``; output
    ``audio``: float32 ``[1, channels, steps * hop]``.
    """
    graph = _Decoder(decoder).eval()
    left, right = conv_padding(decoder.model[0])
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
