"""The one way the tests wait for something that happens in another process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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
