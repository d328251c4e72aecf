"""The default frame decoder: encodec's decoder on ONNX Runtime, without torch.

Each model's decoder is exported from the user's own checkpoint once (by a child process
that imports torch: :mod:`ecdcfs.graph`) into an :class:`Artifact` kept in
``<cache dir>/graphs/`` under the checkpoint's content hash, the graph's format and the
onnxruntime version: new weights, a new ecdcfs graph or another onnxruntime mean a new
graph. The artifact holds the graph, the
codebooks (the quantizer's decode is a sum of codebook rows, done here in numpy, in
encodec's order, so one graph serves every code count) and a probe: a few code steps with
encodec's own decode of them. Every artifact decodes its probe before it is used; one that
is truncated, corrupt or from something else is rebuilt with one warning, and a cache dir
that cannot be written keeps the graph in memory.

The graph's samples do not depend on ONNX Runtime's thread count (tested with 1 to 4), so
the same offset gives the same bytes on every mount of a machine (another CPU may get
other kernels from ONNX Runtime, within the same 2 LSB of encodec). Each decode runs on one
thread all the same: two one-thread decodes at once do more work than one two-thread decode
(measured on 2 cores: 53-57 against 70 ms a 48 kHz frame), so parallelism comes from the
scheduler running several decodes at once on the one session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .codec import CHECKPOINTS, DecodedFrame, ModelUnavailable
from .container import EncodedFrame, ModelSpec
from .interrupts import Interrupts
from .settings import DIGESTS_FILE, GRAPH_SUFFIX, checkpoint_dir, graph_dir, write_atomically

log = logging.getLogger(__name__)

THREADS = 1  # ONNX Runtime threads per decode (the scheduler runs decodes side by side)
GRAPH_FORMAT = 2  # what ecdcfs.graph exports: a new format means new graph files
OPSET = 17
PROBE_STEPS = 8  # code steps of the probe every graph must decode like encodec
MIN_SNR_DB = 95.0  # the probe's least signal-to-error ratio against encodec's decode
EXPORT_TIMEOUT_S = 900  # a child that exports for longer than this is stuck
MODEL_UNAVAILABLE_EXIT = 3  # how the exporting child says the model cannot be loaded
CANNOT_WRITE_EXIT = 4  # and that it exported the graph but could not write it


class GraphUnusable(Exception):
    """A graph that does not load, or does not decode like encodec."""


def file_digest(path: Path) -> str:
    """The sha256 of a file, in hex (~0.1 s for a 72 MB checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


@functools.lru_cache(maxsize=8)
def overlap_add_weights(frame_length: int) -> np.ndarray:
    """encodec's triangular overlap-add weights for ``frame_length`` samples, in numpy
    (torch's linspace rounds a few of them differently, by one float32 ulp)."""
    t = np.linspace(0, 1, frame_length + 2, dtype=np.float32)[1:-1]
    return np.float32(0.5) - np.abs(t - np.float32(0.5))


@dataclass
class Artifact:
    """What decoding a model needs without torch: its decoder graph, its codebooks
    ``[n_q, bins, dim]``, the first convolution's padding, and a probe to check it by."""

    graph: bytes
    codebooks: np.ndarray
    padding: tuple[int, int]
    pad_mode: str
    probe_codes: np.ndarray  # [n_q, PROBE_STEPS]
    probe_audio: np.ndarray  # encodec's decode of probe_codes, [channels, samples]
    checkpoint_sha: str

    def save(self, f: io.BufferedIOBase) -> None:
        """Write the artifact as an ``.npz`` file."""
        np.savez(
            f,
            graph=np.frombuffer(self.graph, np.uint8),
            codebooks=self.codebooks,
            padding=np.array(self.padding),
            pad_mode=np.array(self.pad_mode),
            probe_codes=self.probe_codes,
            probe_audio=self.probe_audio,
            checkpoint_sha=np.array(self.checkpoint_sha),
        )

    @classmethod
    def load(cls, path: Path) -> Artifact:
        """Read an artifact :meth:`save` wrote; GraphUnusable for anything else."""
        try:
            with np.load(path, allow_pickle=False) as data:
                left, right = (int(p) for p in data["padding"])
                return cls(
                    graph=data["graph"].tobytes(),
                    codebooks=data["codebooks"],
                    padding=(left, right),
                    pad_mode=str(data["pad_mode"]),
                    probe_codes=data["probe_codes"],
                    probe_audio=data["probe_audio"],
                    checkpoint_sha=str(data["checkpoint_sha"]),
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise GraphUnusable(f"cannot read it: {exc}") from exc

    def check(self, session: ort.InferenceSession | None = None) -> ort.InferenceSession:
        """A session for the graph, once it decodes the probe like encodec (GraphUnusable)."""
        session = session or new_session(self.graph)
        try:
            actual = decode_codes(session, self, self.probe_codes)
        except Exception as exc:  # onnxruntime's exception types: a graph that cannot run
            raise GraphUnusable(f"it does not run: {exc}") from exc
        expected = self.probe_audio
        if actual.shape != expected.shape:
            raise GraphUnusable(f"it decodes {actual.shape}, not {expected.shape}")
        snr = snr_db(expected, actual)
        if not snr >= MIN_SNR_DB:  # NaN fails too
            raise GraphUnusable(f"it decodes at {snr:.1f} dB from encodec, under {MIN_SNR_DB}")
        return session


def embedding(codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The quantizer's decode of ``codes`` ``[codebooks, steps]``: float32 ``[dim, steps]``.

    The codebook rows are summed in encodec's order, so this is its embedding exactly.
    """
    emb = codebooks[0][codes[0]]
    for codebook, row in zip(codebooks[1:], codes[1:], strict=False):
        emb = emb + codebook[row]
    return emb.T


def decode_codes(
    session: ort.InferenceSession,
    artifact: Artifact,
    codes: np.ndarray,
    run_options: ort.RunOptions | None = None,
) -> np.ndarray:
    """Decoder output ``[channels, samples]`` of one frame's codes, before its scale."""
    emb = pad_steps(embedding(artifact.codebooks, codes), artifact.padding, artifact.pad_mode)
    return session.run(None, {"emb": np.ascontiguousarray(emb)[None]}, run_options)[0][0]


class OnnxDecoder:
    """Decodes frames like encodec's ``_decode_frame`` (within 2 LSB), on ONNX Runtime.

    Several threads may decode at once, each on one ONNX Runtime thread; a decode can be
    stopped from another thread through ``interrupts``.
    """

    batch_size = 1  # each frame on its own run: its samples never depend on the others

    def __init__(self, spec: ModelSpec, artifact: Artifact, interrupts: Interrupts) -> None:
        self.spec = spec
        self.session = artifact.check()
        self.artifact = dataclasses.replace(artifact, graph=b"")  # the session holds it now
        self.interrupts = interrupts

    def decode_frame(self, frame: EncodedFrame) -> DecodedFrame:
        """Decode one frame's codes ``[codebooks, steps]`` (and scale)."""
        run = ort.RunOptions()
        with self.interrupts.stoppable(lambda: setattr(run, "terminate", True)):
            audio = decode_codes(self.session, self.artifact, frame.codes, run)
        if frame.scale is not None:
            audio = audio * np.float32(frame.scale)
        return DecodedFrame(audio)

    def decode_frames(self, frames: list[EncodedFrame]) -> list[DecodedFrame]:
        """Decode frames one by one (see ``batch_size``)."""
        return [self.decode_frame(frame) for frame in frames]

    @staticmethod
    def overlap_add_weights(frame_length: int) -> np.ndarray:
        """The overlap-add weights this decoder's frames blend with."""
        return overlap_add_weights(frame_length)


def artifact_path(cache_dir: Path, name: str, checkpoint_sha: str) -> Path:
    """Where the artifact of model ``name`` from the checkpoint ``checkpoint_sha`` lives."""
    file_name = f"{name}-{checkpoint_sha[:16]}-g{GRAPH_FORMAT}-ort{ort.__version__}{GRAPH_SUFFIX}"
    return graph_dir(cache_dir) / file_name


def checkpoint_digest(checkpoint: Path, cache_dir: Path | None) -> str:
    """The sha256 of ``checkpoint``, remembered in ``cache_dir`` by the file's size, mtime
    and inode, so a start does not hash 72 MB again (~0.05-0.1 s); "" if it is missing."""
    try:
        st = os.stat(checkpoint)
    except OSError:
        return ""  # missing: the export reports it as encodec does (and downloads, online)
    fingerprint = [st.st_size, st.st_mtime_ns, st.st_ino]
    known = None if cache_dir is None else graph_dir(cache_dir) / DIGESTS_FILE
    digests = _read_digests(known)
    entry = digests.get(str(checkpoint), {})
    if entry.get("fingerprint") == fingerprint and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    sha = file_digest(checkpoint)
    if known is not None:
        digests[str(checkpoint)] = {"fingerprint": fingerprint, "sha256": sha}
        with contextlib.suppress(OSError):  # only costs the next start a hash
            write_atomically(known, lambda f: f.write(json.dumps(digests).encode()))
    return sha


def _read_digests(path: Path | None) -> dict[str, dict]:
    """The remembered checkpoint digests; {} if there are none or the file is damaged."""
    if path is None:
        return {}
    try:
        digests = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(digests, dict):
        return {}
    return {key: value for key, value in digests.items() if isinstance(value, dict)}


def load_onnx_decoder(
    spec: ModelSpec, cache_dir: Path | None, interrupts: Interrupts
) -> OnnxDecoder:
    """Model ``spec``'s decoder from its cached artifact, built first if there is none."""
    sha = checkpoint_digest(checkpoint_dir() / CHECKPOINTS[spec.name], cache_dir)
    path = None if cache_dir is None or not sha else artifact_path(cache_dir, spec.name, sha)
    if path is not None and path.exists():
        try:
            artifact = Artifact.load(path)
            if artifact.checkpoint_sha != sha:
                raise GraphUnusable("it is from another checkpoint")
            decoder = OnnxDecoder(spec, artifact, interrupts)
        except GraphUnusable as exc:
            log.warning("cached decoder graph %s is unusable (%s): rebuilding it", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            log.info("loaded the decoder graph %s", path)
            return decoder
    return OnnxDecoder(spec, build(spec.name, sha, path), interrupts)


# Artifacts that could not be saved, by (model, checkpoint sha): built once per process.
_unsaved: dict[tuple[str, str], Artifact] = {}


def build(name: str, sha: str, path: Path | None) -> Artifact:
    """Export model ``name``'s artifact in a child process, saved at ``path`` if it can be
    (else kept in memory for this process).

    Raises ModelUnavailable if the model cannot be loaded, GraphUnusable if the export fails.
    """
    kept = _unsaved.get((name, sha)) if sha else None
    if kept is not None:
        return kept
    log.info("building the decoder graph of %s (once per checkpoint, ~3 s)", name)
    if path is not None and _export(name, sha, path):
        _drop_stale(path)
        log.info("saved the decoder graph %s", path)
        return Artifact.load(path)
    with tempfile.TemporaryDirectory(prefix="ecdcfs-graph-") as scratch:
        temporary = Path(scratch) / "graph.npz"
        if not _export(name, sha, temporary, required=True):
            raise GraphUnusable("the export wrote nothing")
        artifact = Artifact.load(temporary)
    if path is None:
        log.info("no cache dir: the decoder graph of %s stays in memory", name)
    else:
        log.warning(
            "cannot save the decoder graph of %s in %s: keeping it in memory (rebuilt at "
            "every start)",
            name,
            path.parent,
        )
    _unsaved[name, artifact.checkpoint_sha] = artifact
    return artifact


def _export(name: str, sha: str, out: Path, required: bool = False) -> bool:
    """Run ``python -m ecdcfs.graph`` for ``out``; False if only saving it failed (unless
    ``required``: then that fails too)."""
    if not required:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(out.parent, os.W_OK):
                return False
        except OSError:
            return False
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with _one_export(name):
        if out.exists():  # another engine of this process built it meanwhile
            return True
        try:
            done = subprocess.run(
                [sys.executable, "-m", "ecdcfs.graph", name, sha or "-", str(out)],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=env,
                timeout=EXPORT_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GraphUnusable(f"exporting the decoder graph of {name} failed: {exc}") from exc
    message = done.stdout.decode(errors="replace").strip() or f"exit status {done.returncode}"
    if done.returncode == MODEL_UNAVAILABLE_EXIT:
        raise ModelUnavailable(message)
    if done.returncode == CANNOT_WRITE_EXIT and not required:
        return False
    if done.returncode != 0:
        raise GraphUnusable(f"exporting the decoder graph of {name} failed: {message}")
    return True


_export_locks: dict[str, threading.Lock] = {}


def _one_export(name: str) -> threading.Lock:
    """The lock that lets one thread of this process export model ``name`` at a time."""
    return _export_locks.setdefault(name, threading.Lock())


def _drop_stale(path: Path) -> None:
    """Delete ``path``'s siblings of the same model (another checkpoint, graph format or
    onnxruntime)."""
    model = path.name.split("-", 1)[0]
    for stale in path.parent.glob(f"{model}-*{GRAPH_SUFFIX}"):
        if stale != path:
            try:
                stale.unlink()
            except OSError as exc:
                log.warning("cannot delete the stale decoder graph %s: %s", stale, exc)
