"""encodec's own model on torch: the bit-exact frame decoder (``--exact``) and the GPU one.

torch and encodec are imported only when a :class:`TorchDecoder` is made (they come with
the ``ecdcfs[torch]`` extra): a daemon serving plain files on ONNX Runtime never imports
them.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from .checkpoint import CHECKPOINTS, fetch
from .container import EncodedFrame, ModelSpec
from .decoder import DecodedFrame, ModelUnavailable
from .settings import TORCH_EXTRA, torch_installed

log = logging.getLogger(__name__)

# Frames per GPU decode call (48 kHz read-ahead); every GPU call uses this size.
GPU_BATCH = 8

NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def default_device() -> str:
    """``cuda`` when torch can use an NVIDIA GPU, else ``cpu``; torch is only imported (to
    ask) where it is installed and an NVIDIA driver is loaded."""
    if not NVIDIA_DRIVER.exists() or not torch_installed():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def require_torch(what: str) -> None:
    """ModelUnavailable saying plainly that ``what`` needs the torch extra."""
    if not torch_installed():
        raise ModelUnavailable(f"{what} needs torch: {TORCH_EXTRA}")


def encodec_model(spec: ModelSpec, pretrained: bool = True):  # -> encodec.EncodecModel
    """encodec's own model for ``spec``, its checkpoint fetched first (ModelUnavailable
    with one line if it cannot be); random weights when not ``pretrained``."""
    from encodec import EncodecModel

    constructor = {
        "encodec_48khz": EncodecModel.encodec_model_48khz,
        "encodec_24khz": EncodecModel.encodec_model_24khz,
    }[spec.name]
    path = fetch(CHECKPOINTS[spec.name], spec.name) if pretrained else None
    with warnings.catch_warnings():  # encodec's weight_norm deprecation: not actionable
        warnings.filterwarnings("ignore", ".*weight_norm", FutureWarning)
        try:
            return constructor(pretrained=pretrained)
        except Exception as exc:  # torch.load's errors for a damaged file
            if path is None:
                raise
            reason = " ".join(str(exc).split())  # one line, as every model error
            raise ModelUnavailable(
                f"cannot load {spec.name} from {path}: {reason} (a partial or damaged copy?)"
            ) from exc


def warm_vector_math() -> None:
    """Run one vectorised float pow, so that torch's ELU runs at full speed.

    Measured (torch 2.14.1, a 2-core AVX-512 VM): until a process has run a vectorised
    pow, torch's vectorised ELU (Sleef's expm1, like pow picked at run time) takes ~6x as
    long; after it, the same samples bit for bit (tested). 64 floats: fewer would run on
    the scalar path.
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


class TorchDecoder:
    """One Encodec model on one device, decoding exactly as encodec does. Frame decodes are
    serialised here (torch's own threads make one decode parallel)."""

    def __init__(self, spec: ModelSpec, device: str) -> None:
        require_torch("--exact" if device == "cpu" else f"decoding on {device}")
        self.spec = spec
        self.device = device
        if device.startswith("cuda"):
            _deterministic_cuda()
        else:
            warm_vector_math()
        model = encodec_model(spec)
        try:
            self.model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise ModelUnavailable(f"cannot use device {device!r}: {exc}") from exc
        self._decode_lock = threading.Lock()
        log.info("loaded %s on %s (torch)", spec.name, device)

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
