"""A worker process under a nanny leaves SIGINT and SIGTERM to its nanny's process.

A signal sent to a whole process group (a terminal's Ctrl-C, systemd's stop, `timeout`,
``kill -TERM -PGID``) reaches a script's LocalCluster workers as well as the script.  A
worker process that died of it went without its teardown, and its nanny restarted it
while the script was shutting the fabric down: the shutdown reached no worker, and every
block was left in /dev/shm.

Such a worker needs neither signal: its nanny stops it through its stop queue and
SIGKILLs one that does not go, and it exits at once when its nanny's process ends (Dask
watches the parent's pipe).  So ignoring them leaves the ending to the process that owns
the cluster, which shuts the fabric down before it closes the workers.  A worker with no
nanny is the process a user signals to stop it, and keeps its signals.
"""

from __future__ import annotations

import signal
import threading

GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def leave_group_signals_to_the_nanny(has_nanny: bool) -> None:
    """Ignore SIGINT and SIGTERM in a nanny's worker process (its main thread only can)."""
    if has_nanny and threading.current_thread() is threading.main_thread():
        for sig in GROUP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
