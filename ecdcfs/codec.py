"""Encodec's own models on torch: the exact frame decoder (``--exact``, and the GPU), the
language model of LM-coded files, loading through the standard torch.hub path.

torch and encodec are imported lazily, so that listing a folder never pays for them, a
daemon imports them only after it has forked, and one serving plain files with cached
graphs (:mod:`ecdcfs.onnx_decoder`, the default decoder) never imports them.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from .container import SCALE, ContainerError, EcdcError, EncodedFrame, ModelSpec
from .settings import checkpoint_dir

log = logging.getLogger(__name__)

CHECKPOINTS = {
    "encodec_48khz": "encodec_48khz-7e698e3e.th",
    "encodec_24khz": "encodec_24khz-d7cc33bc.th",
}
LM_CHECKPOINTS = {
    "encodec_48khz": "encodec_lm_48khz-7add9fc3.th",
    "encodec_24khz": "encodec_lm_24khz-1608e3c0.th",
}


# Frames per GPU decode call (48 kHz read-ahead); every GPU call uses this size.
GPU_BATCH = 8


class ModelUnavailable(EcdcError):
    """A model could not be loaded (missing checkpoint offline, bad device...)."""


NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def default_device() -> str:
    """``cuda`` when torch can use an NVIDIA GPU, else ``cpu``; torch is only imported (to
    ask) where an NVIDIA driver is loaded."""
    if not NVIDIA_DRIVER.exists():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_url(file_name: str) -> str:
    """Where encodec downloads the checkpoint ``file_name`` from."""
    from encodec.model import ROOT_URL

    return ROOT_URL + file_name


def _load(what: str, file_name: str, loader: Any) -> Any:
    """Run an encodec loader, turning a failed download into one clear error."""
    try:
        with warnings.catch_warnings():  # encodec's weight_norm deprecation: not actionable
            warnings.filterwarnings("ignore", ".*weight_norm", FutureWarning)
            return loader()
    except Exception as exc:  # urllib, OSError, RuntimeError from torch.load...
        path, url = checkpoint_dir() / file_name, checkpoint_url(file_name)
        if path.exists():
            raise ModelUnavailable(
                f"cannot load {what} from {path}: {exc} (a partial or damaged copy? "
                f"it comes from {url})"
            ) from exc
        raise ModelUnavailable(
            f"{what} checkpoint {file_name} is missing and could not be downloaded from "
            f"{url} ({exc}); put it in {path.parent}/ (or set TORCH_HOME)"
        ) from exc


def warm_vector_math() -> None:
    """Run one vectorised float pow, so that torch's ELU runs at full speed.

    Measured (torch 2.14.1, this 2-core AVX-512 VM): until a process has run a vectorised
    pow, torch's vectorised ELU (Sleef's expm1, like pow picked at run time) takes ~6x as
    long, ~40 ms of a 48 kHz frame's ~140; after it, the frame takes ~100 ms, with the
    same samples bit for bit (tested). 64 floats: fewer would run on the scalar path.
    """
    import torch

    torch.arange(64.0) ** 2.5


def _deterministic_cuda() -> None:
    """Make GPU decodes repeatable: the same frame gives the same samples in any batch.

    Measured on an H200: with torch's defaults (TF32, heuristic cuDNN algorithms) a frame's
    samples changed with the batch it was decoded in, and differed from the CPU decode at
    ~60 dB SNR; with these settings they never change, at ~92 dB from the CPU decode.
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class DecodedFrame:
    """One frame's decoder output, before overlap-add: float32 ``[channels, samples]``."""

    audio: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.audio.nbytes


class FrameDecoder(Protocol):
    """Decodes a model's frames: encodec's own (:class:`TorchCodec`) or ONNX Runtime's."""

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

    def overlap_add_weights(self, frame_length: int) -> np.ndarray:
        """encodec's overlap-add weights for frames of ``frame_length`` samples."""
        ...


