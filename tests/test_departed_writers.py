"""A writer's reservation outlives the writer's departure while its process may write.

Leaving the scheduler is not dying (a client whose stream broke reconnects with its id;
a worker removed while its task runs keeps running it), so a departed writer's
reservations it may still write into (the block is on its node, it maps it) are kept out
of reuse until the block's owner proves the process dead, or the writer seals or aborts
them; bytes streamed by a writer off the node go through its owner, which writes only
into the reservation they name.  Real cluster, real shared memory, a writer process
really SIGKILLed.  (The writer that departs and comes back alive is in
``tests/test_attack_unfilled_left.py``; workers removed or closing while a task writes
into their own blocks in ``tests/test_departed_workers.py``.)
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from distributed.protocol import to_serialize

import datafabric
from datafabric import processes
from datafabric.errors import (
    InvalidArgumentError,
    NameNotFoundError,
    OutOfSpaceError,
    VariableUnavailableError,
    WorkerLostError,
)
from tests.waiting import wait_for


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def test_a_streamed_write_lands_only_in_the_reservation_it_names(client):
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    try:
        ctx = fabric._ctx()
        res = ctx.call(
            "reserve", name="streamed", type="16 * uint8", doc="", nbytes=16, node=ctx.node, holder=ctx.holder
        )
        where = {k: res[k] for k in ("shm_id", "extent_offset", "extent_id", "data_offset")}

        def write(**changed):
            data = to_serialize(np.arange(16, dtype=np.uint8).data)
            return ctx.call_worker(res["worker"], "write", **{**where, **changed}, data=data)

        with pytest.raises(VariableUnavailableError):
            write(extent_id=res["extent_id"] ^ 1)
        with pytest.raises(VariableUnavailableError):
            write(extent_offset=res["extent_offset"] + 64)
        with pytest.raises(InvalidArgumentError):
            write(data_offset=res["data_offset"] + 8)  # its last 8 bytes past the data
        with pytest.raises(InvalidArgumentError):
            write(data_offset=res["data_offset"] - 8)  # into the header
        write()
        ctx.call("abort", shm_id=res["shm_id"], extent_offset=res["extent_offset"], extent_id=res["extent_id"])
        wait_for(lambda: used(fabric) == before, "the aborted reservation's memory to return")
        with pytest.raises(VariableUnavailableError):  # a late piece of an aborted insert
            write()
    finally:
        fabric.shutdown()


def test_a_seal_or_abort_of_a_reservation_names_it_by_its_id(client):
    """A late seal or abort of a reservation that ended, whose memory was reserved again at
    the same offset, must not seal or end the new one."""
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    try:
        ctx = fabric._ctx()
        res = ctx.call("reserve", name="named", type="16 * uint8", doc="", nbytes=16, node=ctx.node, holder=ctx.holder)
        keys = ("shm_id", "extent_offset", "extent_size", "data_offset", "extent_id")
        item = {"name": "named", "doc": "", "type": "16 * uint8", "nbytes": 16} | {k: res[k] for k in keys}
        with pytest.raises(WorkerLostError):
            ctx.call("seal", items=[item | {"extent_id": res["extent_id"] ^ 1}], holder=ctx.holder)
        with pytest.raises(WorkerLostError):  # another holder's seal
            ctx.call("seal", items=[item], holder=f"{ctx.holder}-other")
        ctx.call("abort", shm_id=res["shm_id"], extent_offset=res["extent_offset"], extent_id=res["extent_id"] ^ 1)
        assert used(fabric) > before  # that abort named another reservation: this one is kept
        ctx.call("seal", items=[item], holder=ctx.holder)
        assert fabric.get("named").nbytes == 16
        fabric.delete("named")
        wait_for(lambda: used(fabric) == before, "the memory to return")
    finally:
        fabric.shutdown()


CREATOR = """
import sys, time
from distributed import Client
import datafabric
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
creation = fabric.create("departed/killed", "", "65536 * float64")
print(client.id, flush=True)
while True:  # it goes on writing until SIGKILLed, after its stream was cut too
    creation.array[...] = time.time()
    time.sleep(0.01)
