"""When a worker's local reads reach the YellowPages: on the event loop, never from the read.

A task's local lease notes its use for the eviction order (``LocalReads``) and asks for a
report with ``later``.  Waking the event loop from the read would hand the interpreter lock
to the loop thread in the middle of the task (tens of µs), so the report waits: for the end
of the reading task (Dask calls the plugin's ``transition`` on the loop before it sends the
task's result, so the note travels ahead of it, in the same batch), or a second at most
(reads outside tasks).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from tornado.ioloop import PeriodicCallback

# A task leaving these has stopped running.  A task cancelled while it runs is "cancelled"
# until its thread returns, and "resumed" if the scheduler wants it back meanwhile: it then
# ends by sending its result, so its reads must be counted before it as any task's are.
_RAN = frozenset({"executing", "long-running", "cancelled", "resumed"})


class UseReports:
    """The reports due on one worker, each run as ``report(send)`` with the worker's
    stream's own ``send``, which puts the message on the stream at once."""

    def __init__(self, worker: Any, every_s: float, key: str) -> None:
        self._worker = worker
        self._due: collections.deque[Callable[..., None]] = collections.deque()
        self.later: Callable[[Callable[..., None]], None] = self._due.append  # any thread: atomic
        self._flush = PeriodicCallback(self.run, every_s * 1000)  # reads outside tasks
        self._flush.start()  # stopped by ``stop`` (Dask stops it with the worker otherwise)
        worker.periodic_callbacks[key] = self._flush

    def stop(self) -> None:
        """At the plugin's teardown: what is due goes now (Dask removes plugins before it
        closes the worker's stream), not lost with the second it would have waited."""
        self._flush.stop()
        self.run()

    def transitioned(self, start: str) -> None:
        """On the loop, at every task transition; runs what is due only as a task stops
        running, so the notes leave in the same batch as its result.  Sent at any other
        transition (a task arriving while one runs), each went alone: one more write, and
        one more batch for the scheduler (in ``ds.to_dask().sum()`` of 2 GiB, the fabric's
        CPU beyond the persisted array's went from 37 to 21 ms a sum).  Costs one test or
        two when nothing is due."""
        if self._due and start in _RAN:
            self.run()

    def run(self) -> None:
        try:
            while self._due:
                self._due.popleft()(self._worker.batched_stream.send)
        except (OSError, AttributeError):
            pass  # worker closing (its stream closed): what it would report no longer matters
