"""The frame scheduler: decoded once, urgent first and never behind or beside read-ahead
(interrupted, and held back, while a unit wanted now decodes), GPU-style batches that keep
errors apart."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from ecdcfs.container import EcdcError
from ecdcfs.decoder import DecodedFrame
from ecdcfs.interrupts import Interrupts
from ecdcfs.scheduler import Batch, DecodeScheduler


def frame(value: float) -> DecodedFrame:
    return DecodedFrame(np.full((1, 4), value, dtype=np.float32))


@pytest.fixture
def scheduler():
    scheduler = DecodeScheduler(capacity_bytes=1 << 20)
    yield scheduler
    scheduler.close()


def block_worker(scheduler: DecodeScheduler) -> threading.Event:
    """Occupy the worker until the returned event is set, so requests queue up."""
    release, running = threading.Event(), threading.Event()

    def hold() -> DecodedFrame:
        running.set()
        release.wait(30)
        return frame(-1)

    scheduler.request("blocker", hold)
    assert running.wait(30)
    return release


def test_same_key_is_decoded_once(scheduler):
    calls = []
    release = block_worker(scheduler)
    futures = [scheduler.request("k", lambda: calls.append(1) or frame(1)) for _ in range(5)]
    release.set()
    assert all(f.result(30).audio[0, 0] == 1 for f in futures)
    assert scheduler.request("k", lambda: frame(2)).result(30).audio[0, 0] == 1  # cached
    assert calls == [1]


def test_batches_group_jobs_and_isolate_failures(scheduler):
    runs: list[list] = []

    def run(inputs: list) -> list[DecodedFrame]:
        runs.append(inputs)
        return [frame(x) for x in inputs]

    def failing() -> float:
        raise ValueError("bad frame")

    def request(key, group: str, inputs, urgent: bool):
        # A job decoded alone goes through the same run, as AudioFile's jobs do.
        batch = Batch(group, 3, inputs, run)
        return scheduler.request(key, lambda: run([inputs()])[0], urgent, batch)

    release = block_worker(scheduler)
    futures = {}
    for i in range(5):
        inputs = failing if i == 2 else (lambda i=i: float(i))
        futures[i] = request(("a", i), "group-a", inputs, urgent=False)
    futures["b"] = request(("b", 0), "group-b", lambda: 7.0, urgent=True)
    release.set()
    assert futures["b"].result(30).audio[0, 0] == 7.0
    for i in (0, 1, 3, 4):
        assert futures[i].result(30).audio[0, 0] == float(i)
    with pytest.raises(ValueError, match="bad frame"):
        futures[2].result(30)
    assert all(len(inputs) <= 3 for inputs in runs)
    assert sorted(x for inputs in runs for x in inputs) == [0.0, 1.0, 3.0, 4.0, 7.0]
    assert [7.0] in runs  # the urgent job of another group did not wait for group a


def test_cancelled_read_ahead_is_not_decoded(scheduler):
    calls = []
    release = block_worker(scheduler)
    scheduler.request("ahead", lambda: calls.append("ahead") or frame(1), urgent=False)
    scheduler.cancel("ahead")
    done = scheduler.request("now", lambda: calls.append("now") or frame(2))
    release.set()
    done.result(30)
    assert calls == ["now"]


class StoppableWork:
    """A fake decode that runs until released or stopped through ``Interrupts``."""

    def __init__(self, interrupts: Interrupts, value: float) -> None:
        self.interrupts, self.value = interrupts, value
        self.running, self.release = threading.Event(), threading.Event()
        self.stopped = threading.Event()
        self.calls = 0

    def __call__(self) -> DecodedFrame:
        self.calls += 1
        with self.interrupts.stoppable(self.stopped.set):
            self.running.set()
            while not (self.release.is_set() or self.stopped.is_set()):
                time.sleep(0.001)
            if self.stopped.is_set():
                self.stopped.clear()
                raise RuntimeError("stopped")  # as onnxruntime's terminated run raises
        return frame(self.value)


def wait_for(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def running_read_ahead(scheduler, interrupts, *keys) -> list[StoppableWork]:
    """Read-ahead decodes of ``keys``, started one after the other and running."""
    works = []
    for value, key in enumerate(keys, 1):
        work = StoppableWork(interrupts, value)
        scheduler.request(key, work, urgent=False)
        assert work.running.wait(10)
        works.append(work)
    return works


@pytest.fixture
def two_workers():
    interrupts = Interrupts()
    scheduler = DecodeScheduler(capacity_bytes=1 << 20, workers=2, interrupts=interrupts)
    yield scheduler, interrupts
    scheduler.close()


def test_urgent_work_decodes_alone_every_read_ahead_is_interrupted_and_requeued(two_workers):
    scheduler, interrupts = two_workers
    early, late = running_read_ahead(scheduler, interrupts, "early", "late")
    urgent = StoppableWork(interrupts, 3)
    urgent_future = scheduler.request("urgent", urgent)
    assert urgent.running.wait(10)
    assert wait_for(lambda: scheduler.interrupted_count == 2)  # both, not only one
    time.sleep(0.2)
    assert early.calls == late.calls == 1  # queued again, but not started beside it
    urgent.release.set()
    assert urgent_future.result(10).audio[0, 0] == 3
    assert wait_for(lambda: early.calls == late.calls == 2)  # restarted once it is done
    early.release.set()
    late.release.set()
    assert scheduler.request("early", early).result(10).audio[0, 0] == 1
    assert scheduler.request("late", late).result(10).audio[0, 0] == 2


def test_urgent_work_decodes_alone_even_with_a_free_worker(two_workers):
    scheduler, interrupts = two_workers
    ahead = StoppableWork(interrupts, 1)
    future = scheduler.request("ahead", ahead, urgent=False)
    assert ahead.running.wait(10)
    assert scheduler.request("urgent", lambda: frame(3)).result(10).audio[0, 0] == 3
    assert scheduler.interrupted_count == 1
    assert wait_for(lambda: ahead.calls == 2)
    ahead.release.set()
    assert future.result(10).audio[0, 0] == 1


def test_read_ahead_waits_while_urgent_work_decodes(two_workers):
    scheduler, interrupts = two_workers
    urgent, ahead = StoppableWork(interrupts, 1), StoppableWork(interrupts, 2)
    urgent_future = scheduler.request("urgent", urgent)
    assert urgent.running.wait(10)
    ahead_future = scheduler.request("ahead", ahead, urgent=False)
    assert not ahead.running.wait(0.2)  # a worker is free, and it still waits
    other = scheduler.request("other", lambda: frame(3))  # urgent work does not wait
    assert other.result(10).audio[0, 0] == 3
    assert not ahead.running.is_set()
    urgent.release.set()
    assert urgent_future.result(10).audio[0, 0] == 1
    assert ahead.running.wait(10)
    ahead.release.set()
    assert ahead_future.result(10).audio[0, 0] == 2
    assert scheduler.interrupted_count == 0


def test_needing_running_read_ahead_interrupts_nothing(two_workers):
    # Sequential reads: the reader catches up with read-ahead in flight, which becomes
    # urgent; the next read-ahead beside it keeps decoding.
    scheduler, interrupts = two_workers
    first, second = running_read_ahead(scheduler, interrupts, "first", "second")
    needed = scheduler.request("first", first)
    first.release.set()
    assert needed.result(10).audio[0, 0] == 1
    second.release.set()
    assert scheduler.request("second", second).result(10).audio[0, 0] == 2
    assert scheduler.interrupted_count == 0 and first.calls == second.calls == 1
    follow = StoppableWork(interrupts, 4)  # read-ahead queued after it starts at once
    scheduler.request("follow", follow, urgent=False)
    assert follow.running.wait(10)
    follow.release.set()


def test_cancelling_running_read_ahead_stops_it_and_drops_it(two_workers):
    scheduler, interrupts = two_workers
    ahead = StoppableWork(interrupts, 1)
    future = scheduler.request("ahead", ahead, urgent=False)
    assert ahead.running.wait(10)
    scheduler.cancel("ahead")
    with pytest.raises(CancelledError):
        future.result(10)
    assert ahead.calls == 1 and not scheduler.is_cached("ahead")
    again = scheduler.request("ahead", lambda: frame(5))  # a fresh request decodes it anew
    assert again.result(10).audio[0, 0] == 5


def test_read_ahead_that_becomes_urgent_while_running_is_never_interrupted(two_workers):
    scheduler, interrupts = two_workers
    first, second = running_read_ahead(scheduler, interrupts, "first", "second")
    needed = scheduler.request("second", second)  # a reader now waits for it
    scheduler.cancel("second")  # and a cancel from another reader's window is ignored
    urgent = scheduler.request("urgent", lambda: frame(3))
    assert urgent.result(10).audio[0, 0] == 3
    assert second.calls == 1  # "first" was the one interrupted
    second.release.set()
    first.release.set()
    assert needed.result(10).audio[0, 0] == 2


def test_an_interruption_before_the_stoppable_call_starts_is_not_lost():
    interrupts = Interrupts()
    thread = threading.get_ident()
    interrupts.interrupt(thread)  # the job has started, its decode call not yet
    stopped = []
    with interrupts.stoppable(lambda: stopped.append(True)):
        assert stopped == [True]
    interrupts.clear(thread)  # the next job runs to the end
    with interrupts.stoppable(lambda: stopped.append(False)):
        pass
    assert stopped == [True]


def test_without_interrupts_running_read_ahead_finishes_and_is_cached(scheduler):
    release = threading.Event()
    running = threading.Event()

    def slow() -> DecodedFrame:
        running.set()
        release.wait(10)
        return frame(7)

    future = scheduler.request("ahead", slow, urgent=False)
    assert running.wait(10)
    scheduler.cancel("ahead")  # a seek: nothing to stop it with
    release.set()
    assert future.result(10).audio[0, 0] == 7 and wait_for(lambda: scheduler.is_cached("ahead"))


def test_queued_read_ahead_a_reader_needs_is_not_pressing(two_workers):
    # Two readers: each catches up with its own queued read-ahead. That frees a worker
    # (the latest read-ahead is interrupted), but holds nothing back for good.
    scheduler, interrupts = two_workers
    first, second = running_read_ahead(scheduler, interrupts, "first", "second")
    queued = StoppableWork(interrupts, 3)
    scheduler.request("queued", queued, urgent=False)
    needed = scheduler.request("queued", queued)
    assert queued.running.wait(10)
    assert scheduler.interrupted_count == 1 and first.calls == 1  # only "second" stopped
    queued.release.set()
    assert needed.result(10).audio[0, 0] == 3
    assert wait_for(lambda: second.calls == 2)  # restarted: nothing pressing is left
    first.release.set()
    second.release.set()


def test_interrupted_read_ahead_resumes_before_later_read_ahead(two_workers):
    scheduler, interrupts = two_workers
    ahead = {n: StoppableWork(interrupts, n) for n in (1, 2, 3, 4)}
    for n, work in ahead.items():
        scheduler.request(n, work, urgent=False)
    assert ahead[1].running.wait(10) and ahead[2].running.wait(10)
    assert scheduler.request("seek", lambda: frame(9)).result(10).audio[0, 0] == 9
    assert wait_for(lambda: ahead[1].calls == ahead[2].calls == 2)  # in their old places
    assert ahead[3].calls == ahead[4].calls == 0
    for work in ahead.values():
        work.release.set()


def test_read_ahead_needed_while_being_stopped_decodes_alone(two_workers):
    scheduler, interrupts = two_workers
    wanted, other = running_read_ahead(scheduler, interrupts, "wanted", "other")
    scheduler.cancel("wanted")  # a seek's cancel and another reader's read, back to back
    future = scheduler.request("wanted", wanted)  # (either before or after it has stopped)
    assert wait_for(lambda: wanted.calls == 2)  # decoded again at once
    assert wait_for(lambda: scheduler.interrupted_count == 2)  # and "other" made room
    time.sleep(0.2)
    assert other.calls == 1  # held back while it decodes
    wanted.release.set()
    assert future.result(10).audio[0, 0] == 1
    assert wait_for(lambda: other.calls == 2)
    other.release.set()


def test_a_failed_urgent_decode_releases_the_read_ahead_it_held_back(two_workers):
    scheduler, interrupts = two_workers
    urgent = StoppableWork(interrupts, 1)
    failing = scheduler.request("urgent", urgent)
    assert urgent.running.wait(10)
    ahead = [StoppableWork(interrupts, n) for n in (2, 3)]
    for n, work in enumerate(ahead):
        scheduler.request(n, work, urgent=False)
    interrupts.interrupt(next(iter(scheduler._running)))  # its decode raises
    with pytest.raises(RuntimeError):
        failing.result(10)
    assert all(work.running.wait(10) for work in ahead)  # both workers, not one
    for work in ahead:
        work.release.set()


def test_a_decoder_bug_fails_its_readers_and_keeps_the_worker(scheduler):
    def wrong_batch(inputs: list) -> list:
        return []  # fewer units than jobs

    batch = Batch("group", 2, lambda: 0.0, wrong_batch)
    release = block_worker(scheduler)
    futures = [scheduler.request(n, lambda: frame(0), batch=batch) for n in range(2)]
    release.set()
    for future in futures:
        with pytest.raises(ValueError):
            future.result(10)
    assert scheduler.request("next", lambda: frame(5)).result(10).audio[0, 0] == 5


def test_a_pressing_decode_that_hits_a_bug_releases_the_read_ahead_it_held_back(two_workers):
    scheduler, interrupts = two_workers
    release = threading.Event()

    def not_a_frame() -> object:
        release.wait(10)
        return object()  # a decoder bug: caching it fails, outside the decoder's call

    failing = scheduler.request("seek", not_a_frame)
    ahead = StoppableWork(interrupts, 2)
    ahead_future = scheduler.request("ahead", ahead, urgent=False)
    assert not ahead.running.wait(0.2)  # held back while the seek decodes
    release.set()
    with pytest.raises(AttributeError):
        failing.result(10)
    assert ahead.running.wait(10)  # the abandoned seek holds nothing back
    ahead.release.set()
    assert ahead_future.result(10).audio[0, 0] == 2


def test_closing_fails_queued_work_and_later_requests_instead_of_hanging():
    scheduler = DecodeScheduler(capacity_bytes=1 << 20)
    release = block_worker(scheduler)
    queued = scheduler.request("queued", lambda: frame(1))
    closing = threading.Thread(target=scheduler.close)
    closing.start()
    with pytest.raises(EcdcError, match="shutting down"):
        queued.result(5)  # at once, not after the running decode
    release.set()
    closing.join(30)
    with pytest.raises(EcdcError, match="shutting down"):
        scheduler.request("later", lambda: frame(2)).result(5)


def test_counters_say_what_was_decoded_started_and_found_in_the_cache(scheduler):
    """What the mount's ``user.ecdcfs.stats`` reports: a request for a unit that is queued
    or decoding is a miss that shares its decode; one for a cached unit is a hit."""
    release = block_worker(scheduler)
    first = scheduler.request("a", lambda: frame(1))
    same = scheduler.request("a", lambda: frame(1))
    release.set()
    assert first.result(30) is same.result(30)
    scheduler.request("a", lambda: frame(2)).result(30)
    failing = scheduler.request("b", lambda: (_ for _ in ()).throw(EcdcError("bad")))
    with pytest.raises(EcdcError):
        failing.result(30)
    stats = scheduler.stats()
    assert stats == {
        "units_decoded": 2,  # the blocker and "a"
        "decodes_started": 3,  # and "b", which failed
        "decodes_interrupted": 0,
        "cache_hits": 1,
        "cache_misses": 4,
        "cache_bytes": 2 * frame(0).nbytes,
    }
