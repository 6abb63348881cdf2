"""Workers that leave the scheduler alive while a task writes into their own blocks.

A task's ``create`` or insert in its worker's own block is no reservation of the directory:
the worker's allocator holds it.  A worker the scheduler removed while it runs keeps its
blocks (no peer adopts them) until its process is proven gone; a worker that closes hands
its blocks to a peer at once, which keeps its tasks' reservations as the closing process's
(``yp/departed.py``).  Real clusters of worker processes, real shared memory.
"""

from __future__ import annotations

import time

import numpy as np

import datafabric
from datafabric.errors import OutOfSpaceError
from tests.test_departed_writers import stranded, used
from tests.waiting import wait_for


def produce_when_told(fabric, flags: str) -> str:
    """A task's create in its worker's own block; it writes once told to, then seals."""
    import os
    from pathlib import Path

    creation = fabric.create("removed/own", "", "16384 * float64", fill=-1.0)
    Path(flags, f"created-{os.getpid()}").write_text(str(creation._write.local))
    deadline = time.monotonic() + 60
    while not Path(flags, "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    creation.array[...] = 9.5  # its worker was removed meanwhile: it goes on
    Path(flags, f"written-{os.getpid()}").touch()
    creation.seal()
    return "sealed"


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
        task = client.submit(produce_when_told, fabric, str(tmp_path), workers=[a], pure=False)
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


def fill_when_told(fabric, flags: str) -> str:
    """A task's create in its worker's own block, written once told to, then dropped."""
    import os
    from pathlib import Path

    creation = fabric.create("closing/own", "", "16384 * float64", fill=-1.0)
    Path(flags, f"created-{os.getpid()}").write_text(str(creation._write.local))
    deadline = time.monotonic() + 60
    while not Path(flags, "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    creation.array[...] = 9.5  # its worker handed its blocks off meanwhile: it goes on
    Path(flags, f"written-{os.getpid()}").touch()
    creation.abort()
    return "written"


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
        task = client.submit(fill_when_told, fabric, str(tmp_path), workers=[a], pure=False)
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
