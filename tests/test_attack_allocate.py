"""Attacks on allocate's creation order (``yp/blocks.py`` ``_create``, docs "Creation
order"): all or none, a refusal stops its node's remaining blocks, nothing is left in
/dev/shm, a creator SIGKILLed half-way, and inserts racing an allocate.

Real worker processes and real shared memory; a worker plugin slows, refuses or kills
``create_block`` of the small blocks, so the large block of the same node already exists
in its owner while the allocate is still under way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

import datafabric
from datafabric.errors import FabricError, OutOfSpaceError, WorkerLostError
from datafabric.protocol import HANDLER_PREFIX, WORKER_PLUGIN, answering_refusals
from tests.conftest import fabric_segments, local_cluster
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
SMALL = 24 * MiB  # the allocate below makes one block above this and one below


class SlowSmallBlocks(WorkerPlugin):
    """``create_block`` of a block under ``SMALL`` waits ``delay`` seconds, then creates
    it (``then="create"``), refuses it as a machine short of memory would (``"refuse"``),
    or kills this worker once the segment exists, before answering (``"kill"``)."""

    name = "slow-small-blocks"

    def __init__(self, delay: float, then: str) -> None:
        self.delay, self.then = delay, then

    def setup(self, worker) -> None:
        op = f"{HANDLER_PREFIX}create_block"
        original = worker.handlers[op]

        async def create_block(**kwargs):
            if kwargs["size"] >= SMALL:
                return await original(**kwargs)
            await asyncio.sleep(self.delay)
            if self.then == "refuse":
                raise OutOfSpaceError(f"cannot reserve {kwargs['size']} bytes (refused by the test)")
            answer = await original(**kwargs)
            if self.then == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return answer

        worker.handlers[op] = answering_refusals(create_block)


def own_segments(fabric) -> list[str]:
    """This fabric's segments in /dev/shm (other fabrics may run beside the test's)."""
    return [s for s in fabric_segments() if s.startswith(f"dfab_{fabric.fabric_id[:8]}_")]


def own_block_sizes(dask_worker) -> list[int]:
    plugin = dask_worker.plugins[WORKER_PLUGIN]
    return sorted(b.allocator.size for b in plugin.blocks.values())


def insert_here(fabric, name: str, nbytes: int) -> str:
    """An insert by a task (its worker reserves in its own blocks first): the outcome."""
    data = np.random.default_rng(nbytes).random(nbytes // 8)
    try:
        fabric.insert(name, "", np.float64, data)
    except FabricError as exc:
        return type(exc).__name__
    return "inserted" if float(fabric.get(name).sum()) == float(data.sum()) else "wrong bytes"


def large_block_owner(client) -> str | None:
    sizes = client.run(own_block_sizes)
    return next((w for w, s in sizes.items() if s and s[-1] >= SMALL), None)


@pytest.mark.parametrize("then", ["create", "refuse"])
def test_an_insert_racing_an_allocate_is_never_refused_as_a_lost_block_and_leaves_nothing(then):
    """The node's large block exists in its owner before the allocate is over.  A task on
    that worker whose insert fits only there must not reserve in it before the YellowPages
    has confirmed it: the seal would be refused ("its node lost it"), and a refused
    allocate could not unlink a block with an insert in progress."""
    with local_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=8)
        before_segments, before_status = own_segments(fabric), fabric.status()
        client.register_plugin(SlowSmallBlocks(delay=3.0, then=then))
        outcome: list = []
        allocating = threading.Thread(target=lambda: outcome.append(_try(fabric.allocate, 96)))
        allocating.start()
        try:
            wait_for(lambda: large_block_owner(client) is not None, "the large block of the allocate")
            worker = large_block_owner(client)
            racing = client.submit(insert_here, fabric, "racing", 40 * MiB, workers=[worker], pure=False).result()
        finally:
            allocating.join()
        assert racing in ("inserted", "OutOfSpaceError"), f"an insert during an allocate ended as {racing}"
        if then == "refuse":
            assert isinstance(outcome[0], OutOfSpaceError), outcome
            wait_for(lambda: own_segments(fabric) == before_segments, "the refused allocate's blocks unlinked")
            assert [b["shm_id"] for b in fabric.status()] == [b["shm_id"] for b in before_status]
        else:
            assert not isinstance(outcome[0], BaseException), outcome
            assert len(fabric.status()) == len(before_status) + 2
        assert client.submit(insert_here, fabric, "after", 40 * MiB, workers=[worker], pure=False).result() == (
            "OutOfSpaceError" if then == "refuse" else "inserted"
        )
        fabric.shutdown()


def test_a_creator_killed_after_its_segment_exists_leaves_nothing_and_the_next_allocate_works():
    """The small block's creator is SIGKILLed once its segment is made, before it answers:
    the allocate is refused, its large block is unlinked, and the dead creator's segment is
    removed by whoever adopts its node (here its own restarted worker)."""
    with local_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=8)
        before = own_segments(fabric)
        client.register_plugin(SlowSmallBlocks(delay=0.0, then="kill"))
        started = time.monotonic()
        with pytest.raises(WorkerLostError):
            fabric.allocate(96)
        client.wait_for_workers(2)
        wait_for(lambda: own_segments(fabric) == before, f"segments left by the killed creator: {own_segments(fabric)}")
        assert time.monotonic() - started < 30
        client.unregister_worker_plugin(SlowSmallBlocks.name)
        client.restart()  # workers without the killing plugin, the fabric's blocks kept for them
        wait_for(lambda: client.run_on_scheduler(fabric_workers) == sorted(client.scheduler_info()["workers"]),
                 "the restarted workers registered with the fabric")  # fmt: skip
        fabric.allocate(96)
        assert client.submit(insert_here, fabric, "after", 40 * MiB, pure=False).result() == "inserted"
        fabric.shutdown()
        assert own_segments(fabric) == []


def fabric_workers(dask_scheduler) -> list[str]:
    live = dask_scheduler.plugins["datafabric-yellowpages"].members.live()
    return sorted(w for workers in live.values() for w in workers)


def _try(call, *args):
    try:
        return call(*args)
    except BaseException as exc:  # the thread's outcome, checked by the test
        return exc


def insert_many_here(fabric, prefix: str, count: int, nbytes: int) -> list[str]:
    return [insert_here(fabric, f"{prefix}/{i}", nbytes) for i in range(count)]


def test_concurrent_allocates_racing_task_inserts_all_succeed_and_every_insert_reads_back(client):
    """Three allocates at once (they take turns) while tasks on both workers insert 3 MiB
    variables that fit only in the blocks being made: every allocate adds its blocks, every
    insert is either readable with its bytes or refused for want of room, and the blocks add
    up to what was asked."""
    fabric = datafabric.start(client, mb=8)
    try:
        inserting = [
            client.submit(insert_many_here, fabric, f"w{k}", 40, 3 * MiB, workers=[w], pure=False)
            for k, w in enumerate(sorted(client.scheduler_info()["workers"]))
        ]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            allocated = list(pool.map(fabric.allocate, [32, 48, 64]))
        outcomes = [o for f in inserting for o in f.result()]
        assert set(outcomes) <= {"inserted", "OutOfSpaceError"}, outcomes
        assert [len(a) for a in allocated] == [2, 2, 2]
        sizes = sum(b["size"] for b in fabric.status())
        assert sizes == (8 + 32 + 48 + 64) * MiB
    finally:
        fabric.shutdown()


class RefuseLargeBlocks(WorkerPlugin):
    """``create_block`` of a block of ``SMALL`` or more is refused as a machine short of
    memory would refuse it; every call is counted on the worker."""

    name = "refuse-large-blocks"

    def setup(self, worker) -> None:
        op = f"{HANDLER_PREFIX}create_block"
        original = worker.handlers[op]
        worker._attack_creates = 0

        async def create_block(**kwargs):
            worker._attack_creates += 1
            if kwargs["size"] >= SMALL:
                raise OutOfSpaceError(f"cannot reserve {kwargs['size']} bytes (refused by the test)")
            return await original(**kwargs)

        worker.handlers[op] = answering_refusals(create_block)


def test_a_refused_large_block_stops_its_node_s_small_blocks_before_they_are_tried():
    """Three workers of one node: the large block is asked for first and refused, so the two
    small ones are never asked for (in parallel they would have taken their pages while the
    large one was being refused); nothing is left and the blocks are as before."""
    with local_cluster(n_workers=3) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=8)
        before_segments, before_status = own_segments(fabric), fabric.status()
        client.register_plugin(RefuseLargeBlocks())
        with pytest.raises(OutOfSpaceError):
            fabric.allocate(96)
        tries = client.run(lambda dask_worker: dask_worker._attack_creates)
        assert sorted(tries.values()) == [0, 0, 1], f"create_block calls per worker: {tries}"
        assert own_segments(fabric) == before_segments
        assert fabric.status() == before_status
        fabric.shutdown()
