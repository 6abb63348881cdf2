"""What every group of measurements stands on: the plan (sizes and repetitions, full or
quick), a LocalCluster on loopback with a fabric on it, the arrays that get copied, and
the check that the run left nothing of its own in /dev/shm.

One thread per worker: a task's timings then see no other task of ours on its worker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client, LocalCluster

import datafabric
from datafabric.shm import PREFIX, SHM_DIR

MiB = 2**20
GiB = 2**30


@dataclass
class Plan:
    quick: bool
    sizes: list[int]  # put and get
    calls: int  # warm gets per repetition, fabric and raw view
    peer_calls: int  # warm gets per repetition, Ray and Vineyard (each costs an IPC round trip)
    small: int  # 1 KiB puts per system
    memory_bytes: int
    holders: tuple[int, ...]
    defrag_count: int  # 8 MiB variables inserted before every other one is deleted
    defrag_reps: int
    run_id: uuid.UUID = field(default_factory=uuid.uuid4)  # names this run's own baseline segments

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, [MiB, 64 * MiB, 256 * MiB], 2_000, 100, 2_000, 256 * MiB, (2, 4), 32, 5)
        return cls(False, [MiB, 64 * MiB, GiB], 10_000, 200, 10_000, GiB, (2, 4), 64, 10)

    def reps(self, nbytes: int) -> int:
        """Timed repetitions after one warm-up: more for small sizes, which are cheap and noisier."""
        if nbytes <= MiB:
            return 10 if self.quick else 20
        if nbytes <= 64 * MiB:
            return 5 if self.quick else 10
        return 3 if self.quick else 5

    def sum_calls(self, nbytes: int) -> int:
        return max(1, 64 * MiB // nbytes)


def size_label(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


@functools.lru_cache(maxsize=1)
def make_array(nbytes: int) -> np.ndarray:
    """A float64 array with every page touched, so that no timing pays for its faults.
    Cached (one per process), so rounds and tasks reuse it; nobody writes to it."""
    return np.arange(nbytes // 8, dtype=np.float64)


_fabric_ids: list[str] = []


@contextmanager
def local_cluster(n_workers: int) -> Iterator[tuple[LocalCluster, Client]]:
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # its HTTP server runs anyway: keep it on loopback
        ) as cluster,
        Client(cluster) as client,
    ):
        yield cluster, client
        _wind_down(client)


def _wind_down(client: Client) -> None:
    """Close without races logged as errors: the scheduler first forgets the keys the
    client dropped (their release travels on its own), and the workers ignore a heartbeat
    cut short by the close (dask/distributed#7105)."""
    deadline = time.monotonic() + 10
    while client.run_on_scheduler(_key_count) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.run(_ignore_failed_heartbeats)


def _key_count(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def _ignore_failed_heartbeats() -> None:
    logging.getLogger("distributed.worker").addFilter(
        lambda record: not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")
    )


@contextmanager
def fabric_on(client: Client, mb: float) -> Iterator[datafabric.Fabric]:
    fabric = datafabric.start(client, mb=mb)
    _fabric_ids.append(fabric.fabric_id)
    try:
        yield fabric
    finally:
        fabric.shutdown()


def workers(client: Client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def sweep_dev_shm(plan: Plan) -> list[str]:
    """Segments of this run's fabrics and baselines still in /dev/shm, unlinked now and
    returned, to be reported (a run stopped halfway can leave some).  Other fabrics on the
    machine are not ours to judge."""
    ours = tuple(f"{PREFIX}{i[:8]}_" for i in [*_fabric_ids, plan.run_id.hex])
    left = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(ours)) if os.path.isdir(SHM_DIR) else []
    for name in left:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    return left
