"""Attacks on blocks created closed (``yp/blocks.py`` ``allocate``, docs "Creation order"):
the owner of a node's large block SIGKILLed at each stage of the allocate (after it answered,
while the node's small block is still being made) with the allocate then refused or
accepted, and inserts from tasks and from the client racing it.  All or none: a refused
allocate leaves no block in the fabric and no segment in /dev/shm, whoever died; nothing
sealed is lost.

Real worker processes (with nannies, which restart a killed worker) and real shared memory;
``SlowSmallBlocks`` (``tests/test_attack_allocate.py``) holds back the small block.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
import zlib

import cloudpickle
import numpy as np
import pytest
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

import datafabric
from datafabric.errors import FabricError, OutOfSpaceError
from datafabric.protocol import HANDLER_PREFIX
from tests.conftest import SHM_DIR, local_cluster
from tests.test_attack_allocate import (
    SMALL,
    SlowSmallBlocks,
    _try,
    fabric_workers,
    large_block_owner,
    own_segments,
)
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20


def values(name: str, nbytes: int) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(name.encode())).random(nbytes // 8)


def insert_checked(fabric, name: str, nbytes: int) -> str:
    """An insert (a task's: its worker reserves in its own blocks first), then a get of it:
    the outcome."""
    data = values(name, nbytes)
    try:
        fabric.insert(name, "", np.float64, data)
    except FabricError as exc:
        return type(exc).__name__
    return "inserted" if np.array_equal(fabric.get(name), data) else "wrong bytes"


def kill_me() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class removing_own_segments(contextlib.AbstractContextManager):
    """Whatever the test's fabric left in /dev/shm is removed at the end, once its checks
    have run (a failing check must not fail every later test of the session too)."""

    fabric = None

    def __exit__(self, *exc: object) -> None:
        for name in own_segments(self.fabric) if self.fabric is not None else []:
            os.unlink(os.path.join(SHM_DIR, name))


def back_to_two(client, fabric) -> None:
    client.wait_for_workers(2)
    wait_for(
        lambda: client.run_on_scheduler(fabric_workers) == sorted(client.scheduler_info()["workers"]),
        "the restarted worker registered with the fabric",
    )


@pytest.mark.parametrize("then", ["refuse", "create"])
def test_the_large_block_s_owner_killed_after_answering_leaves_all_or_none(then):
    """The large block exists and its creator has answered; it is SIGKILLed while the small
    block is still being made, and inserts race from a task of the other worker and from the
    client.  Refused: no block of the allocate stays in the fabric, and its segment does not
    stay in /dev/shm (nor come back as a block when the killed worker's successor lists its
    node's segments).  Accepted: the orphaned large block is adopted and usable.  Every
    insert that returned reads back its bytes."""
    with removing_own_segments() as own, local_cluster() as cluster, Client(cluster) as client:
        fabric = own.fabric = datafabric.start(client, mb=8)
        client.run(lambda: None)  # every worker up before the plugin goes in
        before_segments, before_ids = own_segments(fabric), sorted(b["shm_id"] for b in fabric.status())
        client.register_plugin(SlowSmallBlocks(delay=3.0, then=then))
        outcome: list = []
        allocating = threading.Thread(target=lambda: outcome.append(_try(fabric.allocate, 96)))
        allocating.start()
        try:
            victim = wait_for(lambda: large_block_owner(client), "the large block of the allocate")
            other = next(w for w in client.scheduler_info()["workers"] if w != victim)
            racing = [client.submit(insert_checked, fabric, f"task/{i}", MiB, workers=[other], pure=False)
                      for i in range(4)]  # fmt: skip
            client.submit(kill_me, workers=[victim], pure=False)
            wait_for(lambda: victim not in client.scheduler_info()["workers"], "the large block's owner gone")
            mine = [insert_checked(fabric, f"client/{i}", MiB) for i in range(4)]
        finally:
            allocating.join()
        outcomes = [f.result() for f in racing] + mine
        assert set(outcomes) <= {"inserted", "OutOfSpaceError"}, outcomes
        back_to_two(client, fabric)
        if then == "refuse":
            assert isinstance(outcome[0], OutOfSpaceError), outcome
            wait_for(lambda: own_segments(fabric) == before_segments, "the refused allocate's segments gone", 20)
            ids = sorted(b["shm_id"] for b in fabric.status())
            assert ids == before_ids, f"a refused allocate left blocks {sorted(set(ids) - set(before_ids))}"
        else:
            assert not isinstance(outcome[0], BaseException), outcome
            wait_for(lambda: all(b["worker"] for b in fabric.status()), "the orphaned large block adopted")
            assert len(fabric.status()) == len(before_ids) + 2
            assert insert_checked(fabric, "after", 40 * MiB) == "inserted"
        for name in [n for n, o in zip([f"task/{i}" for i in range(4)] + [f"client/{i}" for i in range(4)],
                                       outcomes, strict=True) if o == "inserted"]:  # fmt: skip
            assert np.array_equal(fabric.get(name), values(name, MiB)), name
        fabric.shutdown()
        wait_for(lambda: own_segments(fabric) == [], f"segments left after the shutdown: {own_segments(fabric)}")


OPEN_LATE = 2.0  # seconds the allocate's opening of a new small block takes to arrive
UNLINK_LATE = 6.0  # seconds an unlink takes to arrive


class LateOpenSlowUnlink(WorkerPlugin):
    """The allocate's opening of a new small block (``retire_block`` with ``retiring=False``,
    the first for the block) arrives ``OPEN_LATE`` s late, and every ``unlink_block``
    ``UNLINK_LATE`` s late: messages on different connections, in an order nothing forbids."""

    name = "late-open-slow-unlink"

    def setup(self, worker) -> None:
        retire = worker.handlers[f"{HANDLER_PREFIX}retire_block"]
        unlink = worker.handlers[f"{HANDLER_PREFIX}unlink_block"]
        opened: set[str] = set()

        async def retire_block(**kwargs):
            if kwargs.get("retiring") is False and kwargs["shm_id"] not in opened:
                opened.add(kwargs["shm_id"])
                await asyncio.sleep(OPEN_LATE)
            return retire(**kwargs)

        async def unlink_block(**kwargs):
            await asyncio.sleep(UNLINK_LATE)
            return unlink(**kwargs)

        worker.handlers[f"{HANDLER_PREFIX}retire_block"] = retire_block
        worker.handlers[f"{HANDLER_PREFIX}unlink_block"] = unlink_block


def test_a_block_deallocated_while_its_allocate_opens_it_loses_no_sealed_variable():
    """A client deallocates a new small block as soon as ``status`` shows it, before its
    allocate has opened it; the allocate's opening arrives after the deallocate closed it,
    and a task of its owner inserts a variable that fits only there.  Whatever the outcome
    of each, a variable whose insert returned reads back its bytes afterwards."""
    with removing_own_segments() as own, local_cluster() as cluster, Client(cluster) as client:
        fabric = own.fabric = datafabric.start(client, mb=8)
        client.run(lambda: None)
        before = {b["shm_id"] for b in fabric.status()}
        client.register_plugin(LateOpenSlowUnlink())
        allocated: list = []
        allocating = threading.Thread(target=lambda: allocated.append(_try(fabric.allocate, 96)))
        allocating.start()
        try:
            small = wait_for(
                lambda: [b for b in fabric.status() if b["shm_id"] not in before and b["size"] < SMALL],
                "the new small block in the status",
            )[0]
            dealloc: list = []
            deallocating = threading.Thread(
                target=lambda: dealloc.append(_try(fabric.deallocate, small["node"], small["shm_id"]))
            )
            deallocating.start()
            time.sleep(OPEN_LATE + 0.5)  # the allocate's opening has arrived
            racing = client.submit(insert_checked, fabric, "racing", 10 * MiB, workers=[small["worker"]], pure=False)
            try:
                outcome = racing.result()
            except Exception as exc:  # not a FabricError: a defect of its own
                outcome = f"raised {exc!r}"
            deallocating.join()
        finally:
            allocating.join()
        assert outcome in ("inserted", "OutOfSpaceError"), outcome
        if outcome == "inserted":
            try:
                read = np.array_equal(fabric.get("racing"), values("racing", 10 * MiB))
            except FabricError as exc:
                read = repr(exc)
            assert read is True, f"the sealed 'racing' is lost (deallocate: {dealloc[0]!r}): {read}"
        fabric.shutdown()


class KillLargeCreator(WorkerPlugin):
    """SIGKILLs the creator of a block of ``SMALL`` or more at ``stage``: as ``create_block``
    arrives ("asked", no segment yet), once its segment and header exist before it answers
    ("made"), or as the allocate's opening of it arrives ("opening", the block confirmed)."""

    name = "kill-large-creator"

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def setup(self, worker) -> None:
        create = worker.handlers[f"{HANDLER_PREFIX}create_block"]
        retire = worker.handlers[f"{HANDLER_PREFIX}retire_block"]
        large: set[str] = set()

        async def create_block(**kwargs):
            if kwargs["size"] >= SMALL:
                large.add(kwargs["shm_id"])
                if self.stage == "asked":
                    kill_me()
            answer = await create(**kwargs)
            if kwargs["size"] >= SMALL and self.stage == "made":
                kill_me()
            return answer

        def retire_block(**kwargs):
            if kwargs["shm_id"] in large and kwargs.get("retiring") is False and self.stage == "opening":
                kill_me()
            return retire(**kwargs)

        worker.handlers[f"{HANDLER_PREFIX}create_block"] = create_block
        worker.handlers[f"{HANDLER_PREFIX}retire_block"] = retire_block


@pytest.mark.parametrize("stage", ["asked", "made", "opening"])
def test_the_large_block_s_creator_killed_at_each_stage_leaves_all_or_none(stage):
    """Killed before the allocate has confirmed the block, the allocate is refused and leaves
    no block and no segment; killed as it opens the block, the allocate stands and the block
    is adopted by the node's other worker, which places inserts there.  Either way the next
    allocate works, and a shutdown leaves nothing in /dev/shm."""
    with removing_own_segments() as own, local_cluster() as cluster, Client(cluster) as client:
        fabric = own.fabric = datafabric.start(client, mb=8)
        client.run(lambda: None)
        before_segments, before_ids = own_segments(fabric), sorted(b["shm_id"] for b in fabric.status())
        client.register_plugin(KillLargeCreator(stage))
        outcome = _try(fabric.allocate, 96)
        client.unregister_worker_plugin(KillLargeCreator.name)  # the restarted worker does not kill itself
        back_to_two(client, fabric)
        if stage == "opening":
            assert not isinstance(outcome, BaseException), outcome
            wait_for(lambda: all(b["worker"] for b in fabric.status()), "the killed creator's block adopted")
            assert len(fabric.status()) == len(before_ids) + 2
            assert insert_checked(fabric, "in-the-large-block", 40 * MiB) == "inserted"
        else:
            assert isinstance(outcome, FabricError), outcome
            wait_for(lambda: own_segments(fabric) == before_segments, "the refused allocate's segments gone", 20)
            assert sorted(b["shm_id"] for b in fabric.status()) == before_ids
        fabric.allocate(96)
        assert insert_checked(fabric, "after", 40 * MiB) == "inserted"
        fabric.shutdown()
        wait_for(lambda: own_segments(fabric) == [], f"segments left after the shutdown: {own_segments(fabric)}")
