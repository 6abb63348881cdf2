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

import contextlib
import os
import signal
import sys
import threading
import zlib

import cloudpickle
import numpy as np
import pytest
from distributed import Client

import datafabric
from datafabric.errors import FabricError, OutOfSpaceError
from tests.conftest import SHM_DIR, local_cluster
from tests.test_attack_allocate import (
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
