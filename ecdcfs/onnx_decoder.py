"""The default frame decoder: encodec's decoder on ONNX Runtime, without torch.

The graph (:mod:`ecdcfs.graph`, from the store :mod:`ecdcfs.graph_store`) runs the SEANet
decoder; the codebook lookup, the first convolution's padding and the frame's scale are
done here in numpy, in encodec's order, so one graph serves every code count and length.

A frame's samples do not depend on ONNX Runtime's thread count (tested with 1 to 4), so
the same offset gives the same bytes on every mount of a machine (another CPU may get
other kernels from ONNX Runtime, within the same 2 LSB of encodec). Each decode runs on
one thread all the same: two one-thread decodes at once do more work than one two-thread
decode, so parallelism comes from the scheduler running several decodes at once on the
one session.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

from .container import EncodedFrame, ModelSpec
from .decoder import DecodedFrame
from .graph import DecoderGraph, GraphUnusable
from .interrupts import Interrupts

THREADS = 1  # ONNX Runtime threads per decode (the scheduler runs decodes side by side)


def new_session(graph: bytes, threads: int = THREADS) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``graph`` on ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Measured: two 48 kHz frames decoding at once peak at ~275 MiB of RSS without the
    # memory pattern planner and ~300 MiB with it, at the same speed.
    options.enable_mem_pattern = False
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


def pad_steps(emb: np.ndarray, padding: tuple[int, int], mode: str) -> np.ndarray:
    """encodec's ``pad1d`` of ``emb`` ``[dim, steps]`` along steps (``reflect`` or zeros).

    A reflect pad longer than the input first extends it with zeros, as encodec does.
    """
    left, right = padding
    if mode != "reflect":
        return np.pad(emb, ((0, 0), (left, right)))
    extra = max(0, max(left, right) - emb.shape[-1] + 1)
    padded = np.pad(np.pad(emb, ((0, 0), (0, extra))), ((0, 0), (left, right)), mode="reflect")
    return padded[:, : padded.shape[-1] - extra]


def embedding(codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The quantizer's decode of ``codes`` ``[codebooks, steps]``: float32 ``[dim, steps]``.

    The codebook rows are summed in encodec's order, so this is its embedding exactly.
    """
    emb = codebooks[0][codes[0]]
    for codebook, row in zip(codebooks[1:], codes[1:], strict=False):
        emb = emb + codebook[row]
    return emb.T


class OnnxDecoder:
    """Decodes frames like encodec's ``_decode_frame`` (within 2 LSB), on ONNX Runtime.

    Several threads may decode at once, each on one ONNX Runtime thread; a decode can be
    stopped from another thread through ``interrupts``. GraphUnusable if ONNX Runtime
    cannot load or run the graph.
    """

    batch_size = 1  # each frame on its own run: its samples never depend on the others

    def __init__(
        self, spec: ModelSpec, graph: DecoderGraph, interrupts: Interrupts, threads: int = THREADS
    ) -> None:
        self.spec = spec
        self.session = new_session(graph.graph, threads)
        self.codebooks = graph.codebooks
        self.padding = graph.padding
        self.pad_mode = graph.pad_mode
        self.interrupts = interrupts
        try:  # one code step: a graph that loads but cannot run fails here, not at a read
            audio = self.decode_codes(np.zeros((1, 1), np.int64))
        except Exception as exc:  # onnxruntime's exception types
            raise GraphUnusable(f"it does not run: {exc}") from exc
        if audio.shape != (spec.channels, spec.hop):
            raise GraphUnusable(f"it decodes {audio.shape}, not {(spec.channels, spec.hop)}")

    def decode_codes(self, codes: np.ndarray, run: ort.RunOptions | None = None) -> np.ndarray:
        """Decoder output ``[channels, samples]`` of one frame's codes, before its scale."""
        emb = pad_steps(embedding(self.codebooks, codes), self.padding, self.pad_mode)
        return self.session.run(None, {"emb": np.ascontiguousarray(emb)[None]}, run)[0][0]

    def decode_frame(self, frame: EncodedFrame) -> DecodedFrame:
        """Decode one frame's codes ``[codebooks, steps]`` (and scale)."""
        run = ort.RunOptions()
        with self.interrupts.stoppable(lambda: setattr(run, "terminate", True)):
            audio = self.decode_codes(frame.codes, run)
        if frame.scale is not None:
            audio = audio * np.float32(frame.scale)
        return DecodedFrame(audio)

    def decode_frames(self, frames: list[EncodedFrame]) -> list[DecodedFrame]:
        """Decode frames one by one (see ``batch_size``)."""
        return [self.decode_frame(frame) for frame in frames]
