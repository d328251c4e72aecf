"""Synthetic Encodec checkpoints and .ecdc test files.

The pretrained Encodec checkpoints cannot be downloaded in the test environment, so
we build seeded random-init models with exactly the upstream architecture and save
them under the file names encodec looks for in ``$TORCH_HOME/hub/checkpoints``.
``torch.hub.load_state_dict_from_url`` uses a present file without downloading it (the
hash in the file name is only checked on download), so the unmodified upstream code
(``EncodecModel.encodec_model_48khz()``, ``get_lm_model()``, ``encodec.compress``)
then runs against our random models.

A naive random init is useless for codec tests: the quantizer codebooks start at zero
(they are k-means initialised during training) so every frame would get code 0, and the
24 kHz model (weight norm, no activation normalisation) squashes its signal to an
almost time-invariant embedding and near-silent output. So, deterministically (seeded):

* the weight-norm convolutions of the 24 kHz encoder/decoder get a data-dependent
  rescale (LSUV style) so activations stay around unit variance;
* every codebook of the residual quantizer is initialised from encoder embeddings
  of synthetic audio (samples of the residual at that stage, jittered), then marked
  ``inited``, so the codes of real inputs vary in every codebook;
* the 24 kHz decoder output is scaled to roughly the input loudness (the 48 kHz
  decoder ends with a GroupNorm and is rescaled by the input RMS already);
* the LMs are ``LMModel`` instances built exactly like ``get_lm_model`` does, with
  output projections scaled up 3x so the arithmetic coder sees non-uniform
  distributions.

Generation takes a few seconds and is bitwise reproducible for a given torch version
and thread count (a different thread count gives slightly different codebooks, which
is harmless: everything in a session uses the same files). Everything here runs on
the CPU and leaves torch's thread settings alone.

The container code here (``parse_header``, ``to_v193``, ``to_v0``, ``container_24khz``,
``random_packed_24khz``), the PCM conversion (``float_to_pcm16``) and the reference
decodes (upstream ``encodec.compress`` or ``decompress_fixed``) deliberately import
nothing from ecdcfs: they are an independent oracle, written from the format, that the
filesystem's own ``ecdcfs.container`` and decoders are checked against. Do not replace
them with calls into ecdcfs.

Use (tests need the ``torch_home`` fixture from conftest.py)::

    import synth

    def test_something(torch_home):
        v0 = synth.make_ecdc("encodec_48khz", 5 * 48_000, kbps=6, lm=False, seed=0)
        v193 = synth.to_v193(v0, 48_000, name="Song", source="https://example.invalid/")
        pcm = synth.reference_pcm(v0)  # int16 [samples, channels], exact expected output
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch

# Bump when the generated checkpoints change in a way the source hash would not show.
GENERATOR_VERSION = 1
SEED = 1234

MODEL_CHECKPOINTS = {
    "encodec_48khz": "encodec_48khz-7e698e3e.th",
    "encodec_24khz": "encodec_24khz-d7cc33bc.th",
}
LM_CHECKPOINTS = {
    "encodec_48khz": "encodec_lm_48khz-7add9fc3.th",
    "encodec_24khz": "encodec_lm_24khz-1608e3c0.th",
}
CHECKPOINT_FILES = tuple(MODEL_CHECKPOINTS.values()) + tuple(LM_CHECKPOINTS.values())

_HEADER = struct.Struct("!4sBI")
_MAGIC = b"ECDC"


# --------------------------------------------------------------------------------------
# Synthetic audio
# --------------------------------------------------------------------------------------


def model_params(model: str) -> tuple[int, int]:
    """(sample_rate, channels) of a model name."""
    if model == "encodec_48khz":
        return 48_000, 2
    if model == "encodec_24khz":
        return 24_000, 1
    raise ValueError(f"unknown model {model!r}")


def synth_audio(
    sample_rate: int, channels: int, samples: int, seed: int = 0, amplitude: float = 0.3
) -> np.ndarray:
    """Deterministic test audio: tones + a chirp + noise, slowly modulated.

    Returns float32 ``[channels, samples]`` with peak magnitude about ``amplitude``.
    """
    rng = np.random.default_rng([seed, sample_rate, channels, 0x5EED])
    t = np.arange(samples, dtype=np.float64) / sample_rate
    duration = max(samples / sample_rate, 1e-3)
    nyq = sample_rate / 2
    out = np.zeros((channels, samples), dtype=np.float64)
    for c in range(channels):
        f1, f2 = rng.uniform(60, 1500), rng.uniform(300, min(6000, 0.4 * nyq))
        p1, p2, p3 = rng.uniform(0, 2 * np.pi, size=3)
        c0, c1 = rng.uniform(50, 500), rng.uniform(2000, 0.8 * nyq)
        chirp_phase = 2 * np.pi * (c0 * t + (c1 - c0) * t * t / (2 * duration))
        env = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.3, 3.0) * t + p3)
        sig = (
            0.35 * np.sin(2 * np.pi * f1 * t + p1)
            + 0.2 * np.sin(2 * np.pi * f2 * t + p2)
            + 0.25 * np.sin(chirp_phase)
        ) * env
        sig += 0.1 * rng.standard_normal(samples)
        out[c] = sig
    return (amplitude * out).astype(np.float32)


# --------------------------------------------------------------------------------------
# Checkpoint generation
# --------------------------------------------------------------------------------------


def _calibration_audio(sample_rate: int, channels: int, clips: int, samples: int) -> torch.Tensor:
    """A batch of varied synthetic clips (different seeds and loudness)."""
    amps = np.geomspace(0.03, 0.6, clips)
    batch = [
        synth_audio(sample_rate, channels, samples, seed=10_000 + i, amplitude=float(a))
        for i, a in enumerate(amps)
    ]
    return torch.from_numpy(np.stack(batch))


def _normalize_input(model, x: torch.Tensor) -> torch.Tensor:
    # Same as EncodecModel._encode_frame.
    if not model.normalize:
        return x
    mono = x.mean(dim=1, keepdim=True)
    volume = mono.pow(2).mean(dim=2, keepdim=True).sqrt()
    return x / (1e-8 + volume)


def _weight_norm_convs(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d) and hasattr(m, "weight_g")
    ]


@torch.no_grad()
def _lsuv(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rescale every weight-norm conv so its output has zero mean per channel and unit
    variance overall on ``x``, in one forward pass (hooks adjust the layers in execution
    order and patch their outputs). Returns the output of ``module``."""

    def hook(conv, _inputs, out):
        mean = out.mean(dim=(0, 2))
        std = (out - mean[None, :, None]).std().clamp_min(1e-8)
        conv.weight_g.data /= std
        conv.bias.data.copy_((conv.bias.data - mean) / std)
        return (out - mean[None, :, None]) / std

    handles = [c.register_forward_hook(hook) for c in _weight_norm_convs(module)]
    try:
        return module(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _init_codebooks(model, emb: torch.Tensor, gen: torch.Generator, noise: float = 0.5) -> None:
    """Initialise the RVQ codebooks from embeddings ``emb`` ``[B, D, T]``.

    Each layer's codebook is a random sample of the current residuals plus Gaussian noise
    (``noise`` times the per-dimension residual spread). No k-means: with fewer frames
    than codebook entries a fitted codebook would drive the residual of the calibration
    data to zero and all later codebooks would collapse to (almost) zero vectors.
    """
    residual = emb.permute(0, 2, 1).reshape(-1, emb.shape[1]).double()
    for layer in model.quantizer.vq.layers:
        cb = layer._codebook
        size, dim = cb.embed.shape
        idx = torch.randint(0, residual.shape[0], (size,), generator=gen)
        spread = residual.std(dim=0, keepdim=True)
        jitter = torch.randn(size, dim, generator=gen, dtype=torch.float64)
        centers = residual[idx] + noise * spread * jitter
        embed = centers.float()
        cb.embed.data.copy_(embed)
        cb.embed_avg.data.copy_(embed)
        cb.cluster_size.data.fill_(1.0)
        cb.inited.data.fill_(1.0)
        residual = residual - centers[torch.cdist(residual, centers).argmin(dim=1)]


def _build_model(name: str, seed: int) -> torch.nn.Module:
    from encodec.model import EncodecModel

    ctor = {
        "encodec_48khz": EncodecModel.encodec_model_48khz,
        "encodec_24khz": EncodecModel.encodec_model_24khz,
    }[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor(pretrained=False)
    model.eval()
    sr, channels = model.sample_rate, model.channels
    gen = torch.Generator().manual_seed(seed + 1)
    # 4 s of calibration audio (600 embedding frames): varied enough, fast enough.
    x = _calibration_audio(sr, channels, clips=4, samples=sr if sr == 48_000 else 2 * sr)
    with torch.no_grad():
        xin = _normalize_input(model, x)
        emb = _lsuv(model.encoder, xin) if name == "encodec_24khz" else model.encoder(xin)
        _init_codebooks(model, emb, gen)
        if name == "encodec_24khz":
            codes = model.quantizer.encode(emb, model.frame_rate, None)
            q = model.quantizer.decode(codes)
            y = _lsuv(model.decoder, q)
            # Scale the final conv so the output is about as loud as the input.
            last = _weight_norm_convs(model.decoder)[-1]
            gain = (x.pow(2).mean().sqrt() / y.pow(2).mean().sqrt().clamp_min(1e-8)).item()
            last.weight_g.data *= gain
            last.bias.data *= gain
    return model


def _build_lm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    from encodec.model import LMModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LMModel(
            model.quantizer.n_q,
            model.quantizer.bins,
            num_layers=5,
            dim=200,
            past_context=int(3.5 * model.frame_rate),
        )
    with torch.no_grad():
        for lin in lm.linears:
            lin.weight.mul_(3.0)
    lm.eval()
    return lm


def generate_checkpoints(dest: Path, seed: int = SEED) -> None:
    """Write the four checkpoint files into ``dest`` (a ``hub/checkpoints`` dir)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(MODEL_CHECKPOINTS):
        model = _build_model(name, seed + 100 * i)
        lm = _build_lm(model, seed + 100 * i + 50)
        for file, module in ((MODEL_CHECKPOINTS[name], model), (LM_CHECKPOINTS[name], lm)):
            tmp = dest / (file + ".tmp")
            torch.save(module.state_dict(), tmp)
            os.replace(tmp, dest / file)


def generator_key() -> str:
    """Hash of everything the generated checkpoints depend on."""
    import encodec

    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(f"{GENERATOR_VERSION}|{SEED}|{torch.__version__}|{encodec.__version__}".encode())
    h.update(f"{np.__version__}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Locating / caching checkpoints
# --------------------------------------------------------------------------------------

GENERATION_ID_FILE = "ecdcfs-test-generation-id"


def checkpoint_dir(torch_home: str | os.PathLike | None = None) -> Path:
    """``$TORCH_HOME/hub/checkpoints``, asserting that our checkpoints are there."""
    if torch_home is None:
        torch_home = os.environ.get("TORCH_HOME")
        assert torch_home, (
            "TORCH_HOME is not set: use the `torch_home` pytest fixture (tests/conftest.py), "
            "which generates the random-init Encodec checkpoints and points TORCH_HOME at them"
        )
    d = Path(torch_home) / "hub" / "checkpoints"
    missing = [f for f in CHECKPOINT_FILES if not (d / f).is_file()]
    assert not missing, (
        f"missing Encodec checkpoints in {d}: {missing} (use the torch_home fixture)"
    )
    return d


def generation_id(torch_home: str | os.PathLike | None = None) -> str | None:
    """Random id written next to checkpoints we generated; ties derived caches to them."""
    p = checkpoint_dir(torch_home) / GENERATION_ID_FILE
    try:
        return p.read_text().strip() or None
    except OSError:
        return None


# Where generated checkpoints and files are cached between runs: decided on import, before
# conftest points XDG_CACHE_HOME at the session's temp dir (ecdcfs's own caches go there).
_CACHE_ROOT = (
    Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))
    / "ecdcfs-tests"
)


def default_cache_root() -> Path:
    return _CACHE_ROOT


def prepare_torch_home(torch_home: Path, cache: bool = True) -> Path:
    """Fill ``torch_home/hub/checkpoints`` with the generated checkpoints.

    With ``cache``, the checkpoints are generated once into
    ``<default_cache_root()>/checkpoints/<generator_key()>`` and hard-linked (or copied)
    from there; a cache entry is complete once its generation id file exists (it is
    built in a temp dir and renamed into place under a lock). Encoded files and
    reference PCM derived from a cached checkpoint set are cached on disk too, under
    ``derived/<generation id>``. Returns the checkpoint directory.
    """
    import fcntl
    import shutil
    import tempfile

    dest = torch_home / "hub" / "checkpoints"
    dest.mkdir(parents=True, exist_ok=True)
    if not cache:
        # No generation id: results derived from these checkpoints are cached in
        # memory only.
        generate_checkpoints(dest)
        return dest
    cache_root = default_cache_root() / "checkpoints"
    entry = cache_root / generator_key()
    if not (entry / GENERATION_ID_FILE).is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        with open(cache_root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (entry / GENERATION_ID_FILE).is_file():
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
                generate_checkpoints(tmp)
                (tmp / GENERATION_ID_FILE).write_text(os.urandom(8).hex() + "\n")
                if entry.exists():
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
                # Drop checkpoints of other generator versions (and half-written ones)
                # and whatever was derived from them.
                for other in cache_root.iterdir():
                    if other.is_dir() and other != entry:
                        shutil.rmtree(other, ignore_errors=True)
                gid = (entry / GENERATION_ID_FILE).read_text().strip()
                if _derived_root().is_dir():
                    for other in _derived_root().iterdir():
                        if other.name != gid:
                            shutil.rmtree(other, ignore_errors=True)
    for f in (*CHECKPOINT_FILES, GENERATION_ID_FILE):
        target = dest / f
        if target.exists():
            target.unlink()
        try:
            os.link(entry / f, target)
        except OSError:
            shutil.copyfile(entry / f, target)
    return dest


# --------------------------------------------------------------------------------------
# .ecdc files
# --------------------------------------------------------------------------------------

_lock = threading.RLock()
_models: dict[tuple[str, str], torch.nn.Module] = {}
_ecdc_cache: dict[tuple, bytes] = {}
_pcm_cache: dict[tuple, np.ndarray] = {}


def load_model(model: str = "encodec_48khz"):
    """The (random-init) model as upstream loads it, cached per TORCH_HOME."""
    from encodec.compress import MODELS

    home = str(checkpoint_dir().parent.parent)
    key = (model, home)
    with _lock:
        if key not in _models:
            _models[key] = MODELS[model]()
        return _models[key]


def _derived_root() -> Path:
    return default_cache_root() / "derived"


def _disk_cache_dir() -> Path | None:
    """Per-generation cache dir, only for cached checkpoint sets (see prepare_torch_home)."""
    gid = generation_id()
    if gid is None or os.environ.get("ECDCFS_TEST_NO_DISK_CACHE"):
        return None
    return _derived_root() / gid


def _disk_get(name: str) -> bytes | None:
    d = _disk_cache_dir()
    if d is None:
        return None
    try:
        return (d / name).read_bytes()
    except OSError:
        return None


def _disk_put(name: str, data: bytes) -> None:
    d = _disk_cache_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / name)
    except OSError:
        pass


def make_ecdc(
    model: str = "encodec_48khz",
    samples: int = 48000,
    kbps: float = 6,
    lm: bool = False,
    seed: int = 0,
) -> bytes:
    """Encode deterministic synthetic audio with upstream ``encodec.compress.compress``.

    ``samples`` per channel at the model's rate (stereo for 48 kHz, mono for 24 kHz).
    Returns the upstream version-0 .ecdc bytes. Cached per parameters (in memory, and
    on disk next to cached checkpoints).
    """
    assert samples > 0
    model_params(model)  # validates the name
    key = (model, int(samples), float(kbps), bool(lm), int(seed))
    gid = generation_id()
    with _lock:
        mem_key = (gid or checkpoint_dir().as_posix(), *key)
        if mem_key in _ecdc_cache:
            return _ecdc_cache[mem_key]
        disk_name = "ecdc-" + "-".join(str(k) for k in key) + ".ecdc"
        data = _disk_get(disk_name)
        if data is None:
            data = encode_uncached(model, samples, kbps, lm, seed)
            _disk_put(disk_name, data)
        _ecdc_cache[mem_key] = data
        return data


def encode_uncached(model: str, samples: int, kbps: float, lm: bool, seed: int) -> bytes:
    """``make_ecdc`` without any caching."""
    from encodec.compress import compress

    sr, channels = model_params(model)
    with _lock:
        m = load_model(model)
        m.set_target_bandwidth(kbps)
        wav = torch.from_numpy(synth_audio(sr, channels, samples, seed=seed))
        return compress(m, wav, use_lm=lm)


def parse_header(data: bytes) -> tuple[int, dict, int]:
    """(version, metadata, payload offset) of an .ecdc file."""
    magic, version, size = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC:
        raise ValueError("not an ECDC file")
    start = _HEADER.size
    meta = json.loads(data[start : start + size].decode("utf-8"))
    return version, meta, start + size


def to_v193(
    v0: bytes,
    sr: int,
    name: str | None = None,
    source: str | None = None,
    thumbnail: str | None = None,
    br: float | None = None,
    version: int = 193,
) -> bytes:
    """Rewrite an upstream v0 header the way Encodec-Stream does (version 192/193,
    compact JSON with extra keys ``br``, ``sr`` and optional ``n``, ``s``, ``t``).
    The payload bytes are unchanged."""
    old_version, meta, off = parse_header(v0)
    assert old_version == 0, f"expected a version-0 file, got version {old_version}"
    if br is None:
        # bits per codebook (10) * codebooks * frame rate / 1000
        frame_rate = {"encodec_48khz": 150, "encodec_24khz": 75}[meta["m"]]
        br = meta["nc"] * 10 * frame_rate / 1000
    new = {"m": meta["m"], "al": meta["al"], "nc": meta["nc"], "lm": meta["lm"], "br": br, "sr": sr}
    if name is not None:
        new["n"] = name
    if source is not None:
        new["s"] = source
    if thumbnail is not None:
        new["t"] = thumbnail
    dumped = json.dumps(new, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(_MAGIC, version, len(dumped)) + dumped + v0[off:]


def to_v0(data: bytes) -> bytes:
    """Inverse of ``to_v193``: upstream version-0 header (keys m, al, nc, lm)."""
    version, meta, off = parse_header(data)
    if version == 0:
        return data
    new = {"m": meta["m"], "al": meta["al"], "nc": meta["nc"], "lm": meta["lm"]}
    dumped = json.dumps(new).encode("utf-8")
    return _HEADER.pack(_MAGIC, 0, len(dumped)) + dumped + data[off:]


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
    with _lock:
        if mem_key in _pcm_cache:
            return _pcm_cache[mem_key].copy()
        disk_name = f"pcm-{digest}-t{torch.get_num_threads()}.npy"
        raw = _disk_get(disk_name)
        if raw is not None:
            pcm = np.load(io.BytesIO(raw))
        else:
            wav, _ = reference_decode(v0)
            x = wav.detach().cpu().numpy().astype(np.float32, copy=False)
            pcm = np.ascontiguousarray(float_to_pcm16(x).T)
            buf = io.BytesIO()
            np.save(buf, pcm)
            _disk_put(disk_name, buf.getvalue())
        _pcm_cache[mem_key] = pcm
        return pcm.copy()


def write(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``directory / name`` and return the path."""
    path = directory / name
    path.write_bytes(data)
    return path


def lm_encode(lm, codes: np.ndarray) -> bytes:
    """Arithmetic-code ``codes`` ``[codebooks, steps]`` as one LM-coded frame (no scale).

    The loop of ``encodec.compress`` for one frame's codes, so tests can write LM-coded
    files of chosen codes (e.g. long random ones) without encoding audio.
    """
    from encodec.quantization.ac import ArithmeticCoder, build_stable_quantized_cdf

    out = io.BytesIO()
    coder = ArithmeticCoder(out)
    states, offset = None, 0
    previous = torch.zeros(1, codes.shape[0], 1, dtype=torch.long)
    frame = torch.from_numpy(codes.astype(np.int64))[None]
    with torch.no_grad():
        for t in range(codes.shape[1]):
            probas, states, offset = lm(previous, states, offset)
            previous = 1 + frame[:, :, t : t + 1]
            for k, value in enumerate(frame[0, :, t].tolist()):
                cdf = build_stable_quantized_cdf(
                    probas[0, :, k, 0], coder.total_range_bits, check=False
                )
                coder.push(value, cdf)
    coder.flush()
    return out.getvalue()


def container_24khz(samples: int, nc: int, payload: bytes, lm: bool = False) -> bytes:
    """A version-0 ``encodec_24khz`` file of ``samples`` with ``payload`` (any bytes)."""
    meta = json.dumps({"m": "encodec_24khz", "al": samples, "nc": nc, "lm": lm}).encode()
    return _HEADER.pack(_MAGIC, 0, len(meta)) + meta + payload


def random_packed_24khz(samples: int, nc: int, seed: int = 0) -> bytes:
    """Bit-packed random codes for a 24 kHz file of ``samples`` (no encoder needed)."""
    steps = -(-samples // 320)
    codes = np.random.default_rng(seed).integers(0, 1024, steps * nc, dtype=np.uint16)
    bits = ((codes[:, None] >> np.arange(10, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def run_in_threads(func, arguments: list[tuple], timeout: float = 300) -> list[BaseException]:
    """Run ``func(*args)`` for every ``args`` at once, a thread each; return what they raised."""
    errors: list[BaseException] = []

    def guarded(*args) -> None:
        try:
            func(*args)
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=args) for args in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "threads still running"
    return errors


def proc_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def reset_peak_rss(pid: int) -> bool:
    """Set ``pid``'s VmHWM to its VmRSS, so VmHWM measures from now on (False: not allowed)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def long_plain_file(v0: bytes, frames: int) -> bytes:
    """A long bit-packed 48 kHz file made of ``v0``'s full frames over and over, then its
    short last frame (any codes decode; no encoding needed)."""
    _, meta, offset = parse_header(v0)
    assert meta["m"] == "encodec_48khz" and not meta["lm"]
    full_frames, tail = divmod(meta["al"] - 480, 47_520)
    frame_bytes = 4 + 150 * meta["nc"] * 10 // 8
    payload = v0[offset:]
    full = [payload[i * frame_bytes : (i + 1) * frame_bytes] for i in range(full_frames)]
    body = b"".join(full[i % full_frames] for i in range(frames))
    body += payload[full_frames * frame_bytes :]
    header = {**meta, "al": frames * 47_520 + tail + 480}
    dumped = json.dumps(header).encode()
    return b"ECDC\0" + len(dumped).to_bytes(4, "big") + dumped + body
