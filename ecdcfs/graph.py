"""encodec's decoder as an ONNX graph, written by ecdcfs from a checkpoint's weights.

No torch: the layers are those of encodec's ``SEANetDecoder`` as :class:`ModelSpec` states
its architecture, each written as ONNX operators (``onnx.helper``) over the checkpoint's
arrays, every expected key and shape checked. The graph runs the SEANet decoder from the
embedding to audio; the quantizer's lookup (a sum of codebook rows), the first
convolution's padding (it branches on the length) and the frame's scale stay outside, in
numpy (:mod:`ecdcfs.onnx_decoder`), so one graph serves every code count and every length.

The layers are written for ONNX Runtime's fast kernels, and so that a frame's samples do
not depend on its thread count:

- every convolution is a ``1 x k`` 2-D one on a ``[1, C, 1, T]`` layout (the NCHWc kernels);
- a transposed convolution is a plain convolution per output phase, interleaved: output
  sample ``q * stride + p`` is a convolution of the input with taps ``p, p + stride, ...``
  reversed;
- ELU is ``max(x, exp(min(x, 0)) - 1)`` (``exp(x) - 1 >= x``; ONNX Runtime's Elu is slower
  and its samples change with the thread count);
- GroupNorm's statistics are per-channel float32 sums added up in float64 (float32 sums
  over the whole tensor lose ~20 dB on 48 kHz frames, a float64 pass over every sample
  costs ~30 ms a frame).

Changing what is built: bump :data:`GRAPH_FORMAT`, so cached graphs are rebuilt.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .container import ModelSpec
from .decoder import ModelUnavailable

OPSET = 17
GRAPH_FORMAT = 3  # what build_graph writes: a new format means new cached graph files
_INT64_MAX = np.iinfo(np.int64).max


class GraphUnusable(Exception):
    """A graph that cannot be read, loaded or run."""


@dataclass
class DecoderGraph:
    """What decoding a model without torch needs: its decoder graph (weights inside), its
    codebooks ``[n_q, bins, dimension]`` and the first convolution's padding."""

    graph: bytes
    codebooks: np.ndarray
    padding: tuple[int, int]
    pad_mode: str
    checkpoint_sha: str = ""  # of the checkpoint it was built from, when the store knows it

    def save(self, f: IO[bytes]) -> None:
        """Write it as an ``.npz`` file (every member carries a CRC-32, checked on load)."""
        np.savez(
            f,
            graph=np.frombuffer(self.graph, np.uint8),
            codebooks=self.codebooks,
            padding=np.array(self.padding),
            pad_mode=np.array(self.pad_mode),
            checkpoint_sha=np.array(self.checkpoint_sha),
        )

    @classmethod
    def load(cls, f: IO[bytes] | Path) -> DecoderGraph:
        """Read what :meth:`save` wrote; GraphUnusable for anything else, or a damaged copy
        (zipfile checks each member's CRC-32 as it is read to its end)."""
        try:
            with np.load(f, allow_pickle=False) as data:
                left, right = (int(p) for p in data["padding"])
                return cls(
                    graph=data["graph"].tobytes(),
                    codebooks=data["codebooks"],
                    padding=(left, right),
                    pad_mode=str(data["pad_mode"]),
                    checkpoint_sha=str(data["checkpoint_sha"]),
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise GraphUnusable(f"cannot read it: {exc}") from exc


class _Weights:
    """A checkpoint's arrays, each taken once with its expected shape (ModelUnavailable
    naming the key otherwise)."""

    def __init__(self, name: str, state: Mapping[str, np.ndarray]) -> None:
        self.name = name
        self.state = state
        self.taken: set[str] = set()

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        array = self.state.get(key)
        if array is None:
            raise ModelUnavailable(f"the {self.name} checkpoint has no {key}: not this model's")
        if tuple(array.shape) != shape or array.dtype != np.float32:
            raise ModelUnavailable(
                f"the {self.name} checkpoint's {key} is {array.dtype}{list(array.shape)}, "
                f"not float32{list(shape)}: not this model's"
            )
        self.taken.add(key)
        return array

    def check_all_taken(self, prefix: str) -> None:
        """Refuse a checkpoint with layers under ``prefix`` this architecture does not have."""
        extra = sorted(k for k in self.state if k.startswith(prefix) and k not in self.taken)
        if extra:
            raise ModelUnavailable(
                f"the {self.name} checkpoint has layers this model does not: {', '.join(extra[:3])}"
            )


class _Graph:
    """ONNX nodes and initializers as they are written, one output per node.

    onnx is imported here, only where a graph is built: it takes ~0.8 s, and a process
    that loads cached graphs never needs it."""

    def __init__(self) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.double, self.float = TensorProto.DOUBLE, TensorProto.FLOAT
        self.nodes: list = []  # onnx.NodeProto
        self.initializers: list = []  # onnx.TensorProto

    def constant(self, value: np.ndarray | np.generic | float | list[int], name: str = "") -> str:
        array = np.asarray(value, np.float32 if type(value) is float else None)
        name = name or f"c{len(self.initializers)}"
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, **attributes: Any) -> str:
        output = f"{op_type.lower()}{len(self.nodes)}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [output], **attributes))
        return output


