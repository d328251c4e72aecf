"""The decoding machinery every open file shares: frame decoders, language models, the
decoded-unit cache and its workers, the code indexes of LM-coded files.

Each model (and each model's LM) loads under a lock of its own, so a read of a loaded
model never waits, and a first read of one model never waits for another's load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .audiofile import AudioFile
from .checkpoint import CHECKPOINTS, LM_CHECKPOINTS, checkpoint_path, fingerprint
from .container import MODELS, EncodedFrame, ModelSpec, read_header
from .decoder import LM_NEEDS_TORCH, FrameDecoder, ModelUnavailable
from .graph_store import GraphStore
from .index import IndexStore
from .interrupts import Interrupts
from .lm_process import LanguageModel, find_lm
from .scheduler import Batch, DecodeScheduler
from .settings import Settings, default_threads, torch_installed
from .source import ByteSource, MemorySource, as_stream
from .torch_decoder import default_device

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Failure:
    """A model that could not be loaded, and its checkpoint's fingerprint before trying."""

    error: ModelUnavailable
    fingerprint: tuple


class Engine:
    """Decoding machinery shared by every open file.

    Frames decode on ONNX Runtime (:mod:`ecdcfs.onnx_decoder`), several at once, unless
    the settings ask for encodec's own torch decode (``exact``, or a GPU), one at a time.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.device = self.settings.device or default_device()
        self.torch_decodes = self.settings.exact or self.device != "cpu"
        self.interrupts = Interrupts()
        self.scheduler = DecodeScheduler(
            self.settings.cache_mb << 20,
            workers=1 if self.torch_decodes else self.settings.threads or default_threads(),
            interrupts=None if self.torch_decodes else self.interrupts,  # torch runs to the end
        )
        cap = self.settings.cache_dir_mb
        self.indexes = IndexStore(
            self.settings.cache_dir, max_bytes=None if cap is None else cap << 20
        )
        self.graphs = GraphStore(self.settings.cache_dir)
        self._decoders: dict[str, FrameDecoder] = {}
        self._lms: dict[str, LanguageModel] = {}
        # Load failures by what failed ("encodec_48khz", "encodec_48khz LM"); see _load.
        self._failures: dict[str, _Failure] = {}
        self._locks = {what: threading.Lock() for name in MODELS for what in (name, f"{name} LM")}

    def decoder(self, spec: ModelSpec) -> FrameDecoder:
        """The frame decoder for ``spec``, loaded on first use (see :meth:`_load` for failures)."""
        decoder = self._decoders.get(spec.name)  # loaded: no lock to wait for
        if decoder is None:
            load = self._torch_decoder if self.torch_decodes else self._onnx_decoder
            decoder = self._load(
                spec.name, CHECKPOINTS[spec.name], self._decoders, lambda: load(spec)
            )
        return decoder

    def _torch_decoder(self, spec: ModelSpec) -> FrameDecoder:
        from .torch_decoder import TorchDecoder

        return TorchDecoder(spec, self.device)

    def _onnx_decoder(self, spec: ModelSpec) -> FrameDecoder:
        """The ONNX Runtime decoder; encodec's own on the CPU (one warning) if there can be
        none and torch is installed."""
        try:
            from .onnx_decoder import OnnxDecoder

            return self.graphs.load(spec, lambda graph: OnnxDecoder(spec, graph, self.interrupts))
        except ModelUnavailable:
            raise
        except Exception as exc:  # import, build, runtime: none may make files unreadable
            if not torch_installed():
                raise ModelUnavailable(
                    f"cannot decode {spec.name} with ONNX Runtime: {exc}"
                ) from exc
            log.warning(
                "cannot decode %s with ONNX Runtime (%s): decoding with encodec's torch model",
                spec.name,
                exc,
            )
            from .torch_decoder import TorchDecoder

            return TorchDecoder(spec, "cpu")

    def lm(self, spec: ModelSpec) -> LanguageModel:
        """The language model of ``spec``'s model, for LM-coded files (see :meth:`_load`):
        its checkpoint is there and torch is installed; it runs in a child process."""
        lm = self._lms.get(spec.name)
        if lm is None:
            what = f"{spec.name} LM"
            lm = self._load(what, LM_CHECKPOINTS[spec.name], self._lms, lambda: find_lm(spec))
        return lm

    def _load(self, what: str, checkpoint: str, loaded: dict[str, T], load: Callable[[], T]) -> T:
        """``load()`` of ``what`` (whose checkpoint file is ``checkpoint``) into ``loaded``,
        once, under ``what``'s own lock.

        A failure is logged once and remembered with the checkpoint's fingerprint: until
        the file changes (copied in, a partial copy completed) it is raised again without
        a new attempt, so an offline mount does not try a download at every read.
        """
        name = what.removesuffix(" LM")
        with self._locks[what]:
            value = loaded.get(name)
            if value is not None:
                return value
            failure = self._failures.get(what)
            before = fingerprint(checkpoint)
            if failure is not None and failure.fingerprint == before:
                raise failure.error
            try:
                value = load()
            except ModelUnavailable as exc:
                log.error("%s", exc)
                self._failures[what] = _Failure(exc, before)
                raise
            if self._failures.pop(what, None) is not None:
                log.info("%s loaded: its checkpoint %s was found", what, checkpoint)
            loaded[name] = value
            return value

    def failure(self, spec: ModelSpec, use_lm: bool) -> str | None:
        """Why files of ``spec`` (LM-coded if ``use_lm``) cannot be decoded now; loads nothing.

        None if no load failed, or if the checkpoint changed since (the next read tries it).
        """
        if use_lm and not torch_installed():
            return LM_NEEDS_TORCH
        needed = [(spec.name, CHECKPOINTS[spec.name])]
        if use_lm:
            needed.append((f"{spec.name} LM", LM_CHECKPOINTS[spec.name]))
        for what, checkpoint in needed:
            failure = self._failures.get(what)  # no lock: it is held while a model loads
            if failure is not None and failure.fingerprint == fingerprint(checkpoint):
                return str(failure.error)
        return None

    def loaded_decoder(self, spec: ModelSpec) -> FrameDecoder | None:
        """The decoder for ``spec`` if it is already loaded (never loads it)."""
        return self._decoders.get(spec.name)

    def batch(
        self, spec: ModelSpec, group: Hashable | None, inputs: Callable[[], EncodedFrame]
    ) -> Batch | None:
        """How a unit of batch ``group`` (:meth:`~ecdcfs.units.DecodeUnits.batch_group`)
        shares one decode call with others of its group: where ``spec``'s decoder is loaded
        and decodes several frames at once (torch on a GPU); None for one at a time."""
        decoder = self.loaded_decoder(spec)
        if decoder is None or decoder.batch_size == 1 or group is None:
            return None
        return Batch((spec.name, group), decoder.batch_size, inputs, decoder.decode_frames)

    def warm_up(self, names: Collection[str] = tuple(MODELS)) -> None:
        """Load the models ``names`` whose checkpoints are on disk, so first reads are fast.

        Meant for a background thread right after the daemon forks; it lowers that
        thread's priority so listings right after mounting stay fast. A model that fails
        here fails again (once, clearly) at the first read that needs it. (Each model
        costs memory, so load only those the files use.)
        """
        with contextlib.suppress(OSError):  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        for name in names:
            if checkpoint_path(CHECKPOINTS[name]).exists():
                with contextlib.suppress(ModelUnavailable):
                    self.decoder(MODELS[name])

    def open(self, path: Path, data: bytes | None = None, riff_info: bool = False) -> AudioFile:
        """Validate an .ecdc file (its bytes, or read from ``path``) as an :class:`AudioFile`
        (``riff_info``: its WAV has LIST/INFO tags too, see :class:`~ecdcfs.wav.WavLayout`).

        Raises :class:`EcdcError` if the file is unusable.
        """
        if data is None:
            data = Path(path).read_bytes()
        return self.open_byte_source(str(path), MemorySource(data), riff_info)

    def open_byte_source(self, name: str, source: ByteSource, riff_info: bool = False) -> AudioFile:
        """An :class:`AudioFile` over any byte source (``name`` is for messages).

        An LM-coded file without torch raises ModelUnavailable: it can never be decoded.
        """
        header = read_header(as_stream(source, block=1), source.size)  # exactly the header
        if header.use_lm and not torch_installed():
            self.lm(header.model)  # raises LM_NEEDS_TORCH, logged once
        return AudioFile(self, name, source, header, riff_info)

    def close(self) -> None:
        """Stop decoding; index builds persist what they have (see IndexStore.close)."""
        self.scheduler.close()
        self.indexes.close()
