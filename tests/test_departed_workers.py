"""Workers that leave the scheduler alive while a task writes into their own blocks.

A task's ``create`` or insert in its worker's own block is no reservation of the directory:
the worker's allocator holds it.  A worker the scheduler removed while it runs keeps its
blocks (no peer adopts them) until its process is proven gone; a worker that closes hands
its blocks to a peer at once, which keeps its tasks' reservations as the closing process's
(``yp/departed.py``).  Real clusters of worker processes, real shared memory.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

import datafabric
from datafabric.errors import OutOfSpaceError
from tests.directories import CAPACITY, directory
from tests.test_departed_writers import stranded, used
from tests.waiting import wait_for
from yp.membership import Membership
from yp.moves import BlockMoves


def write_when_told(fabric, flags: str, name: str, seal: bool) -> str:
    """A task's create in its worker's own block, written once told to (its worker was
    removed or handed its blocks off meanwhile: it goes on), then sealed or dropped."""
    import os
    from pathlib import Path

    creation = fabric.create(name, "", "16384 * float64", fill=-1.0)
    Path(flags, f"created-{os.getpid()}").write_text(str(creation._write.local))
    deadline = time.monotonic() + 60
    while not Path(flags, "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    creation.array[...] = 9.5
    Path(flags, f"written-{os.getpid()}").touch()
    if seal:
        creation.seal()
        return "sealed"
    creation.abort()
    return "written"


def cut_worker(dask_scheduler, address: str) -> None:
    dask_scheduler.stream_comms[address].abort()


def test_a_worker_removed_alive_keeps_its_blocks_until_its_process_is_gone(tmp_path):
    """The scheduler removes a worker whose task is filling a ``create`` in the worker's own
    block (a reservation the directory does not know).  Its process lives on until its close
    has waited for the task, so no peer adopts (and frees, and reuses) its blocks until the
    process is proven gone; the late copy lands in its own memory, and all of it returns
    once the process has exited."""
    import os
    from pathlib import Path

    from distributed import Client

    from tests.conftest import local_cluster

    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=4)
        before = used(fabric)
        a = sorted(client.scheduler_info()["workers"])[0]
        pid = client.run(os.getpid, workers=[a])[a]
        task = client.submit(write_when_told, fabric, str(tmp_path), "removed/own", True, workers=[a], pure=False)
        wait_for(lambda: Path(tmp_path, f"created-{pid}").exists(), "the task's create")
        assert Path(tmp_path, f"created-{pid}").read_text() == "True"  # in its worker's own block
        client.run_on_scheduler(cut_worker, address=a)
        wait_for(lambda: a not in client.scheduler_info()["workers"], "the worker's removal")
        mine = []
        try:
            while True:
                fabric.insert(f"removed/mine/{len(mine)}", "", "16384 * float64", np.full(16384, 1.0))
                mine.append(f"removed/mine/{len(mine)}")
        except OutOfSpaceError:
            pass
        orphaned = [b for b in fabric.status() if b.get("orphaned")]
        assert orphaned, "the removed worker's blocks were adopted while its process ran"
        Path(tmp_path, "go").touch()
        wait_for(lambda: Path(tmp_path, f"written-{pid}").exists(), "the removed worker's late copy")
        changed = [n for n in mine if not (fabric.get(n) == 1.0).all()]
        assert not changed, f"{changed} hold the removed worker's bytes"
        assert task.result(timeout=120) == "sealed"  # run again on a live worker
        wait_for(lambda: not any(b.get("orphaned") for b in fabric.status()), "the blocks' adoption", timeout=120)
        for name in [*mine, "removed/own"]:
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"every byte to return: {fabric.status()}")
        fabric.shutdown()


def close_gracefully(dask_worker) -> None:
    dask_worker.loop.add_callback(dask_worker.close)


def test_a_closing_worker_s_own_reservation_is_kept_by_its_adopter_while_its_process_runs(tmp_path):
    """A worker closes (its plugin hands its blocks to a peer at once) while its task still
    fills a ``create`` in the worker's own block: the adopter keeps that RESERVED extent as a
    departed writer's reservation of the closing process, so memory filled meanwhile keeps
    its bytes when the task writes on, and it returns once that process has exited."""
    import os
    from pathlib import Path

    from distributed import Client

    from tests.conftest import local_cluster

    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=4)
        before = used(fabric)
        a, b = sorted(client.scheduler_info()["workers"])
        pid = client.run(os.getpid, workers=[a])[a]
        task = client.submit(write_when_told, fabric, str(tmp_path), "closing/own", False, workers=[a], pure=False)
        wait_for(lambda: Path(tmp_path, f"created-{pid}").exists(), "the task's create")
        assert Path(tmp_path, f"created-{pid}").read_text() == "True"  # in its worker's own block
        client.run(close_gracefully, workers=[a])
        wait_for(lambda: client.run_on_scheduler(stranded) == 1, "the handoff to keep the task's reservation")
        mine = []
        try:
            while True:
                fabric.insert(f"closing/mine/{len(mine)}", "", "16384 * float64", np.full(16384, 1.0))
                mine.append(f"closing/mine/{len(mine)}")
        except OutOfSpaceError:
            pass
        Path(tmp_path, "go").touch()
        wait_for(lambda: Path(tmp_path, f"written-{pid}").exists(), "the closing worker's late copy")
        changed = [n for n in mine if not (fabric.get(n) == 1.0).all()]
        assert not changed, f"{changed} hold the closing worker's bytes"
        task.cancel()  # restricted to the worker that closed: Dask holds it as no-worker
        for name in mine:
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"every byte to return: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0
        fabric.shutdown()


class LoopScheduler:
    """What ``Membership`` uses of Dask's scheduler here: its workers and its loop."""

    def __init__(self, workers: list[str]) -> None:
        self.workers = dict.fromkeys(workers)
        self.unrunnable: set = set()
        self.client_comms: dict = {}
        self.loop = self
        self.callbacks: list = []
        self.timers: list = []

    def add_callback(self, f, *args) -> None:
        self.callbacks.append((f, args))

    def call_later(self, delay: float, f) -> None:
        self.timers.append((delay, f))


