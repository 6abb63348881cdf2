"""A worker process under a nanny leaves SIGINT and SIGTERM to its nanny, for a while.

A signal sent to a whole process group (a terminal's Ctrl-C, systemd's stop, `timeout`,
``kill -TERM -PGID``) reaches a script's LocalCluster workers as well as the script.  A
worker process that died of it went without its teardown, and its nanny restarted it
while the script was shutting the fabric down: the shutdown reached no worker, and every
block was left in /dev/shm.

Such a worker needs neither signal at once: its nanny stops it through its stop queue and
SIGKILLs one that does not go, and it exits when its nanny's process ends (Dask watches
the parent's pipe).  So the signal is deferred: the worker exits as the signal would have
ended it only if it is still running ``GRACE`` seconds later (nobody stopped it; a
process at exit joining its children must not wait forever).  The handler is a Python
function, not SIG_IGN: an ignored signal would be inherited by every program a task
starts, which could then not be stopped; a handled one is reset by exec, and a forked
child gets the default back.  A worker with no nanny is the process a user signals to
stop it, and keeps its signals.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE = 30.0  # seconds: far longer than a script's shutdown of the fabric and its cluster


def leave_group_signals_to_the_nanny(has_nanny: bool) -> None:
    """Defer SIGINT and SIGTERM in a nanny's worker process (its main thread only can)."""
    if has_nanny and threading.current_thread() is threading.main_thread():
        for sig in GROUP_SIGNALS:
            signal.signal(sig, _defer)


def _defer(signum: int, frame: Any) -> None:
    timer = threading.Timer(GRACE, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()


def _defaults_in_child() -> None:
    """A process a task forks gets the signals' usual meaning back."""
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is _defer:
            signal.signal(sig, default)


os.register_at_fork(after_in_child=_defaults_in_child)
