"""Decoded units, each decoded once: a byte-bounded LRU cache in front of decode workers.

Readers ask for units (48 kHz frames, 24 kHz chunks: see :mod:`ecdcfs.units`) they need now
(urgent) or will need soon (read-ahead). Urgent work always runs first and never waits
behind read-ahead: read-ahead decodes in flight are interrupted (:mod:`ecdcfs.interrupts`)
and queued again in their old places. A unit nobody had asked for yet (a seek, a cold read)
decodes *alone*: every read-ahead decode in flight is interrupted, and no read-ahead starts
until it is done, since decodes side by side slow each other down (memory bandwidth, shared
caches; measured on 2 cores, a seek while playing took 117-150 ms beside the new window's
read-ahead and 96-121 ms alone). Read-ahead that a reader catches up with just becomes
urgent: if it is queued, the read-ahead that started last makes room for it when no worker
is free; if it is decoding, nothing is stopped, so sequential reads keep every worker busy.
A request for a unit that is cached or already being decoded shares that result, so two
readers never decode the same unit twice.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from cachetools import LRUCache

from .container import EcdcError
from .interrupts import Interrupts

log = logging.getLogger(__name__)

URGENT, READ_AHEAD = 0, 1
# The counters of DecodeScheduler.stats(), in its order.
STATS_KEYS = (
    "units_decoded",
    "decodes_started",
    "decodes_interrupted",
    "cache_hits",
    "cache_misses",
    "cache_bytes",
)


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
    run: Callable[[list[Any]], Sequence[Decoded]]


class Phase(Enum):
    """Where a job is. A job leaves the scheduler (finished, failed or dropped) from any
    phase but QUEUED; every other move is one of :data:`_MOVES`, made by :func:`_move`."""

    QUEUED = "queued"  # waiting for a worker (its queue entry may be stale: skipped)
    RUNNING = "running"  # a worker decodes it
    REQUEUING = "requeuing"  # interrupted while running: queued again once it stops
    DROPPING = "dropping"  # interrupted while running: forgotten once it stops


_MOVES = {
    (Phase.QUEUED, Phase.RUNNING),  # a worker takes it (or a batch it joins)
    (Phase.RUNNING, Phase.REQUEUING),  # it makes room for a unit wanted now
    (Phase.RUNNING, Phase.DROPPING),  # its reader no longer wants it (a seek, a close)
    (Phase.REQUEUING, Phase.DROPPING),  # the same, while it makes room
    (Phase.DROPPING, Phase.REQUEUING),  # wanted again before it stopped
    (Phase.REQUEUING, Phase.QUEUED),  # stopped: back in its old place in the queue
}


@dataclass
class _Job:
    key: Hashable
    produce: Callable[[], Decoded]
    urgent: bool
    batch: Batch | None = None
    future: Future = field(default_factory=Future)
    phase: Phase = Phase.QUEUED
    pressing: bool = False  # wanted now, and nobody had asked for it: it decodes alone
    order: int | None = None  # its place in the queue, kept when it is queued again

    @property
    def started(self) -> bool:
        return self.phase is not Phase.QUEUED

    @property
    def stopping(self) -> bool:
        return self.phase in (Phase.REQUEUING, Phase.DROPPING)


def _move(job: _Job, phase: Phase) -> None:
    """Move ``job`` to ``phase`` (the scheduler's lock held): the one place phases change."""
    assert (job.phase, phase) in _MOVES, (job.key, job.phase, phase)
    job.phase = phase


def _shutting_down() -> EcdcError:
    return EcdcError("the decoder is shutting down")


def _failed(exc: BaseException) -> Future:
    """A future that has already failed with ``exc``."""
    future: Future = Future()
    future.set_exception(exc)
    return future


class DecodeScheduler:
    """Cache of decoded units plus the ``workers`` threads that fill it.

    A unit's samples never depend on how many workers there are (each decoder makes its
    decodes deterministic on its own); ``interrupts`` (None: never) stops the read-ahead
    decodes in flight when a unit wanted now is to decode alone (see the module docstring).
    """

    def __init__(
        self, capacity_bytes: int, workers: int = 1, interrupts: Interrupts | None = None
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.workers = workers
        # Counters since start (see stats()).
        self.decoded_count = 0  # units decoded
        self.started_count = 0  # decodes started (decoded, failed, interrupted or running)
        self.interrupted_count = 0  # read-ahead decodes interrupted
        self.hits = self.misses = 0  # requests answered from the cache, or not
        self._cache: LRUCache = LRUCache(maxsize=capacity_bytes, getsizeof=lambda f: f.nbytes)
        self._jobs: dict[Hashable, _Job] = {}
        self._queue: list[tuple[int, int, int, _Job]] = []  # (priority, place, push, job)
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closed = False
        self._interrupts = interrupts
        self._running: dict[int, list[_Job]] = {}  # worker thread -> the jobs it decodes
        self._idle = 0  # workers waiting for a job
        self._workers = [
            threading.Thread(target=self._run, name=f"ecdcfs-decoder-{n}", daemon=True)
            for n in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def request(
        self,
        key: Hashable,
        produce: Callable[[], Decoded],
        urgent: bool = True,
        batch: Batch | None = None,
    ) -> Future:
        """A future for unit ``key``, decoding it with ``produce`` unless cached or queued
        (after :meth:`close`, one that fails)."""
        with self._lock:
            if self._closed:
                return _failed(_shutting_down())
            cached = self._cache.get(key)
            if cached is not None:
                self.hits += 1
                done: Future = Future()
                done.set_result(cached)
                return done
            self.misses += 1
            job = self._jobs.get(key)
            if job is None:
                job = self._jobs[key] = _Job(key, produce, urgent, batch, pressing=urgent)
                self._push(job)
            elif urgent and not job.urgent:
                job.urgent = True
                if job.phase is Phase.DROPPING:
                    _move(job, Phase.REQUEUING)  # wanted after all: decode it again at once
                if not job.started:
                    self._push(job)  # the stale read-ahead entry is skipped when popped
            if urgent:
                self._make_room()
            return job.future

    def cancel(self, key: Hashable) -> None:
        """Drop a read-ahead request nobody is waiting for: unqueue it, or interrupt it."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.urgent:
                return
            if not job.started:
                job.future.cancel()
                del self._jobs[key]
                return
            if self._interrupts is None:
                return  # it runs to the end, and is cached
            for thread, jobs in self._running.items():
                if jobs[0] is job and len(jobs) == 1 and job.phase is not Phase.DROPPING:
                    self._interrupt(thread, job, Phase.DROPPING)

    def _make_room(self) -> None:
        """Interrupt read-ahead decodes: all of them while a pressing job waits to start,
        else the latest started while waiting urgent jobs outnumber the workers that are
        free or about to be."""
        if self._interrupts is None:
            return
        waiting = [job for job in self._jobs.values() if job.urgent and not job.started]
        victims = [
            (thread, jobs[0])
            for thread, jobs in reversed(self._running.items())  # latest started first
            if len(jobs) == 1 and not jobs[0].urgent and not jobs[0].stopping
        ]
        if not any(job.pressing for job in waiting):
            freeing = sum(1 for jobs in self._running.values() if jobs[0].stopping)
            victims = victims[: max(0, len(waiting) - self._idle - freeing)]
        for thread, job in victims:
            self._interrupt(thread, job, Phase.REQUEUING)

    def _interrupt(self, thread: int, job: _Job, then: Phase) -> None:
        """Stop ``thread``'s decode of ``job`` (lock held), then requeue or drop it."""
        assert self._interrupts is not None
        _move(job, then)
        self.interrupted_count += 1
        self._interrupts.interrupt(thread)

    def stats(self) -> dict[str, int]:
        """What the decoders have done since start (the mount's ``user.ecdcfs.stats``), by
        :data:`STATS_KEYS`."""
        with self._lock:
            counts = (self.decoded_count, self.started_count, self.interrupted_count)
            cache = (self.hits, self.misses, int(self._cache.currsize))
        return dict(zip(STATS_KEYS, counts + cache, strict=True))

    def is_cached(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._cache

    def close(self) -> None:
        """Fail the queued units at once, let the workers finish their decodes, stop them."""
        with self._lock:
            self._closed = True
            queued = [job for job in self._jobs.values() if not job.started]
            for job in queued:
                del self._jobs[job.key]
            self._wakeup.notify_all()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(_shutting_down())
        for worker in self._workers:
            worker.join(timeout=30)

    def _push(self, job: _Job) -> None:
        if job.order is None:
            job.order = next(self._order)
        priority = URGENT if job.urgent else READ_AHEAD
        heapq.heappush(self._queue, (priority, job.order, next(self._order), job))
        self._wakeup.notify()

    def _next_jobs(self, thread: int) -> list[_Job] | None:
        """The next job (with its batch companions) for worker ``thread``; None at close."""
        with self._lock:
            while True:
                self._idle += 1
                while not self._startable() and not self._closed:
                    self._wakeup.wait()
                self._idle -= 1
                if self._closed:
                    return None
                *_, job = heapq.heappop(self._queue)
                if not job.started and not job.future.cancelled():
                    _move(job, Phase.RUNNING)
                    jobs = self._running[thread] = [job, *self._companions(job)]
                    self.started_count += len(jobs)
                    return jobs

    def _startable(self) -> bool:
        """Whether a worker may pop the queue's first entry: read-ahead waits while a
        pressing job is queued or decoding (stale entries are popped and skipped)."""
        if not self._queue:
            return False
        priority, *_, job = self._queue[0]
        if priority == URGENT or job.started or job.future.cancelled():
            return True
        return not any(other.pressing for other in self._jobs.values())

    def _companions(self, job: _Job) -> list[_Job]:
        """Queued jobs that can share ``job``'s decode call, waiting ones first."""
        if job.batch is None or job.batch.size <= 1:
            return []
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
            _move(other, Phase.RUNNING)
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
                decoded: Sequence = jobs[ready[0]].batch.run(inputs)  # type: ignore[union-attr]
            except BaseException as exc:
                decoded = [exc] * len(ready)
            outcomes.update(zip(ready, decoded, strict=True))
        return [outcomes[position] for position in range(len(jobs))]

    def _run(self) -> None:
        thread = threading.get_ident()
        while (jobs := self._next_jobs(thread)) is not None:
            try:
                self._decode(thread, jobs)
            except Exception as exc:  # a decoder's bug: fail its readers, keep the worker
                log.exception("decoding units %s failed", [job.key for job in jobs])
                self._abandon(thread, jobs, exc)

    def _decode(self, thread: int, jobs: list[_Job]) -> None:
        """Decode ``jobs`` on worker ``thread`` and hand each reader its outcome."""
        started = time.perf_counter()
        outcomes = self._produce(jobs)
        elapsed = time.perf_counter() - started
        if self._settle_interrupted(thread, jobs[0], outcomes[0]):
            return
        for done, outcome in zip(jobs, outcomes, strict=True):
            self._finish(done, outcome, elapsed / len(jobs))

    def _abandon(self, thread: int, jobs: list[_Job], exc: Exception) -> None:
        """Fail the jobs of a decode that went wrong outside the decoder's own calls."""
        with self._lock:
            self._free(thread)
            for job in jobs:
                if self._jobs.get(job.key) is job:  # not finished or dropped before the bug
                    self._forget(job)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def _free(self, thread: int) -> None:
        """Worker ``thread`` decodes nothing now (lock held); its next call runs to the end."""
        self._running.pop(thread, None)
        if self._interrupts is not None:
            self._interrupts.clear(thread)

    def _settle_interrupted(self, thread: int, job: _Job, outcome: Decoded | BaseException) -> bool:
        """Free worker ``thread``; True if ``job`` failed because it was interrupted (it is
        then queued again or dropped, as the interruption said), False to finish it."""
        with self._lock:
            self._free(thread)
            if not job.stopping or not isinstance(outcome, BaseException):
                return False  # not interrupted, or it finished first: keep what it made
            log.debug("interrupted unit %s (%s)", job.key, job.phase.value)
            if job.phase is Phase.REQUEUING:
                _move(job, Phase.QUEUED)
                job.pressing = job.urgent  # needed while it was being stopped
                self._push(job)
                if job.pressing:
                    self._make_room()
            else:
                self._forget(job)
                job.future.cancel()
            return True

    def _finish(self, job: _Job, outcome: Decoded | BaseException, seconds: float) -> None:
        if isinstance(outcome, BaseException):
            with self._lock:
                self._forget(job)
            job.future.set_exception(outcome)
            return
        log.debug("decoded unit %s in %.3f s", job.key, seconds)
        with self._lock:
            self.decoded_count += 1
            if outcome.nbytes <= self.capacity_bytes:
                self._cache[job.key] = outcome
            self._forget(job)
        job.future.set_result(outcome)

    def _forget(self, job: _Job) -> None:
        """Drop finished ``job`` (lock held); read-ahead it held back may start now."""
        del self._jobs[job.key]
        if job.pressing:
            self._wakeup.notify_all()