class TorchCodec:
    """One Encodec model on one device, decoding exactly as encodec does. Frame decodes are
    serialised by the caller (torch's own threads make one decode parallel)."""

    def __init__(self, spec: ModelSpec, device: str) -> None:
        from encodec import EncodecModel

        constructor = {
            "encodec_48khz": EncodecModel.encodec_model_48khz,
            "encodec_24khz": EncodecModel.encodec_model_24khz,
        }[spec.name]
        self.spec = spec
        self.device = device
        self.checkpoint = CHECKPOINTS[spec.name]
        if device.startswith("cuda"):
            _deterministic_cuda()
        else:
            warm_vector_math()
        model = _load(spec.name, self.checkpoint, constructor)
        try:
            self.model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise ModelUnavailable(f"cannot use device {device!r}: {exc}") from exc
        self._check_spec()
        self._lm: Any = None
        self._lm_lock = threading.Lock()
        self._decode_lock = threading.Lock()  # one decode at a time, on torch's own threads
        log.info("loaded %s on %s (torch)", spec.name, device)

    def _check_spec(self) -> None:
        spec, model = self.spec, self.model
        actual = (
            model.sample_rate,
            model.channels,
            model.segment_length,
            model.segment_stride,
            model.bits_per_codebook,
            model.quantizer.n_q,
            model.normalize,
        )
        expected = (
            spec.sample_rate,
            spec.channels,
            spec.segment,
            spec.stride,
            spec.bits,
            spec.max_codebooks,
            spec.normalize,
        )
        if actual != expected:
            raise ModelUnavailable(f"{spec.name} does not match its spec: {actual} != {expected}")

    @property
    def batch_size(self) -> int:
        """Frames decoded per call: a fixed batch on a GPU, one at a time on the CPU."""
        return GPU_BATCH if self.device.startswith("cuda") and self.spec.segment else 1

    def decode_frame(self, frame: EncodedFrame) -> DecodedFrame:
        """Decode one frame's codes ``[codebooks, steps]`` exactly as encodec does."""
        return self.decode_frames([frame])[0]

    def decode_frames(self, frames: list[EncodedFrame]) -> list[DecodedFrame]:
        """Decode frames of equal length (codes ``[codebooks, steps]``, scale) together.

        On a GPU every call is padded to the same batch size, so a frame's samples never
        depend on which frames shared its call; on the CPU frames decode one at a time.
        """
        import torch

        if self.batch_size == 1 and len(frames) > 1:
            return [decoded for frame in frames for decoded in self.decode_frames([frame])]
        codes = np.stack([frame.codes for frame in frames])
        scales = [frame.scale for frame in frames]
        padding = self.batch_size - len(frames)
        if padding > 0:
            codes = np.concatenate([codes, np.zeros((padding, *codes.shape[1:]), codes.dtype)])
            scales += [scales[0]] * padding
        with torch.no_grad(), self._decode_lock:
            code_tensor = torch.from_numpy(codes).to(self.device)
            scale_tensor = (
                None if scales[0] is None else torch.tensor(scales, device=self.device).view(-1)
            )
            out = self.model._decode_frame((code_tensor, scale_tensor)).float().cpu().numpy()
        return [DecodedFrame(out[i]) for i in range(len(frames))]

    @property
    def lm(self) -> Any:
        """Encodec's language model for entropy-coded files (CPU: it is small and sequential)."""
        with self._lm_lock:
            if self._lm is None:
                import torch

                with torch.random.fork_rng(devices=[]):  # get_lm_model reseeds the global RNG
                    lm = _load(
                        f"{self.spec.name} LM",
                        LM_CHECKPOINTS[self.spec.name],
                        self.model.get_lm_model,
                    )
                self._lm = lm.cpu()
            return self._lm

    @staticmethod
    def overlap_add_weights(frame_length: int) -> np.ndarray:
        """encodec's own weights (torch's linspace), so that blending is bit-exact."""
        return overlap_add_weights(frame_length)


@functools.lru_cache(maxsize=8)
def overlap_add_weights(frame_length: int) -> np.ndarray:
    """encodec's triangular overlap-add weights for frames of ``frame_length`` samples."""
    import torch

    t = torch.linspace(0, 1, frame_length + 2, dtype=torch.float32)[1:-1]
    return (0.5 - (t - 0.5).abs()).numpy()


def read_scale(stream: BinaryIO) -> float:
    """The float32 scale that starts each frame of a normalizing (48 kHz) model."""
    raw = stream.read(SCALE.size)
    if len(raw) < SCALE.size:
        raise ContainerError("payload truncated before a frame scale")
    return SCALE.unpack(raw)[0]


