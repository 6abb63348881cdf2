"""A Dask worker preload for the embedded cluster of ``datafabric start``: the worker
process defers SIGINT and SIGTERM from the moment it starts.

The fabric's worker plugin does the same in every nanny's worker process
(``worker_plugin/signals.py`` says why), but only once the plugin is set up; a signal to
``start``'s process group while a worker is still starting would kill that worker, and its
nanny would restart it while ``start`` shuts the fabric down.
"""

from __future__ import annotations

from typing import Any

from worker_plugin.signals import leave_group_signals_to_the_nanny

PRELOAD = __name__


def dask_setup(worker: Any) -> None:
    """Runs in the worker process, in its main thread, before it registers."""
    leave_group_signals_to_the_nanny(has_nanny=True)  # the embedded cluster's workers all have one
