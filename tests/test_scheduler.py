"""The frame scheduler: decoded once, urgent first, GPU-style batches that keep errors apart."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ecdcfs.codec import DecodedFrame
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