class AnsweringOwners:
    """Block owners that answer ``processes_gone`` from ``alive`` and adopt empty blocks."""

    def __init__(self) -> None:
        self.alive: set[int] = set()
        self.asked: list[tuple[str, str]] = []

    async def ask(self, worker: str, op: str, **kwargs):
        self.asked.append((worker, op))
        if op == "processes_gone":
            return [p["pid"] not in self.alive for p in kwargs["processes"]]
        assert op == "adopt"
        return [
            {"shm_id": s, "size": CAPACITY, "capacity": CAPACITY, "free": CAPACITY, "extents": []}
            for s in kwargs["shm_ids"]
        ]

    async def free(self, copies) -> None:
        pass

    async def mark(self, state, named) -> None:
        pass

    def free_later(self, copies) -> None:
        pass


def test_a_removed_owner_s_blocks_are_adopted_only_once_a_peer_proves_its_process_gone():
    """No cluster: ``Membership`` asks the adopting peer first, tries again later (at 0.5 s,
    then 1 s) while the removed owner's process runs, and adopts once it is gone."""
    d = directory(("A", "n1", "w1"))
    scheduler, owners = LoopScheduler(["w1", "w2"]), AnsweringOwners()
    members = Membership(scheduler, "fabric", d, owners, BlockMoves())
    first = {"boot": "b", "pid_ns": "pid:[1]", "started": 9}
    members.register("w1", "n1", process=first | {"pid": 1})
    members.register("w2", "n1", process=first | {"pid": 2})
    owners.alive = {1, 2}
    del scheduler.workers["w1"]
    members.remove("w1")  # missed heartbeats: its process runs on
    assert d.blocks["A"].left_by["pid"] == 1
    for attempt in range(2):
        asyncio.run(members.adopt_orphans("n1"))
        assert d.blocks["A"].worker is None and owners.asked[-1] == ("w2", "processes_gone")
        asyncio.run(members.adopt_orphans("n1"))  # another attempt meanwhile schedules no second timer
        assert [delay for delay, _ in scheduler.timers] == [0.5, 1.0][: attempt + 1]
        scheduler.timers[-1][1]()  # the timer fires: the next attempt is scheduled on the loop
        assert scheduler.callbacks[-1] == (members.adopt_orphans, ("n1",))
    owners.alive = {2}  # w1's process exits
    asyncio.run(members.adopt_orphans("n1"))
    assert d.blocks["A"].worker == "w2" and d.blocks["A"].left_by is None
    assert owners.asked[-2:] == [("w2", "processes_gone"), ("w2", "adopt")]
