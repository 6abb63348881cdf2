"""Dask counts touched shared pages in a worker's RSS; the fabric's blocks must not get a
healthy worker paused, spilled or restarted.  A fabric bigger than each worker's memory
limit, touched in full by its owner and by a reader, leaves both workers running."""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import dask
import numpy as np
import psutil
from distributed import Client

import datafabric
from tests.conftest import local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LIMIT = 300 * 2**20
BLOCK_MB = 400  # per worker, larger than LIMIT
NBYTES = 350 * 2**20


def insert_big(fabric, path):
    """From a file, read straight into shared memory: the worker's heap stays small."""
    with open(path, "rb") as f:
        fabric.insert("big", "bigger than the worker's memory limit", np.float64, f)
    return psutil.Process().memory_info().rss


def read_big_and_stay(fabric, seconds):
    view = fabric.get("big")
    total = float(view.sum())  # touches every page of the variable
    rss = psutil.Process().memory_info().rss
    time.sleep(seconds)  # the memory monitors run many times meanwhile
    return total, rss


def test_fabric_larger_than_memory_limit_pauses_and_kills_no_worker(tmp_path):
    path = tmp_path / "ones.f8"
    np.ones(NBYTES // 8).tofile(path)
    config = {"distributed.worker.memory.monitor-interval": "20ms"}
    with (
        dask.config.set(config),
        local_cluster(memory_limit=LIMIT) as cluster,
        Client(cluster) as client,
    ):
        a, b = sorted(client.scheduler_info()["workers"])
        pids = client.run(os.getpid)
        fabric = datafabric.start(client, mb=2 * BLOCK_MB)
        try:
            owner_rss = client.submit(insert_big, fabric, str(path), workers=[a]).result()
            total, reader_rss = client.submit(read_big_and_stay, fabric, 1.5, workers=[b]).result()
            assert total == NBYTES // 8
            # the test means something: plain RSS really is above the limit on both
            assert owner_rss > LIMIT and reader_rss > LIMIT
            time.sleep(0.5)
            assert client.run(os.getpid) == pids, "a worker was restarted"
            statuses = {w: info["status"] for w, info in client.scheduler_info()["workers"].items()}
            assert statuses == {a: "running", b: "running"}
            assert client.submit(lambda: 1, workers=[a]).result() == 1  # not paused
        finally:
            fabric.shutdown()


VIEW_LIMIT = 128 * 2**20
VIEWS = 8  # slices of 52.5 MiB: 420 MiB of views held by one worker, over 3x its limit


def touched_slice(fabric, i, rows):
    view = fabric.get("big")[i * rows : (i + 1) * rows]
    assert float(view.sum()) == view.size  # every page of the slice is touched in this process
    return view


def held_by(dask_worker):
    data = dask_worker.data
    return {
        "kinds": sorted({type(v).__name__ for v in data.fast.values()}),
        "managed": data.fast.total_weight,
        "spilled": len(data.slow),
        "rss": psutil.Process().memory_info().rss,
        "paused": dask_worker.status.name,
    }


def test_a_worker_holding_views_over_three_times_its_limit_is_not_paused_spilled_or_restarted(tmp_path):
    nbytes = 420 * 2**20
    path = tmp_path / "ones.f8"
    np.ones(nbytes // 8).tofile(path)
    rows = nbytes // 8 // VIEWS
    config = {"distributed.worker.memory.monitor-interval": "20ms"}
    with (
        dask.config.set(config),
        local_cluster(memory_limit=VIEW_LIMIT) as cluster,
        Client(cluster) as client,
    ):
        a, b = sorted(client.scheduler_info()["workers"])
        pids = client.run(os.getpid)
        fabric = datafabric.start(client, mb=2 * 450)
        try:
            client.submit(insert_big, fabric, str(path), workers=[a]).result()
            held = [client.submit(touched_slice, fabric, i, rows, workers=[b], pure=False) for i in range(VIEWS)]
            client.gather(held)
            time.sleep(1.5)  # the memory monitors run many times meanwhile
            seen = client.run(held_by, workers=[b])[b]
            assert seen["rss"] > 3 * VIEW_LIMIT  # the test means something: plain RSS is over 3x the limit
            assert seen["kinds"] == ["FabricView"] and seen["managed"] < 64 * 1024
            assert seen["spilled"] == 0 and seen["paused"] == "running"
            assert client.run(os.getpid) == pids, "a worker was restarted"
            assert client.submit(lambda: 1, workers=[b]).result() == 1  # not paused
            assert sum(float(v.sum()) for v in client.gather(held)) == nbytes // 8
            del held
        finally:
            fabric.shutdown()
