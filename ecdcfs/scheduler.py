"""Decoded units, each decoded once: a byte-bounded LRU cache in front of one decode worker.

Readers ask for units (48 kHz frames, 24 kHz chunks: see :mod:`ecdcfs.units`) they need now
(urgent) or will need soon (read-ahead). Urgent work always runs first; a request for a
unit that is cached or already being decoded shares that result, so two readers never
decode the same unit twice.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import LRUCache

log = logging.getLogger(__name__)

URGENT, READ_AHEAD = 0, 1


class Decoded(Protocol):
    """What the cache holds: a decoded unit, which knows its size."""

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class Batch:
    """How a job may share one decode call with others (on a GPU): jobs of the same
    ``group``, at most ``size`` of them, each giving its ``inputs()`` to one ``run``."""

    group: Hashable
    size: int
    inputs: Callable[[], Any]
    run: Callable[[list[Any]], list[Decoded]]


@dataclass
class _Job:
    key: Hashable
    produce: Callable[[], Decoded]
    urgent: bool
    batch: Batch | None = None
    future: Future = field(default_factory=Future)
    started: bool = False


class DecodeScheduler:
    """Cache of decoded units plus the single worker thread that fills it.

    One worker keeps CPU decoding deterministic (one unit at a time, fixed torch thread
    count) and leaves the other cores to the readers.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.decoded_count = 0  # units produced since start (for benchmarks and tests)
        self._cache: LRUCache = LRUCache(maxsize=capacity_bytes, getsizeof=lambda f: f.nbytes)
        self._jobs: dict[Hashable, _Job] = {}
        self._queue: list[tuple[int, int, _Job]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="ecdcfs-decoder", daemon=True)
        self._worker.start()

    def request(
        self,
        key: Hashable,
        produce: Callable[[], Decoded],
        urgent: bool = True,
        batch: Batch | None = None,
    ) -> Future:
        """A future for unit ``key``, decoding it with ``produce`` unless cached or queued."""
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                done: Future = Future()
                done.set_result(cached)
                return done
            job = self._jobs.get(key)
            if job is None:
                job = self._jobs[key] = _Job(key, produce, urgent, batch)
                self._push(job)
            elif urgent and not job.urgent:
                job.urgent = True
                self._push(job)  # the stale read-ahead entry is skipped when popped
            return job.future

    def cancel(self, key: Hashable) -> None:
        """Drop a queued read-ahead request nobody is waiting for."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.urgent and not job.started:
                job.future.cancel()
                del self._jobs[key]

    def is_cached(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._cache

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()
        self._worker.join(timeout=30)

    def _push(self, job: _Job) -> None:
        heapq.heappush(self._queue, (URGENT if job.urgent else READ_AHEAD, next(self._order), job))
        self._wakeup.notify()

    def _next_job(self) -> _Job | None:
        with self._lock:
            while True:
                while not self._queue and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return None
                _, _, job = heapq.heappop(self._queue)
                if not job.started and not job.future.cancelled():
                    job.started = True
                    return job

    def _companions(self, job: _Job) -> list[_Job]:
        """Queued jobs that can share ``job``'s decode call, waiting ones first."""
        if job.batch is None or job.batch.size <= 1:
            return []
        with self._lock:
            group = job.batch.group
            mates = [
                other
                for other in self._jobs.values()
                if other.batch is not None
                and other.batch.group == group
                and not other.started
                and not other.future.cancelled()
            ]
            mates.sort(key=lambda other: not other.urgent)
            mates = mates[: job.batch.size - 1]
            for other in mates:
                other.started = True
            return mates

    @staticmethod
    def _produce(jobs: list[_Job]) -> list[Decoded | BaseException]:
        """Each job's unit, or what it raised; several jobs go through one batch run."""
        if len(jobs) == 1:
            try:
                return [jobs[0].produce()]
            except BaseException as exc:  # handed to every waiting reader
                return [exc]
        outcomes: dict[int, Decoded | BaseException] = {}
        inputs, ready = [], []
        for position, job in enumerate(jobs):
            try:
                inputs.append(job.batch.inputs())  # type: ignore[union-attr]
                ready.append(position)
            except BaseException as exc:  # this unit fails alone
                outcomes[position] = exc
        if ready:
            try:
                decoded: list = jobs[ready[0]].batch.run(inputs)  # type: ignore[union-attr]
            except BaseException as exc:
                decoded = [exc] * len(ready)
            outcomes.update(zip(ready, decoded, strict=True))
        return [outcomes[position] for position in range(len(jobs))]

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            jobs = [job, *self._companions(job)]
            started = time.perf_counter()
            outcomes = self._produce(jobs)
            elapsed = time.perf_counter() - started
            for done, outcome in zip(jobs, outcomes, strict=True):
                self._finish(done, outcome, elapsed / len(jobs))

    def _finish(self, job: _Job, outcome: Decoded | BaseException, seconds: float) -> None:
        if isinstance(outcome, BaseException):
            with self._lock:
                del self._jobs[job.key]
            job.future.set_exception(outcome)
            return
        log.debug("decoded unit %s in %.3f s", job.key, seconds)
        with self._lock:
            self.decoded_count += 1
            if outcome.nbytes <= self.capacity_bytes:
                self._cache[job.key] = outcome
            del self._jobs[job.key]
        job.future.set_result(outcome)