def row_norms(rows: np.ndarray, lanes: int = 8) -> np.ndarray:
    """The L2 norm of each row of float32 ``rows``, its squares summed as torch's AVX2
    kernel sums them (``lanes`` running sums, the tail added into the first lanes, then
    halved pairwise), so weight norm folds here as it does in torch on such CPUs, bit for
    bit. (Summed otherwise, ~40 % of the 24 kHz weights differ in their last bit: ~120 dB.)
    """
    squares = rows * rows
    if squares.shape[1] < lanes:
        sums = squares[:, 0]
        for column in squares.T[1:]:
            sums = sums + column
        return np.sqrt(sums)
    whole = squares.shape[1] - squares.shape[1] % lanes
    sums = squares[:, :lanes].copy()
    for start in range(lanes, whole, lanes):
        sums += squares[:, start : start + lanes]
    tail = squares[:, whole:]
    sums[:, : tail.shape[1]] += tail
    while sums.shape[1] > 1:
        half = sums.shape[1] // 2
        sums = sums[:, :half] + sums[:, half:]
    return np.sqrt(sums[:, 0])


def conv_padding(spec: ModelSpec, kernel: int, dilation: int = 1) -> tuple[int, int]:
    """``(left, right)`` padding of a stride-1 ``SConv1d`` as its ``forward`` computes it
    (its extra padding, for strided convolutions, is 0 at stride 1)."""
    total = (kernel - 1) * dilation
    return (total, 0) if spec.causal else (total - total // 2, total // 2)


class _Decoder:
    """Writes ``SEANetDecoder``'s layers into a :class:`_Graph`, in encodec's order and
    under its state-dict keys (``decoder.model.<i>...``)."""

    def __init__(self, spec: ModelSpec, weights: _Weights, graph: _Graph) -> None:
        self.spec = spec
        self.weights = weights
        self.g = graph

    def conv_weights(self, key: str, shape: tuple[int, int, int]) -> np.ndarray:
        """A (transposed) convolution's weight as its forward uses it: weight norm folded
        (``v * (g / |v|)``, the norm over every axis but the first, as torch computes it)."""
        if self.spec.norm not in ("none", "weight_norm", "time_group_norm"):
            raise ModelUnavailable(f"no decoder graph for the norm {self.spec.norm!r}")
        if self.spec.norm != "weight_norm":
            return self.weights.take(f"{key}.weight", shape)
        v = self.weights.take(f"{key}.weight_v", shape)
        g = self.weights.take(f"{key}.weight_g", (shape[0], 1, 1))
        return v * (g / row_norms(v.reshape(shape[0], -1))[:, None, None])

    def norm(self, x: str, key: str, channels: int) -> str:
        """The norm after a convolution: GroupNorm(1) for ``time_group_norm``, else none."""
        if self.spec.norm != "time_group_norm":
            return x
        weight = self.weights.take(f"{key}.weight", (channels,))
        bias = self.weights.take(f"{key}.bias", (channels,))
        return self.group_norm(x, channels, weight, bias)

    def group_norm(self, x: str, channels: int, weight: np.ndarray, bias: np.ndarray) -> str:
        """``GroupNorm(1, C)`` on ``[1, C, 1, T]``: torch's formula, statistics summed per
        channel in float32 and across channels in float64; ``x * scale + shift``."""
        g = self.g
        time = g.op("Gather", g.op("Shape", x), g.constant(np.int64(3)), axis=0)
        count = g.op("Cast", g.op("Mul", time, g.constant(np.int64(channels))), to=g.double)
        per_channel, across = g.constant([2, 3]), g.constant([1])

        def mean_of(values: str) -> str:
            sums = g.op("Cast", g.op("ReduceSum", values, per_channel, keepdims=1), to=g.double)
            return g.op("Div", g.op("ReduceSum", sums, across, keepdims=1), count)

        mean = g.op("Cast", mean_of(x), to=g.float)
        centred = g.op("Sub", x, mean)
        variance = mean_of(g.op("Mul", centred, centred))
        eps = g.constant(np.float64(1e-5))  # torch.nn.GroupNorm's default, as encodec uses it
        inverse = g.op("Div", g.constant(np.float64(1.0)), g.op("Sqrt", g.op("Add", variance, eps)))
        scale = g.op("Mul", g.op("Cast", inverse, to=g.float), g.constant(weight[:, None, None]))
        shift = g.op("Sub", g.constant(bias[:, None, None]), g.op("Mul", scale, mean))
        return g.op("Add", g.op("Mul", x, scale), shift)

    def elu(self, x: str) -> str:
        """ELU with alpha 1 as ``max(x, exp(min(x, 0)) - 1)``."""
        g = self.g
        negative = g.op("Clip", x, "", g.constant(np.float32(0.0)))
        return g.op("Max", x, g.op("Sub", g.op("Exp", negative), g.constant(np.float32(1.0))))

    def pad(self, x: str, left: int, right: int, mode: str) -> str:
        """Pad the time axis of ``[1, C, 1, T]``."""
        if not left and not right:
            return x
        pads = self.g.constant(np.array([0, 0, 0, left, 0, 0, 0, right], np.int64))
        return self.g.op("Pad", x, pads, mode=mode)

    def conv(
        self, x: str, key: str, sizes: tuple[int, int, int], dilation: int = 1, padded: bool = False
    ) -> str:
        """``SConv1d`` ``key`` with ``(in, out, kernel)`` channels and taps, stride 1."""
        inputs, outputs, kernel = sizes
        weight = self.conv_weights(f"{key}.conv.conv", (outputs, inputs, kernel))
        bias = self.weights.take(f"{key}.conv.conv.bias", (outputs,))
        if not padded:
            x = self.pad(x, *conv_padding(self.spec, kernel, dilation), self.spec.pad_mode)
        g = self.g
        y = g.op(
            "Conv",
            x,
            g.constant(weight[:, :, None, :], f"{key}.weight"),
            g.constant(bias, f"{key}.bias"),
            kernel_shape=[1, kernel],
            dilations=[1, dilation],
        )
        return self.norm(y, f"{key}.conv.norm", outputs)

    def conv_transpose(self, x: str, key: str, sizes: tuple[int, int, int], stride: int) -> str:
        """``SConvTranspose1d`` ``key`` with ``(in, out, kernel)`` channels and taps as one
        convolution per output phase; trimmed like encodec's ``unpad1d`` after the norm."""
        inputs, outputs, kernel = sizes
        if kernel < stride:  # encodec's unpad1d refuses it too
            raise ModelUnavailable(f"{key}: a transposed convolution shorter than its stride")
        weight = self.conv_weights(f"{key}.convtr.convtr", (inputs, outputs, kernel))
        bias = self.weights.take(f"{key}.convtr.convtr.bias", (outputs,))
        taps = -(-kernel // stride)
        overhang = taps * stride - kernel  # samples the phases give past the output's end
        weight = np.pad(weight, ((0, 0), (0, 0), (0, overhang)))
        weight = weight.reshape(inputs, outputs, taps, stride)
        # phase weights [out * stride, in, 1, taps]: tap m reads input step q - (taps - 1 - m)
        phases = np.ascontiguousarray(
            weight[:, :, ::-1].transpose(1, 3, 0, 2).reshape(outputs * stride, inputs, 1, taps)
        )
        g = self.g
        y = g.op(
            "Conv",
            self.pad(x, taps - 1, taps - 1, "constant"),
            g.constant(phases, f"{key}.weight"),
            g.constant(np.repeat(bias, stride), f"{key}.bias"),
            kernel_shape=[1, taps],
        )
        y = g.op("Reshape", y, g.constant(np.array([1, outputs, stride, -1], np.int64)))
        y = g.op("Transpose", y, perm=[0, 1, 3, 2])
        y = g.op("Reshape", y, g.constant(np.array([1, outputs, 1, -1], np.int64)))
        if overhang:
            y = self.slice_time(y, 0, overhang)
        y = self.norm(y, f"{key}.convtr.norm", outputs)
        total = kernel - stride
        causal = math.ceil(total * self.spec.trim_right_ratio)
        right = causal if self.spec.causal else total // 2
        return self.slice_time(y, total - right, right)

    def slice_time(self, x: str, left: int, right: int) -> str:
        """Drop ``left`` and ``right`` samples of the time axis."""
        if not left and not right:
            return x
        g = self.g
        start = g.constant(np.array([left], np.int64))
        stop = g.constant(np.array([-right if right else _INT64_MAX], np.int64))
        return g.op("Slice", x, start, stop, g.constant(np.array([3], np.int64)))

    def lstm(self, x: str, key: str, channels: int) -> str:
        """``SLSTM``: ``lstm_layers`` LSTM layers over time, plus the skip connection.

        ONNX orders an LSTM's gates ``i, o, f, c``, torch ``i, f, g, o``: the weights'
        blocks are reordered."""
        g = self.g
        sequence = g.op("Transpose", g.op("Squeeze", x, g.constant([2])), perm=[2, 0, 1])
        order = [0, 3, 1, 2]  # torch's block of each ONNX gate

        def gates(array: np.ndarray) -> np.ndarray:
            blocks = array.reshape(4, channels, *array.shape[1:])
            return blocks[order].reshape(array.shape)[None]

        y = sequence
        for layer in range(self.spec.lstm_layers):
            name = f"{key}.lstm"
            w = self.weights.take(f"{name}.weight_ih_l{layer}", (4 * channels, channels))
            r = self.weights.take(f"{name}.weight_hh_l{layer}", (4 * channels, channels))
            b_ih = self.weights.take(f"{name}.bias_ih_l{layer}", (4 * channels,))
            b_hh = self.weights.take(f"{name}.bias_hh_l{layer}", (4 * channels,))
            out = g.op(
                "LSTM",
                y,
                g.constant(gates(w), f"{key}.lstm{layer}.W"),
                g.constant(gates(r), f"{key}.lstm{layer}.R"),
                g.constant(
                    np.concatenate([gates(b_ih), gates(b_hh)], axis=1), f"{key}.lstm{layer}.B"
                ),
                hidden_size=channels,
            )
            y = g.op("Squeeze", out, g.constant([1]))  # [T, directions, 1, C] -> [T, 1, C]
        y = g.op("Transpose", g.op("Add", y, sequence), perm=[1, 2, 0])
        return g.op("Unsqueeze", y, g.constant([2]))

    def residual(self, x: str, key: str, channels: int, dilation: int) -> str:
        """``SEANetResnetBlock``: a 1x1 convolution shortcut plus ELU, conv, ELU, conv."""
        spec = self.spec
        hidden = channels // spec.compress
        shortcut = self.conv(x, f"{key}.shortcut", (channels, channels, 1))
        y = self.conv(
            self.elu(x), f"{key}.block.1", (channels, hidden, spec.residual_kernel_size), dilation
        )
        y = self.conv(self.elu(y), f"{key}.block.3", (hidden, channels, 1))
        return self.g.op("Add", shortcut, y)

    def write(self, emb: str) -> str:
        """The layers from the padded embedding ``[1, D, T + padding]`` to the audio."""
        spec = self.spec
        layers = iter(range(10_000))
        key = lambda: f"decoder.model.{next(layers)}"  # noqa: E731 - the layer index, in order
        channels = 2 ** len(spec.ratios) * spec.n_filters
        x = self.g.op("Unsqueeze", emb, self.g.constant([2]))
        x = self.conv(x, key(), (spec.dimension, channels, spec.kernel_size), padded=True)
        if spec.lstm_layers:
            x = self.lstm(x, key(), channels)
        for ratio in spec.ratios:
            next(layers)  # the ELU
            x = self.conv_transpose(self.elu(x), key(), (channels, channels // 2, 2 * ratio), ratio)
            channels //= 2
            for j in range(spec.n_residual_layers):
                x = self.residual(x, key(), channels, spec.dilation_base**j)
        next(layers)
        x = self.conv(self.elu(x), key(), (spec.n_filters, spec.channels, spec.last_kernel_size))
        return self.g.op("Squeeze", x, self.g.constant([2]))


def codebooks(spec: ModelSpec, weights: _Weights) -> np.ndarray:
    """The quantizer's codebooks ``[n_q, bins, dimension]`` (encodec's ``_codebook.embed``)."""
    key = "quantizer.vq.layers.{}._codebook.embed"
    shape = (spec.bins, spec.dimension)
    return np.stack([weights.take(key.format(q), shape) for q in range(spec.max_codebooks)])


def build_graph(spec: ModelSpec, state: Mapping[str, np.ndarray]) -> DecoderGraph:
    """Model ``spec``'s decoder from its checkpoint's arrays ``state``.

    The graph's input ``emb`` is float32 ``[1, dimension, steps + padding]`` (the
    embedding, padded as encodec's first convolution pads it); its output ``audio`` float32
    ``[1, channels, steps * hop]``. ModelUnavailable if the weights are not this model's.
    """
    weights = _Weights(spec.name, state)
    graph = _Graph()
    _Decoder(spec, weights, graph).write("emb")
    weights.check_all_taken("decoder.")
    graph.nodes[-1].output[0] = "audio"
    helper, float32 = graph.helper, graph.float
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            f"{spec.name}_decoder",
            [helper.make_tensor_value_info("emb", float32, [1, spec.dimension, "steps"])],
            [helper.make_tensor_value_info("audio", float32, [1, spec.channels, "samples"])],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ecdcfs",
    )
    model.ir_version = 8  # what ONNX Runtime releases back to 1.14 read
    return DecoderGraph(
        graph=model.SerializeToString(),
        codebooks=codebooks(spec, weights),
        padding=conv_padding(spec, spec.kernel_size),
        pad_mode=spec.pad_mode,
    )
