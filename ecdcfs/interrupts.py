"""Stopping a decode in progress on another thread, so that a read never waits behind
read-ahead (the scheduler interrupts; a decoder that can stop registers how).

Standard library only: the scheduler and the decoders both use it, and neither imports
the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Interrupts:
    """Per-thread interruption: :meth:`interrupt` a thread, which its running
    :meth:`stoppable` call notices, or its next one does before it starts.

    A thread stays interrupted until :meth:`clear`, so an interruption that arrives between
    two steps of one job is never lost, and never leaks into the next job.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stops: dict[int, Callable[[], None]] = {}  # thread -> how to stop its call
        self._interrupted: set[int] = set()

    def interrupt(self, thread: int) -> None:
        """Stop the call ``thread`` is making (if any) and the ones it starts until cleared."""
        with self._lock:
            self._interrupted.add(thread)
            stop = self._stops.get(thread)
        if stop is not None:
            stop()

    def clear(self, thread: int) -> None:
        """``thread`` starts other work: its calls run to the end again."""
        with self._lock:
            self._interrupted.discard(thread)

    @contextmanager
    def stoppable(self, stop: Callable[[], None]) -> Iterator[None]:
        """Run the block as this thread's stoppable call; ``stop()`` makes it end early
        (it then raises whatever the stopped call raises)."""
        thread = threading.get_ident()
        with self._lock:
            self._stops[thread] = stop
            interrupted = thread in self._interrupted
        if interrupted:
            stop()
        try:
            yield
        finally:
            with self._lock:
                self._stops.pop(thread, None)
