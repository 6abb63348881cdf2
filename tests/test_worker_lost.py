"""A worker killed (SIGKILL) under a call: the caller gets a ``WorkerLostError`` naming
the call, not Dask's ``CommClosedError``."""

from __future__ import annotations

import os
import time

import dask
import pytest
from distributed import Client

import datafabric
from datafabric import errors
from tests.conftest import local_cluster
from tests.waiting import kill_and_wait


def test_a_worker_killed_under_a_call_is_a_worker_lost_error():
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "3s"}),  # a dead worker refuses at once
        local_cluster() as cluster,
        Client(cluster) as client,
    ):
        fabric = datafabric.start(client, mb=8)
        try:
            pids = client.run(os.getpid)
            victim = sorted(pids)[0]
            ctx = fabric._ctx()
            shm_id = next(b["shm_id"] for b in fabric.status() if b["worker"] == victim)
            assert ctx.call_worker(victim, "block_stats", shm_id=shm_id)  # the connection is open now
            kill_and_wait(pids[victim])
            time.sleep(0.2)
            with pytest.raises(errors.WorkerLostError, match="'block_stats' call to worker") as lost:
                ctx.call_worker(victim, "block_stats", shm_id=shm_id)
            assert isinstance(lost.value, OSError)  # existing `except OSError` clauses still hold
        finally:
            fabric.shutdown()
