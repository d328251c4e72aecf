"""The reference for :mod:`ecdcfs.graph`: encodec's decoder exported with torch's
TorchScript exporter, from encodec's own modules rewritten into the same fast layers
(``1 x k`` convolutions, per-phase transposed convolutions, ELU from Exp/Min/Max,
GroupNorm statistics summed in float64). ecdcfs writes its graph from the checkpoint's
weights without torch; the tests hold that graph to this export, bit for bit, and each
layer here to encodec's own layer.

This was ecdcfs's own exporter (run in a child process that imported torch) until the
graph came to be built from the weights.
"""

from __future__ import annotations

import io
import math
import warnings

import torch
from encodec.modules.conv import SConv1d, SConvTranspose1d
from encodec.modules.lstm import SLSTM
from encodec.modules.seanet import SEANetResnetBlock
from torch import nn
from torch.nn import functional as F

from ecdcfs.graph import OPSET, GraphUnusable

TRACED_STEPS = 8  # the length the export is traced at (every length must then work)


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
    example = torch.zeros(1, decoder.dimension, TRACED_STEPS + left + right)
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