def decode_lm_steps(
    lm: Any, stream: BinaryIO, num_codebooks: int, steps: int, block_steps: int
) -> Iterator[np.ndarray]:
    """Entropy-decode the ``steps`` code steps of one LM-coded frame from ``stream``.

    Yields the codes ``[codebooks, block_steps]`` of each block of steps in order (the last
    block may be shorter), so a long frame is usable before it is decoded to the end; the
    arithmetic decoder and the LM state carry over from block to block and start fresh
    for every frame, as encodec writes them. ``stream`` is left at the next frame.
    """
    import torch
    from encodec.quantization.ac import ArithmeticDecoder

    decoder = ArithmeticDecoder(stream)
    states: Any = None
    lm_offset = 0
    previous = torch.zeros(1, num_codebooks, 1, dtype=torch.long)
    for block_start in range(0, steps, block_steps):
        codes = np.zeros((num_codebooks, min(block_steps, steps - block_start)), dtype=np.int64)
        # Not across the yield: the mode is the thread's. Same kernels as no_grad, less
        # bookkeeping per op (3-10 % of the LM's time here).
        with torch.inference_mode():
            for t in range(codes.shape[1]):
                probas, states, lm_offset = lm(previous, states, lm_offset)
                cdfs = stable_quantized_cdfs(probas, decoder.total_range_bits)
                for k in range(num_codebooks):
                    codes[k, t] = pull_symbol(decoder, cdfs[k])
                previous = 1 + torch.from_numpy(codes[:, t : t + 1])[None]
        yield codes


# encodec's build_stable_quantized_cdf defaults, which its compress uses.
ROUNDOFF = 1e-8
MIN_RANGE = 2


def stable_quantized_cdfs(probas: Any, total_range_bits: int) -> np.ndarray:
    """encodec's ``build_stable_quantized_cdf`` of every codebook of one LM step at once.

    ``probas`` is the LM's output ``[1, card, codebooks, 1]``; returns int64
    ``[codebooks, card]``. The same float32 element-wise operations on the same scalars,
    then an integer cumsum, so every value is encodec's bit for bit (test_lm_decode checks
    this on real LM outputs); a quarter of the cost of one call per codebook at 16 or more.
    """
    pdf = probas[0, :, :, 0].T
    pdf = (pdf / ROUNDOFF).floor() * ROUNDOFF
    total_range = 2**total_range_bits
    alpha = MIN_RANGE * pdf.shape[-1] / total_range
    ranges = (((1 - alpha) * total_range) * pdf).floor().long() + MIN_RANGE
    return ranges.cumsum(dim=-1).numpy()


def pull_symbol(decoder: Any, cdf: np.ndarray) -> int:
    """``decoder.pull(cdf)`` for encodec's ``ArithmeticDecoder``, with one searchsorted for
    its recursive bisection (2-3x faster); raises :class:`ContainerError` where it fails.

    Symbol ``s`` owns ``[ceil(cdf[s-1] * r), floor((cdf[s] - 1) * r)]`` above ``low``, with
    ``r = delta / 2**bits``. encodec computes these bounds in doubles, exactly (24 bits:
    ``cdf <= 2**24`` and ``delta < 2**25``, products under 2**53), so integers give the
    same bounds. They are ordered and disjoint, so the first symbol whose range ends at or
    after the code is the one bisection finds; a code below that range's start lies between
    two ranges, in no symbol's (encodec's "Binary search failed").
    """
    bits = decoder.total_range_bits
    while decoder.delta < 1 << bits:  # widen the range bit by bit, as encodec's pull does
        bit = decoder.unpacker.pull()
        if bit is None:
            raise ContainerError("payload truncated inside an LM-coded frame")
        decoder.low *= 2
        decoder.high = decoder.high * 2 + 1
        decoder.current = decoder.current * 2 + bit
        decoder.max_bit += 1
    delta, code = decoder.delta, decoder.current - decoder.low
    # floor((cdf[s] - 1) * r) >= code  <=>  cdf[s] >= ceil(code * 2**bits / delta) + 1
    symbol = int(np.searchsorted(cdf, -(-(code << bits) // delta) + 1))
    start = -((-int(cdf[symbol - 1]) * delta) >> bits) if symbol else 0  # ceil
    if symbol == len(cdf) or start > code:
        raise ContainerError("corrupt LM payload: the code is in no symbol's range")
    end = ((int(cdf[symbol]) - 1) * delta) >> bits
    decoder.low, decoder.high = decoder.low + start, decoder.low + end
    decoder._flush_common_prefix()
    return symbol
