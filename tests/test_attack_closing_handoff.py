"""Attack on "a closing worker's own reservations are kept by its adopter": a task of the
closing worker ends its ``create`` (an abort, a ``free_local`` in the worker's own
allocator) after a peer has adopted the worker's blocks but before the handoff's answer
reached the closing worker, which still lists the blocks.  The closing worker's allocator
then rewrites headers of a block that is the adopter's: the header walk (what a scheduler
restart or the next adoption rebuilds the block from) no longer agrees with the adopter.
Real cluster, real shared memory; the moment is made exact by holding the closing plugin's
lock from the task, as a task thread preempted there would.  A closing worker's tasks
touch its blocks no more once its handoff begins: the abort is the adopter's to do (the
extent is kept as the closing process's and returns once that process is gone)."""

from __future__ import annotations

import time

import numpy as np

import datafabric
from datafabric.errors import OutOfSpaceError
from tests.test_departed_writers import stranded, used
from tests.waiting import wait_for


def abort_after_the_adoption(fabric, flags: str) -> str:
    """A task's create in its worker's own block; once its worker closes, it holds the
    plugin's lock (the teardown cannot take the blocks back meanwhile), waits until told the
    peer has adopted them, and aborts: ``free_local`` in the closing worker's allocator."""
    import threading
    from pathlib import Path

    creation = fabric.create("handoff/own", "", "16384 * float64", fill=-1.0)
    plugin = creation._write.ctx.plugin
    plugin.lock = threading.RLock()  # the same lock, reentrant, so this thread can free under it
    Path(flags, "created").write_text(f"{creation._write.local} {creation._write.res['shm_id']}")
    deadline = time.monotonic() + 60
    while not plugin.closing and time.monotonic() < deadline:
        time.sleep(0.0002)
    with plugin.lock:
        while not Path(flags, "adopted").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        held = bool(plugin.blocks)
        creation.abort()
    Path(flags, "aborted").write_text(str(held))
    time.sleep(5)  # the closing process lives on a while: its reservation stays kept
    return "aborted"


def close_gracefully(dask_worker) -> None:
    dask_worker.loop.add_callback(dask_worker.close)


def owner_of(dask_scheduler, shm_id: str) -> str | None:
    return dask_scheduler.plugins["datafabric-yellowpages"].directory.blocks[shm_id].worker


def headers_against_allocator(dask_worker) -> list:
    """Blocks whose header walk differs from their owner's allocator: (shm_id, walked, held)."""
    from datafabric import layout
    from datafabric.protocol import WORKER_PLUGIN

    plugin = dask_worker.plugins[WORKER_PLUGIN]
    wrong = []
    with plugin.lock:
        for shm_id, block in plugin.blocks.items():
            walked = [(e.offset, e.size, int(e.state)) for e in layout.walk(block.segment.buf)]
            held = [(o, s, int(st)) for o, s, st in block.allocator.extents()]
            if walked != held:
                wrong.append((shm_id, walked[:3], held[:3]))
    return wrong


def test_a_task_s_abort_after_its_closing_worker_s_blocks_were_adopted_leaves_the_headers_true(tmp_path):
    from pathlib import Path

    from distributed import Client

    from tests.conftest import local_cluster

    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=4)
        before = used(fabric)
        a, b = sorted(client.scheduler_info()["workers"])
        task = client.submit(abort_after_the_adoption, fabric, str(tmp_path), workers=[a], pure=False)
        local, shm_id = wait_for(
            lambda: Path(tmp_path, "created").read_text(), "the create", ignoring=(OSError,)
        ).split()
        assert local == "True"  # in its worker's own block
        client.run(close_gracefully, workers=[a])
        wait_for(lambda: client.run_on_scheduler(owner_of, shm_id=shm_id) == b, "the peer's adoption")
        Path(tmp_path, "adopted").touch()
        wait_for(lambda: Path(tmp_path, "aborted").exists(), "the abort")
        assert Path(tmp_path, "aborted").read_text() == "True"  # the closing worker still listed its blocks
        mine = []
        try:
            while True:  # the adopter places these in the room its allocator knows free
                fabric.insert(f"handoff/mine/{len(mine)}", "", "16384 * float64", np.full(16384, 1.0))
                mine.append(f"handoff/mine/{len(mine)}")
        except OutOfSpaceError:
            pass
        wrong = client.run(headers_against_allocator, workers=[b])[b]
        assert not wrong, f"headers no longer tile as the adopter holds them: {wrong}"
        assert all((fabric.get(name) == 1.0).all() for name in mine)
        task.cancel()
        for name in mine:
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"every byte to return: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0
        fabric.shutdown()