"""


def test_a_departed_writer_s_reservation_returns_once_its_process_is_killed(client, tmp_path):
    """A producer whose client's stream breaks stays alive and writing: its reservation is
    kept through several rounds of the owner's check.  SIGKILLed, it is proven gone
    (pid and start time) and its memory returns: kept, not leaked."""
    import subprocess
    import sys

    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    script = tmp_path / "creator.py"
    script.write_text(CREATOR)
    creator = subprocess.Popen(
        [sys.executable, str(script), client.scheduler.address], stdout=subprocess.PIPE, text=True
    )
    try:
        creator_id = creator.stdout.readline().strip()
        assert creator_id, "the creator did not start"
        reserved = used(fabric)
        assert reserved > before
        client.run_on_scheduler(cut_stream, client_id=creator_id)
        wait_for(lambda: client.run_on_scheduler(has_left, client_id=creator_id), "the departure")
        time.sleep(3)  # the departed writer is checked at 0.5, 1 and 2 s: alive each time
        assert used(fabric) == reserved, "a live writer's reservation was given back"
        assert client.run_on_scheduler(stranded) == 1
        creator.kill()
        creator.wait(30)
        wait_for(lambda: used(fabric) == before, f"the killed writer's reservation to return: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait(30)
        fabric.shutdown()


def cut_stream(dask_scheduler, client_id: str) -> None:
    dask_scheduler.client_comms[client_id].abort()


def has_left(dask_scheduler, client_id: str) -> bool:
    return any(e.get("action") == "remove-client" for _, e in dask_scheduler.get_events(client_id))


def stranded(dask_scheduler) -> int:
    return len(dask_scheduler.plugins["datafabric-yellowpages"].directory.stranded())


def test_a_process_is_gone_only_when_proven(tmp_path):
    """``processes.gone``: alive is never gone; exited (reaped, or a zombie), a reused pid
    (another start time) or another machine is; another pid namespace cannot be judged
    and counts as alive."""
    import subprocess

    here = processes.this_process()
    assert here is not None and not processes.gone(here)
    child = subprocess.Popen(["sleep", "60"])
    try:
        them = here | {"pid": child.pid, "started": processes.start_time(child.pid)}
        assert not processes.gone(them)
        assert processes.gone(them | {"started": them["started"] + 1})  # the pid of another process now
        assert processes.gone(them | {"boot": "another-machine"})
        assert not processes.gone(them | {"pid_ns": "pid:[1]"})
        child.kill()
        wait_for(lambda: processes.gone(them), "the killed child, a zombie until reaped, to count as gone")
    finally:
        child.kill()
        child.wait()
    assert processes.gone(them)
    assert processes.processes_gone([here, them]) == [False, True]


CHURNER = """
import random, sys, time
from distributed import Client
import datafabric
from datafabric.errors import FabricError
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
me = int(sys.argv[2])
rng = random.Random(me)
print("ready", flush=True)
for i in range(10**9):
    try:
        creation = fabric.create(f"churn/w{me}/{i}", "", "32768 * float64", fill=None)
    except (FabricError, OSError):
        time.sleep(0.05)
        continue
    for _ in range(rng.randint(1, 30)):  # goes on writing whether or not its stream is cut
        creation.array[...] = me * 1e6 + i
        time.sleep(0.005)
    try:
        creation.abort() if rng.random() < 0.2 else creation.seal()
    except (FabricError, OSError):
        pass  # refused: the writer writes no more into it
