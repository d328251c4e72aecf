"""The expected audio: upstream ``encodec`` decodes (or ``decompress_fixed`` where its
float frame-length formula fails), rounded to PCM as the filesystem must."""

from __future__ import annotations

import hashlib
import io
import math
import struct

import numpy as np
import torch

from synth.container import parse_header, to_v0
from synth.encode import MODEL_LOCK, load_model
from synth.store import checkpoint_dir, disk_get, disk_put, generation_id

_pcm_cache: dict[tuple, np.ndarray] = {}


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """The exact float -> int16 conversion the filesystem must use."""
    x = np.asarray(x, dtype=np.float32)
    return np.rint(np.clip(x, -1.0, 1.0) * np.float32(32767)).astype(np.int16)


def _frame_length_ok_upstream(audio_length: int, model) -> bool:
    """Whether encodec 0.1.1's float frame-length formula is right for every segment."""
    seg_len = model.segment_length or audio_length
    stride = model.segment_stride or audio_length
    hop = model.sample_rate // model.frame_rate
    for offset in range(0, audio_length, stride):
        n = min(audio_length - offset, seg_len)
        upstream = int(math.ceil(n / model.sample_rate * model.frame_rate))
        if upstream != -(-n // hop):
            return False
    return True


@torch.no_grad()
def decompress_fixed(v0: bytes) -> tuple[torch.Tensor, int]:
    """``encodec.compress.decompress_from_file`` with integer frame lengths.

    A faithful copy of upstream's logic (same parsing via encodec's BitUnpacker /
    ArithmeticDecoder, same per-frame decode and blend) except that the number of frames
    of a segment is ``ceil(segment_length / hop)`` computed with integers and the blend's
    output covers every frame (:func:`decode_every_frame`).
    """
    from encodec import binary
    from encodec.compress import MODELS
    from encodec.quantization.ac import ArithmeticDecoder, build_stable_quantized_cdf

    fo = io.BytesIO(v0)
    metadata = binary.read_ecdc_header(fo)
    model_name = metadata["m"]
    audio_length = metadata["al"]
    num_codebooks = metadata["nc"]
    use_lm = metadata["lm"]
    assert isinstance(audio_length, int)
    assert isinstance(num_codebooks, int)
    if model_name not in MODELS:
        raise ValueError(f"The audio was compressed with an unsupported model {model_name}.")
    model = load_model(model_name)
    lm = model.get_lm_model() if use_lm else None
    hop = model.sample_rate // model.frame_rate
    assert hop * model.frame_rate == model.sample_rate

    frames = []
    segment_length = model.segment_length or audio_length
    segment_stride = model.segment_stride or audio_length
    for offset in range(0, audio_length, segment_stride):
        this_segment_length = min(audio_length - offset, segment_length)
        frame_length = -(-this_segment_length // hop)
        if model.normalize:
            (scale_f,) = struct.unpack("!f", binary._read_exactly(fo, struct.calcsize("!f")))
            scale = torch.tensor(scale_f).view(1)
        else:
            scale = None
        if use_lm:
            decoder = ArithmeticDecoder(fo)
            states = None
            lm_offset = 0
            input_ = torch.zeros(1, num_codebooks, 1, dtype=torch.long)
        else:
            unpacker = binary.BitUnpacker(model.bits_per_codebook, fo)
        frame = torch.zeros(1, num_codebooks, frame_length, dtype=torch.long)
        for t in range(frame_length):
            if use_lm:
                probas, states, lm_offset = lm(input_, states, lm_offset)
            code_list = []
            for k in range(num_codebooks):
                if use_lm:
                    q_cdf = build_stable_quantized_cdf(
                        probas[0, :, k, 0], decoder.total_range_bits, check=False
                    )
                    code = decoder.pull(q_cdf)
                else:
                    code = unpacker.pull()
                if code is None:
                    raise EOFError("The stream ended sooner than expected.")
                code_list.append(code)
            frame[0, :, t] = torch.tensor(code_list, dtype=torch.long)
            if use_lm:
                input_ = 1 + frame[:, :, t : t + 1]
        frames.append((frame, scale))
    wav = decode_every_frame(model, frames)
    return wav[0, :, :audio_length], model.sample_rate


def decode_every_frame(model, frames: list) -> torch.Tensor:
    """``model.decode(frames)`` over an output long enough for every frame.

    encodec's ``_linear_overlap_add`` sizes its output from the last frame alone, so it
    crashes when the frame before reaches further (e.g. 47,840 samples: frame 0 decodes
    48,000 samples, the last one ends at 47,840). Zero-padding the last frame to that
    length only adds zeros and weights past the audio's end, which is trimmed: the
    samples before it are encodec's own per-frame decode and blend, float for float.
    """
    from encodec.utils import _linear_overlap_add

    decoded = [model._decode_frame(frame) for frame in frames]
    if model.segment_length is None:
        return decoded[0]
    stride = model.segment_stride
    end = max(i * stride + frame.shape[-1] for i, frame in enumerate(decoded))
    last = decoded[-1]
    missing = end - (len(decoded) - 1) * stride - last.shape[-1]
    if missing > 0:
        decoded[-1] = torch.nn.functional.pad(last, (0, missing))
    return _linear_overlap_add(decoded, stride)


def decodes_upstream(audio_length: int, model) -> bool:
    """Whether encodec 0.1.1's ``decompress`` decodes this length (see the two helpers)."""
    if not _frame_length_ok_upstream(audio_length, model):
        return False
    if model.segment_length is None:
        return True
    hop = model.sample_rate // model.frame_rate
    ends = [
        offset + -(-min(audio_length - offset, model.segment_length) // hop) * hop
        for offset in range(0, audio_length, model.segment_stride)
    ]
    return ends[-1] >= max(ends)


def reference_decode(data: bytes) -> tuple[torch.Tensor, int]:
    """Float reference decode ``([C, T] tensor, sample_rate)`` of a v0 (or v192/193) file:
    upstream ``encodec.compress.decompress`` where it works, else ``decompress_fixed``
    (integer frame lengths, an overlap-add long enough for every frame)."""
    from encodec.compress import decompress

    v0 = to_v0(data)
    _, meta, _ = parse_header(v0)
    model = load_model(meta["m"])
    if decodes_upstream(meta["al"], model):
        return decompress(v0)
    return decompress_fixed(v0)


def reference_pcm(data: bytes) -> np.ndarray:
    """Exact expected PCM (int16 ``[samples, channels]``) of an .ecdc file.

    Accepts v0 bytes (v192/193 are converted back to v0 first; the audio is the same).
    Cached per input (in memory, and on disk next to cached checkpoints).
    """
    v0 = to_v0(data)
    digest = hashlib.sha256(v0).hexdigest()[:32]
    gid = generation_id()
    mem_key = (gid or checkpoint_dir().as_posix(), digest)
    with MODEL_LOCK:
        if mem_key in _pcm_cache:
            return _pcm_cache[mem_key].copy()
        disk_name = f"pcm-{digest}-t{torch.get_num_threads()}.npy"
        raw = disk_get(disk_name)
        if raw is not None:
            pcm = np.load(io.BytesIO(raw))
        else:
            wav, _ = reference_decode(v0)
            x = wav.detach().cpu().numpy().astype(np.float32, copy=False)
            pcm = np.ascontiguousarray(float_to_pcm16(x).T)
            buf = io.BytesIO()
            np.save(buf, pcm)
            disk_put(disk_name, buf.getvalue())
        _pcm_cache[mem_key] = pcm
        return pcm.copy()
