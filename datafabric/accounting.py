"""What a process's memory figures are made of: its own memory beside the fabric's pages.

Linux counts a shared page in the RSS of every process that touched it, and in the USS
(``psutil``'s unique set size) of a process that is the only one mapping it: a worker's
own pre-faulted block shows as that much USS in ``top`` and psutil, although it is not
the worker's heap.  ``/proc/PID/smaps`` says, per mapping, how much is resident and how
much of it is private to the process; the fabric's mappings are the ones of its
``dfab_`` segments in /dev/shm.  So, per process:

- ``private``: USS less the fabric pages counted in it: the process's own memory, what
  a copy of the data would add to;
- ``fabric_mapped``: resident pages of fabric blocks this process maps (the view bytes it
  has touched, and its own blocks if it owns some); ``fabric_pss`` is the same divided
  among the processes sharing each page.
"""

from __future__ import annotations

import os
from typing import Any, TypedDict

from datafabric.shm import PREFIX

_FIELDS = {b"Rss:": "rss", b"Pss:": "pss", b"Private_Clean:": "private", b"Private_Dirty:": "private"}


class ProcessMemory(TypedDict):
    pid: int
    rss: int  # what top shows as RES
    uss: int  # what psutil calls unique set size
    private: int  # uss less the fabric's pages
    fabric_mapped: int
    fabric_pss: int


def process_memory(pid: int | None = None) -> ProcessMemory:
    """The figures of process ``pid`` (this one by default), from ``/proc/PID/smaps``."""
    pid = os.getpid() if pid is None else pid
    total = {"rss": 0, "pss": 0, "private": 0}
    fabric = {"rss": 0, "pss": 0, "private": 0}
    in_fabric = False
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b" ")
            field = _FIELDS.get(key)
            if field is not None:
                kib = int(rest.split()[0]) * 1024
                total[field] += kib
                if in_fabric:
                    fabric[field] += kib
            elif not key.endswith(b":"):  # a mapping's header line: address range, ..., path
                fields = line.split()
                path = fields[5] if len(fields) >= 6 else b""  # then " (deleted)" if unlinked
                in_fabric = os.path.basename(path).startswith(PREFIX.encode())
    return {
        "pid": pid,
        "rss": total["rss"],
        "uss": total["private"],
        "private": total["private"] - fabric["private"],
        "fabric_mapped": fabric["rss"],
        "fabric_pss": fabric["pss"],
    }


def _worker_memory(dask_worker: Any) -> dict:
    from datafabric.node import worker_node

    return {"worker": dask_worker.address, "node": worker_node(dask_worker.address), **process_memory()}


class MemoryReport:
    """``Fabric.memory``: kept out of ``fabric.py`` (one job per module)."""

    def memory(self) -> list[dict]:
        """Per worker process: ``worker``, ``node``, ``pid``, ``rss``, ``uss``, ``private``
        (its own memory), ``fabric_mapped`` and ``fabric_pss`` (the fabric's shared pages
        it maps), in bytes; see ``datafabric.accounting``."""
        import distributed

        client = self._client or distributed.get_client(self.address)
        return sorted(client.run(_worker_memory).values(), key=lambda row: row["worker"])
