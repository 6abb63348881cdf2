"""A Dask worker preload for the embedded cluster of ``datafabric start``: the worker
process ignores SIGINT and SIGTERM.

A signal sent to the whole process group (a terminal's Ctrl-C, systemd's stop, `timeout`,
``kill -TERM -PGID``) reaches the workers as well as ``start``.  A worker that died of it
would be restarted by its nanny while ``start`` is shutting the fabric down, so the
shutdown reached no worker and every block was left in /dev/shm.  Ignoring the group's
signal leaves the ending to ``start``, which shuts the fabric down and then closes its
workers through their nannies (and SIGKILLs one that does not close).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

PRELOAD = __name__
SHIELDED = (signal.SIGINT, signal.SIGTERM)


def dask_setup(worker: Any) -> None:
    """Runs in the worker process, in its main thread, before it registers."""
    if threading.current_thread() is threading.main_thread():
        for sig in SHIELDED:
            signal.signal(sig, signal.SIG_IGN)
