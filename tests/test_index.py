"""``CodeIndex.wait``: how a caller (the indexing bar) waits for a unit without the lock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ecdcfs.container import EcdcError
from ecdcfs.index import CodeIndex

CODES = np.zeros((2, 150), np.uint16)


def test_wait_returns_at_once_for_an_indexed_unit():
    index = CodeIndex(3)
    index.append(None, CODES, 10)
    began = time.monotonic()
    assert index.wait(0, timeout=5)
    assert time.monotonic() - began < 1


def test_wait_times_out_without_progress():
    index = CodeIndex(3)
    began = time.monotonic()
    assert not index.wait(0, timeout=0.2)
    assert 0.15 < time.monotonic() - began < 2
    assert index.error is None


def test_wait_wakes_when_the_builder_reaches_the_unit():
    index = CodeIndex(3)

    def build() -> None:
        for offset in (10, 20):
            time.sleep(0.05)
            index.append(1.0, CODES, offset)

    threading.Thread(target=build).start()
    began = time.monotonic()
    assert index.wait(1, timeout=30)
    assert time.monotonic() - began < 10
    assert len(index) == 2 and index.next_offset == 20


def test_wait_returns_false_at_once_when_indexing_fails():
    index = CodeIndex(3)
    threading.Timer(0.05, index.fail, [EcdcError("bad codes")]).start()
    began = time.monotonic()
    assert not index.wait(2, timeout=30)
    assert time.monotonic() - began < 10
    assert str(index.error) == "bad codes"


def test_get_still_waits_and_raises_the_failure():
    index = CodeIndex(2)
    threading.Timer(0.05, index.append, [None, CODES, 5]).start()
    assert index.get(0).codes.shape == CODES.shape
    index.fail(EcdcError("truncated"))
    with pytest.raises(EcdcError, match="truncated"):
        index.get(1)
