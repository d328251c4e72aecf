"""Encodec's decoder on ONNX Runtime (``--backend onnx``): one graph per checkpoint, any length.

The graph is exported from the user's own checkpoint, once, with torch's TorchScript-based
exporter, and kept in ``<cache dir>/graphs/`` under the checkpoint's content hash and the
onnxruntime version. It is the SEANet decoder from embedding to audio, built from
encodec's own layers and weights (:func:`exportable`); the quantizer's lookup (a sum of
codebook rows, in numpy), the first convolution's padding and the frame's scale stay
outside, so one graph serves every code count and every length.

What the export must avoid (each measured): encodec's ``SConv1d`` computes its extra
padding with ``math.ceil`` of the traced length, so a graph traced at 150 steps pads every
other length to 150 steps' worth and fails; the decoder's convolutions all have stride 1,
so that padding is 0 and is left out here, and ``SConvTranspose1d``'s trimming becomes a
slice relative to the end. The first convolution's reflect padding branches on the input
length (zeros first when the input is shorter than the padding: 1 to 3 steps at 48 kHz, 1
to 6 at 24 kHz), so it runs outside the graph with encodec's own ``pad1d``. ONNX's
GroupNorm (InstanceNormalization) sums its statistics in float32, which cost 48 kHz frames
~20 dB (101 dB SNR against encodec at 150 steps); the graph takes them in float64 (120 dB).
``torch.export`` (``dynamo=True``) exports this module too, but bakes the LSTM's length in:
any other step count fails in a Reshape.

Every graph is checked before use against encodec's own decode of a fixed probe: a cached
file that is truncated, corrupt or from something else is rebuilt (one warning), and a
cache dir that cannot be written leaves the graph in memory (one warning).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from encodec.modules.conv import (
    NormConv1d,
    NormConvTranspose1d,
    SConv1d,
    SConvTranspose1d,
    pad1d,
)
from encodec.modules.seanet import SEANetResnetBlock
from torch import nn
from torch.nn import functional as F

from .codec import DecodedFrame
from .container import EncodedFrame
from .settings import write_atomically

log = logging.getLogger(__name__)

# ONNX Runtime threads per decode, fixed because a frame's samples depend on it (measured:
# with 2 to 4 threads some frames' samples change, e.g. a 3-step 48 kHz frame with 2). One
# thread also beat two on a busy 2-core machine, and never competes with the LM or readers.
THREADS = 1
OPSET = 17
PROBE_STEPS = 8  # code steps of the probe every graph must decode like encodec
MIN_SNR_DB = 95.0  # the probe's least signal-to-error ratio against encodec's decode


class GraphUnusable(Exception):
    """A graph that does not load, or does not decode like encodec."""


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


def file_digest(path: Path) -> str:
    """The sha256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_path(cache_dir: Path, name: str, checkpoint: Path) -> Path:
    """Where the graph of model ``name`` from ``checkpoint`` is cached."""
    digest = file_digest(checkpoint)[:16]
    return cache_dir / "graphs" / f"{name}-{digest}-ort{ort.__version__}.onnx"


