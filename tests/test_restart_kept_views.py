"""A task that holds views while its scheduler is SIGKILLed and restarted.

Real processes (``tests/processes.py``): a preloaded ``dask scheduler`` and one ``dask
worker`` on a simulated node.  The worker closes when its scheduler dies, but its close
waits for the task it runs, which goes on reading.  The restarted scheduler's YellowPages
takes the block back through a new worker; then the variables the task views are
compacted around, deleted and their space filled.  The task's checksums must never
change, and once the old process is gone all of the memory comes back.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client

import datafabric
from datafabric.errors import OutOfSpaceError
from datafabric.protocol import SCHEDULER_PLUGIN
from tests.conftest import fabric_segments
from tests.processes import ProcessCluster
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODE = "kept-a"
MiB = 2**20


def digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


def pin_of(view: np.ndarray):
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def insert_here(fabric, items):
    return fabric.insert_many([(name, "", np.float64, data) for name, data in items.items()])


def watch(fabric, names, names_late, started, stop, out):
    """Hold each name twice (a local lease, and an ordinary one through a reference), and
    note every distinct digest seen until told to stop; then get ``names_late``."""
    local = {n: fabric.get(n) for n in names}
    by_reference = {n: pickle.loads(pickle.dumps(local[n])) for n in names}  # a lease by id (acquire_ref)
    assert all(pin_of(local[n]) is not pin_of(by_reference[n]) for n in names)
    seen = {n: {digest(local[n]), digest(by_reference[n])} for n in names}
    with open(started, "w") as f:
        f.write("holding")
    deadline = time.time() + 180
    while not os.path.exists(stop) and time.time() < deadline:
        for n in names:
            seen[n] |= {digest(local[n]), digest(by_reference[n])}
        time.sleep(0.05)
    late = {}  # a get after the scheduler died must not lease locally under a grant nobody can recall

    def get_late() -> None:
        try:
            view = fabric.get(names_late)
            late["got"] = type(view).__name__
            late["lease"] = dict(pin_of(view).lease)
        except Exception as exc:
            late["got"] = f"refused: {type(exc).__name__}"

    getter = threading.Thread(target=get_late, daemon=True)
    getter.start()
    getter.join(20)
    with open(out, "w") as f:
        json.dump(
            {
                "seen": {n: sorted(s) for n, s in seen.items()},
                "late": late.get("got", "no answer"),
                "lease": late.get("lease"),
            },
            f,
        )


def fill_up(fabric) -> int:
    """Every free byte of the node's block overwritten with 7s, in pieces; how many."""
    filled = 0
    for size in (MiB, 64 * 1024):
        while True:
            try:
                fabric.insert(f"filler/{filled}", "", np.float64, np.full(size // 8, 7.0))
            except OutOfSpaceError:
                break
            filled += 1
    return filled


def new_first_id(dask_scheduler) -> int:
    return dask_scheduler.plugins[SCHEDULER_PLUGIN].directory.first_id


def waiting_declarations(dask_scheduler) -> int:
    kept = dask_scheduler.plugins[SCHEDULER_PLUGIN].members.kept
    return sum(len(holders) for offsets in kept.waiting.values() for holders in offsets.values())


def quietly(call, default):
    try:
        return call()
    except OSError:  # the client is still reconnecting
        return default


@pytest.fixture
def processes():
    procs = ProcessCluster((NODE,))
    procs.start()
    try:
        yield procs
    finally:
        procs.stop()
        from datafabric.cleanup import remove
        from yp.plugin import durable_fabric_id

        remove([s for s in fabric_segments() if s.startswith(f"dfab_{durable_fabric_id(procs.address)[:8]}_")])


def test_views_a_task_holds_through_a_scheduler_restart_keep_their_bytes(processes, tmp_path):
    rng = np.random.default_rng(11)
    data = {
        "gap": np.zeros(100_000),
        "held": rng.random(200_000),
        "doomed": rng.random(100_000),
        "after": np.ones(1000),
    }
    expected = {n: digest(data[n]) for n in ("held", "doomed")}
    started, stop, out = (str(tmp_path / n) for n in ("started", "stop", "out.json"))

    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(1)
        fabric = datafabric.start(client, mb=32)  # the preloaded, durable fabric: one block
        client.submit(insert_here, fabric, data).result()  # laid out in this order in the worker's block
        fabric.delete("gap")  # a hole before "held": a compaction would move an unleased "held" into it
        running = client.submit(watch, fabric, ["held", "doomed"], "after", started, stop, out, pure=False)
        wait_for(lambda: os.path.exists(started), "the task to hold its views")
        fabric.delete("doomed")  # deleted while read: its header says DELETED, its memory is held

        closing = processes.lose_scheduler()  # the worker closes, waiting for its running task
        crashed = time.time()
        del running
        processes.start_scheduler()
        # The closing worker's process declares its four views before any worker of the
        # node is back: they wait for the take-back of their block.
        wait_for(
            lambda: quietly(lambda: client.run_on_scheduler(waiting_declarations), 0) == 4,
            "the closing worker to declare the views its task holds",
        )
        assert all(p.poll() is None for p in closing), "the old worker must still be running its task"
        processes.start_workers()
        client.wait_for_workers(1)
        wait_for(lambda: set(quietly(fabric.get_list, [])) == {"held", "after"}, "the block to be taken back")
        assert client.run_on_scheduler(waiting_declarations) == 0

        assert "held" not in fabric.defragment()["moved"]  # leased by the declaration
        fabric.delete("held")
        assert client.submit(fill_up, fabric, pure=False).result() > 0
        used = sum(b["used"] for b in fabric.status())

        with open(stop, "w") as f:
            f.write("stop")
        for proc in closing:
            proc.wait(60)  # its task ended, so did it, and its declaration with it
        # Dask's close waits at most 30 s for a running task, then the process exits.
        assert os.path.exists(out), f"the old worker exited before its task ended, {time.time() - crashed:.0f} s on"
        with open(out) as f:
            found = json.load(f)
        assert found["seen"] == {n: [expected[n]] for n in expected}, "the bytes under a held view changed"
        if found["late"] == "FabricView":  # then through the restarted YellowPages, not an old local grant
            first_id = client.run_on_scheduler(new_first_id)
            assert found["lease"]["var_id"] >= first_id, f"a get after the crash leased under an old grant: {found}"

        held_bytes = data["held"].nbytes + data["doomed"].nbytes
        wait_for(
            lambda: sum(b["used"] for b in fabric.status()) <= used - held_bytes,
            "the held variables to be freed once the old process was gone",
        )
        for name in fabric.get_list():
            fabric.delete(name)
        wait_for(lambda: all(b["used"] == 0 for b in fabric.status()), "space still used after deleting everything")
        fabric.shutdown()
