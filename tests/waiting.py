"""The one way the tests wait for something that happens in another process, and for a
process they killed to be gone."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    what: str = "the condition",
    timeout: float = 60.0,
    *,
    ignoring: tuple[type[BaseException], ...] = (),
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something true, and return that; fail naming
    ``what`` after ``timeout`` s.  ``ignoring``: errors a predicate may raise while the
    thing is not ready yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := predicate():
                return value
        except ignoring:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def kill_and_wait(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL ``pid`` and wait until it is gone.  The process is looked up before the
    signal: its nanny may reap it at once, and a lookup after would find no such process."""
    process = psutil.Process(pid)
    os.kill(pid, signal.SIGKILL)
    process.wait(timeout=timeout)


def results_released(client, worker: str) -> None:
    """Wait until the scheduler holds no task result on ``worker``, the client having
    dropped the futures of the tasks it ran there.  Dask runs a task again elsewhere when
    the worker holding its result dies while the result is still wanted, and a task that
    keeps views in its worker (a test's ``hold``) run again on another worker keeps them
    for good; a test that kills the worker next waits for this first."""
    wait_for(lambda: not client.run_on_scheduler(_results_on, worker), f"the results held on {worker} released")


def _results_on(worker: str, dask_scheduler=None) -> list:
    state = dask_scheduler.workers.get(worker)
    return [] if state is None else [task.key for task in state.has_what]