"""


def expected(name: str) -> float:
    """``churn/w<k>/<i>`` holds k * 1e6 + i, ``churn/mine/<j>`` holds -(j + 1)."""
    _, who, i = name.split("/")
    return -(int(i) + 1) if who == "mine" else int(who[1:]) * 1e6 + int(i)


def test_writers_whose_streams_are_cut_while_writing_and_then_killed_change_nobody_s_bytes(client, tmp_path):
    """Three writer processes create, fill (for a random while) and seal or abort variables
    of their own constant value, without end; the test cuts their streams at random while
    they write, inserts and deletes variables of its own meanwhile, and checks every
    variable it sees, its own and the writers' sealed ones, holds exactly its value.  Then
    the writers are SIGKILLed mid-write, and every byte comes back."""
    import random
    import subprocess
    import sys

    fabric = datafabric.start(client, mb=8)
    before = used(fabric)
    script = tmp_path / "churner.py"
    script.write_text(CHURNER)
    # clients that earlier tests left on the session's scheduler (a worker's own, a published dataset's)
    others = set(client.run_on_scheduler(writer_clients, exclude=client.id))
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), client.scheduler.address, str(k)], stdout=subprocess.PIPE, text=True
        )
        for k in (1, 2, 3)
    ]
    rng = random.Random(7)
    checked = cuts = 0
    try:
        assert all(w.stdout.readline().strip() == "ready" for w in writers)
        ids = [c for c in client.run_on_scheduler(writer_clients, exclude=client.id) if c not in others]
        assert len(ids) == 3, ids
        mine = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            client.run_on_scheduler(cut_stream_if_connected, client_id=rng.choice(ids))
            cuts += 1
            for _ in range(2):  # at once: memory a departure would free goes to these
                try:
                    fabric.insert(f"churn/mine/{mine}", "", "32768 * float64", np.full(32768, -(mine + 1.0)))
                    mine += 1
                except OutOfSpaceError:
                    break
            names = fabric.get_list("churn/")
            for name in names:
                try:
                    view = fabric.get(name)
                except NameNotFoundError:
                    continue  # deleted meanwhile (an abort never shows)
                assert (view == expected(name)).all(), f"{name} holds {np.unique(view)[:5]}: another writer's bytes"
                del view
                checked += 1
            old = [n for n in names if rng.random() < 0.5]
            for name in old:
                fabric.delete(name)
        for w in writers:
            w.kill()  # most likely mid-write: it writes for up to 150 ms between its calls
            w.wait(30)
        for name in fabric.get_list("churn/"):
            view = fabric.get(name)
            assert (view == expected(name)).all(), f"{name} holds {np.unique(view)[:5]}: another writer's bytes"
            del view
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"every byte to return: {fabric.status()}")
        assert checked > 50 and cuts > 15, (checked, cuts)
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(30)
        fabric.shutdown()


def writer_clients(dask_scheduler, exclude: str) -> list[str]:
    return sorted(c for c in dask_scheduler.clients if c != exclude and c != "fire-and-forget")


def cut_stream_if_connected(dask_scheduler, client_id: str) -> None:
    comm = dask_scheduler.client_comms.get(client_id)
    if comm is not None:
        comm.abort()


def writer_of(dask_scheduler, shm_id: str, offset: int):
    return dask_scheduler.plugins["datafabric-yellowpages"].directory.pending[(shm_id, offset)].writer


def test_only_a_writer_that_may_map_its_reservation_is_named_with_it(client):
    """A writer of another node cannot map the block (``PendingWrite``): its bytes go through
    the owner's checked ``write``, so its reservation names no process and ends at its
    departure; a writer of the block's node, or of no configured node, is named."""
    fabric = datafabric.start(client, mb=4)
    try:
        ctx = fabric._ctx()
        here = processes.this_process()
        named = {}
        for node in (None, "elsewhere"):
            res = ctx.call(
                "reserve",
                name=f"named/{node}",
                type="16 * uint8",
                doc="",
                nbytes=16,
                node=node,
                holder=ctx.holder,
                process=here,
            )
            named[node] = client.run_on_scheduler(writer_of, shm_id=res["shm_id"], offset=res["extent_offset"])
            ctx.call("abort", shm_id=res["shm_id"], extent_offset=res["extent_offset"], extent_id=res["extent_id"])
        assert named == {None: here, "elsewhere": None}
    finally:
        fabric.shutdown()
