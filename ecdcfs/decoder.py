"""What every frame decoder is: the decoded-frame record, the decoder interface, the error
of a model that cannot be had, and encodec's overlap-add weights (numpy, torch's bit for
bit).

Two decoders implement :class:`FrameDecoder`: :class:`~ecdcfs.onnx_decoder.OnnxDecoder`
(the default, ONNX Runtime, no torch) and :class:`~ecdcfs.torch_decoder.TorchDecoder`
(encodec's own model on torch: ``--exact``, GPUs). No torch is imported here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .container import EcdcError, EncodedFrame, ModelSpec
from .settings import TORCH_EXTRA

LM_NEEDS_TORCH = f"LM-coded files need torch: {TORCH_EXTRA}"


class ModelUnavailable(EcdcError):
    """A model could not be loaded (a checkpoint missing offline or damaged, no torch for
    what needs it, a device that is not there...)."""


@dataclass
class DecodedFrame:
    """One frame's decoder output, before overlap-add: float32 ``[channels, samples]``."""

    audio: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.audio.nbytes


class FrameDecoder(Protocol):
    """Decodes a model's frames."""

    spec: ModelSpec

    @property
    def batch_size(self) -> int:
        """Frames per decode call (:meth:`decode_frames` pads to it on a GPU)."""
        ...

    def decode_frame(self, frame: EncodedFrame) -> DecodedFrame:
        """Decoder output of one frame's codes ``[codebooks, steps]`` (and scale)."""
        ...

    def decode_frames(self, frames: list[EncodedFrame]) -> list[DecodedFrame]:
        """Decoder outputs of frames of equal length, each as :meth:`decode_frame` gives it."""
        ...


def linspace_like_torch(count: int) -> np.ndarray:
    """``torch.linspace(0, 1, count)`` in float32, bit for bit: the first half
    ``step * i``, the second ``1 - step * (count - 1 - i)``, each rounded once from the
    exact product (torch's kernel computes them with a fused multiply-add; numpy's own
    linspace, rounding twice, differs in the last bit of ~10 % of them)."""
    step = np.float64(np.float32(1) / np.float32(count - 1))
    i = np.arange(count)
    half = count // 2
    return np.concatenate([step * i[:half], 1 - step * (count - 1 - i[half:])]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def overlap_add_weights(frame_length: int) -> np.ndarray:
    """encodec's triangular overlap-add weights for ``frame_length`` samples, as its
    ``_linear_overlap_add`` computes them with torch, bit for bit (tested for every frame
    length), so frames blend exactly as encodec blends them."""
    t = linspace_like_torch(frame_length + 2)[1:-1]
    return np.float32(0.5) - np.abs(t - np.float32(0.5))