def new_session(graph: bytes) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``graph``, with fixed threads and optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: they come back as exceptions anyway
    try:
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types, for any unloadable graph
        raise GraphUnusable(f"onnxruntime cannot load it: {exc}") from exc


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-error ratio of ``other`` against ``reference``, in dB."""
    error = float(np.sum((other.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if error == 0 else 10 * math.log10(signal / error)


class OnnxDecoder:
    """Decodes Encodec frames like ``Codec.decode_frames``, with the decoder on ONNX Runtime.

    ``model`` is the loaded ``EncodecModel`` ``name`` (on the CPU); ``checkpoint`` its file,
    whose hash keys the cached graph in ``cache_dir`` (None: export, keep in memory).
    """

    def __init__(self, model: Any, name: str, checkpoint: Path, cache_dir: Path | None) -> None:
        self.model, self.name = model, name
        layers = model.quantizer.vq.layers
        if not all(isinstance(layer.project_out, nn.Identity) for layer in layers):
            raise GraphUnusable("codebooks with a projection")
        self.codebooks = [layer.codebook.detach().cpu().numpy() for layer in layers]
        first = model.decoder.model[0]
        self._first_padding, self._pad_mode = conv_padding(first), first.pad_mode
        self.path = None if cache_dir is None else graph_path(cache_dir, name, checkpoint)
        self.session = self._cached_session() or self._built_session()

    def _cached_session(self) -> ort.InferenceSession | None:
        """The session of the cached graph; None if there is none or it is unusable."""
        if self.path is None or not self.path.exists():
            return None
        try:
            session = new_session(self.path.read_bytes())
            self._check(session)
        except (OSError, GraphUnusable) as exc:
            log.warning("cached decoder graph %s is unusable (%s): rebuilding it", self.path, exc)
            return None
        log.info("loaded the ONNX decoder graph %s", self.path)
        return session

    def _built_session(self) -> ort.InferenceSession:
        """Export the graph, check it, and save it in the cache dir if it can be written."""
        log.info(
            "building the ONNX decoder graph of %s (once per checkpoint, a few seconds)",
            self.name,
        )
        graph = export_graph(self.model.decoder)
        session = new_session(graph)
        self._check(session)
        if self.path is None:
            log.info("no cache dir: the ONNX decoder graph of %s stays in memory", self.name)
        else:
            try:
                save_atomically(self.path, graph)
            except OSError as exc:
                log.warning(
                    "cannot save the ONNX decoder graph in %s (%s): keeping it in memory",
                    self.path.parent,
                    exc,
                )
            else:
                log.info("saved the ONNX decoder graph %s", self.path)
        return session

    def _check(self, session: ort.InferenceSession) -> None:
        """Raise GraphUnusable unless ``session`` decodes the probe like encodec does."""
        n_q, bins = len(self.codebooks), self.codebooks[0].shape[0]
        codes = np.random.default_rng(0).integers(0, bins, (1, n_q, PROBE_STEPS))
        with torch.no_grad():
            expected = self.model._decode_frame((torch.from_numpy(codes), None)).numpy()[0]
        try:
            actual = self._decode(session, codes[0])
        except Exception as exc:  # onnxruntime's exception types: a graph that cannot run
            raise GraphUnusable(f"it does not run: {exc}") from exc
        if actual.shape != expected.shape:
            raise GraphUnusable(f"it decodes {actual.shape}, not {expected.shape}")
        snr = snr_db(expected, actual)
        if not snr >= MIN_SNR_DB:  # NaN fails too
            raise GraphUnusable(f"it decodes at {snr:.1f} dB from encodec, under {MIN_SNR_DB}")

    def embedding(self, codes: np.ndarray) -> np.ndarray:
        """The quantizer's decode of ``codes`` ``[codebooks, steps]``: float32 ``[dim, steps]``.

        The codebook rows are summed in encodec's order, so this is its embedding exactly.
        """
        emb = self.codebooks[0][codes[0]]
        for codebook, row in zip(self.codebooks[1:], codes[1:], strict=False):
            emb = emb + codebook[row]
        return emb.T

    def _decode(self, session: ort.InferenceSession, codes: np.ndarray) -> np.ndarray:
        """Decoder output ``[channels, samples]`` of one frame's codes, before its scale."""
        emb = torch.from_numpy(np.ascontiguousarray(self.embedding(codes))[None])
        padded = pad1d(emb, self._first_padding, mode=self._pad_mode).numpy()
        return session.run(None, {"emb": padded})[0][0]

    def decode_frames(self, frames: list[EncodedFrame]) -> list[DecodedFrame]:
        """Decode frames (codes ``[codebooks, steps]``, scale), each on its own run, so a
        frame's samples never depend on the frames decoded with it."""
        decoded = []
        for frame in frames:
            audio = self._decode(self.session, frame.codes)
            if frame.scale is not None:
                audio = audio * np.float32(frame.scale)
            decoded.append(DecodedFrame(audio))
        return decoded


def save_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename; drop ``path``'s stale
    siblings (the same model from another checkpoint or onnxruntime)."""
    write_atomically(path, lambda f: f.write(data))
    model = path.name.split("-", 1)[0]
    for stale in path.parent.glob(f"{model}-*.onnx"):
        if stale != path:
            try:
                stale.unlink()
            except OSError as exc:
                log.warning("cannot delete the stale decoder graph %s: %s", stale, exc)
