"""Keep Dask from pausing, spilling or killing a worker for the fabric's shared pages.

Linux counts every shared page a process has touched in its RSS, and Dask compares RSS
with the worker's memory limit.  A worker owning a 4 GiB block, or reading a 4 GiB
variable, would be paused and then restarted although its own heap is small.  The
fabric's pages are not the worker's memory: both of Dask's monitors are made to see
RSS minus resident shared memory (``RssShmem``), the worker's through the measurement
hook Dask provides (``SystemMonitor.get_process_memory``), the nanny's by raising its
limit by exactly the amount that makes its check equivalent.
"""

from __future__ import annotations

import functools
from typing import Any

import psutil
from distributed.diagnostics.plugin import NannyPlugin


def resident_shared_bytes(pid: int) -> int:
    """Resident shared-memory (tmpfs/shm) bytes of a process; 0 where Linux's
    ``/proc/PID/status`` has no ``RssShmem`` line."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssShmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def private_rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss - resident_shared_bytes(proc.pid)


def exclude_shared_memory_in_worker(worker: Any) -> None:
    worker.monitor.get_process_memory = functools.partial(private_rss, worker.monitor.proc)


class SharedMemoryAwareNanny(NannyPlugin):
    """Makes the nanny restart a worker only when its private memory passes the limit."""

    name = "datafabric-memory"
    idempotent = True

    def setup(self, nanny: Any) -> None:
        manager = nanny.memory_manager
        periodic = nanny.periodic_callbacks.get("memory_monitor")
        if periodic is None or not manager.memory_limit or getattr(periodic, "_datafabric", False):
            return
        periodic.callback = functools.partial(_monitor, nanny, manager.memory_limit, periodic.callback)
        periodic._datafabric = True


def _monitor(nanny: Any, base_limit: int, check: Any) -> None:
    """Terminate iff rss > fraction * (base + shared / fraction), i.e. iff
    rss - shared > fraction * base: the nanny's own test, applied to private memory."""
    manager = nanny.memory_manager
    fraction = manager.memory_terminate_fraction
    process = getattr(nanny.process, "process", None)
    if fraction and process is not None and process.pid:
        manager.memory_limit = base_limit + int(resident_shared_bytes(process.pid) / fraction)
    check()
