"""Attacks on "a departed but living writer's memory is never reused under it"
(``yp/departed.py``, ``datafabric/processes.py``).  Real cluster, real shared memory, real
writer processes whose streams are cut and which are SIGKILLed.

- A writer process whose main thread exited while another of its threads goes on writing
  (``pthread_exit`` in the main thread): ``/proc/<pid>/stat`` then says ``Z`` (the thread
  group leader is a zombie) though the process lives and maps the block.
- Many departed writers at once, some killed, the rest later: the memory returns exactly,
  writer by writer, and ``status()`` adds up.
- A writer whose stream is cut again and again while it writes, while the test fills the
  memory with its own variables: it seals its own bytes, and nobody else's change.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

import datafabric
from datafabric import processes
from datafabric.errors import OutOfSpaceError
from tests.waiting import wait_for


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def adds_up(fabric) -> bool:
    return all(b["free"] + b["used"] == b["capacity"] for b in fabric.status())


def cut_stream(dask_scheduler, client_id: str) -> bool:
    comm = dask_scheduler.client_comms.get(client_id)
    if comm is None:
        return False
    comm.abort()
    return True


def departures(dask_scheduler, client_id: str) -> int:
    return sum(e.get("action") == "remove-client" for _, e in dask_scheduler.get_events(client_id))


def connected(dask_scheduler, client_id: str) -> bool:
    return client_id in dask_scheduler.client_comms


def stranded(dask_scheduler) -> int:
    return len(dask_scheduler.plugins["datafabric-yellowpages"].directory.stranded())


def start_writer(tmp_path, script: str, address: str, *args: str) -> subprocess.Popen:
    path = tmp_path / f"writer{abs(hash(script))}.py"
    path.write_text(script)
    return subprocess.Popen(
        [sys.executable, str(path), address, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def stat(pid: int) -> list[str]:
    """Fields 3 on of ``/proc/<pid>/stat`` (state, ..., start time at 19)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(30)


LEADERLESS = """
import ctypes, sys, threading, time
from distributed import Client
import datafabric
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
creation = fabric.create("departed/leaderless", "", "65536 * float64")

def write():
    while True:
        creation.array[...] = time.time()
        time.sleep(0.01)

threading.Thread(target=write).start()
print(client.id, flush=True)
ctypes.CDLL(None).pthread_exit(None)  # the main thread ends; the writer thread runs on
"""


def test_a_writer_whose_main_thread_exited_while_another_thread_writes_is_not_gone(client, tmp_path):
    """A zombie thread group leader with a live thread is a live process: its mappings are
    the other threads' too.  Its reservation must be kept after its stream is cut."""
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    writer = start_writer(tmp_path, LEADERLESS, client.scheduler.address)
    try:
        writer_id = writer.stdout.readline().strip()
        assert writer_id, "the writer did not start"
        reserved = used(fabric)
        assert reserved > before
        them = processes.this_process() | {"pid": writer.pid, "started": int(stat(writer.pid)[19])}
        wait_for(lambda: stat(writer.pid)[0] == "Z", "the main thread to exit")
        client.run_on_scheduler(cut_stream, client_id=writer_id)
        wait_for(lambda: client.run_on_scheduler(departures, client_id=writer_id), "the departure")
        time.sleep(3)  # checked at 0.5, 1 and 2 s
        assert used(fabric) == reserved, "a live writer's reservation was given back"
        assert not processes.gone(them), "a process with a running thread counted as gone"
        kill(writer)
        wait_for(lambda: used(fabric) == before, f"the killed writer's memory to return: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0 and adds_up(fabric)
    finally:
        kill(writer)
        fabric.shutdown()


CREATOR = """
import sys, time
from distributed import Client
import datafabric
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
creation = fabric.create(f"departed/many/{sys.argv[2]}", "", "16384 * float64")
print(client.id, flush=True)
while True:
    creation.array[...] = time.time()
    time.sleep(0.01)
"""


def test_many_departed_writers_return_their_memory_exactly_as_each_is_killed(client, tmp_path):
    """Six writers depart at once and write on: all six reservations are kept; three are
    SIGKILLed and exactly their memory returns; then the rest, and everything is back."""
    fabric = datafabric.start(client, mb=8)
    before = used(fabric)
    writers = [start_writer(tmp_path, CREATOR, client.scheduler.address, str(k)) for k in range(6)]
    try:
        ids = [w.stdout.readline().strip() for w in writers]
        assert all(ids), [
            (kill(w), w.returncode, w.stderr.read()[-2000:]) for w, i in zip(writers, ids, strict=True) if not i
        ]
        reserved = used(fabric)
        each, rest = divmod(reserved - before, 6)
        assert each > 0 and rest == 0, (reserved, before)
        for writer_id in ids:
            client.run_on_scheduler(cut_stream, client_id=writer_id)
        for writer_id in ids:
            wait_for(lambda i=writer_id: client.run_on_scheduler(departures, client_id=i), "the departures")
        time.sleep(2)
        assert used(fabric) == reserved and client.run_on_scheduler(stranded) == 6
        for w in writers[:3]:
            kill(w)
        wait_for(lambda: used(fabric) == before + 3 * each, f"the three killed writers' memory: {fabric.status()}")
        time.sleep(2)  # and no more than theirs, through several checks
        assert used(fabric) == before + 3 * each and client.run_on_scheduler(stranded) == 3 and adds_up(fabric)
        for w in writers[3:]:
            kill(w)
        wait_for(lambda: used(fabric) == before, f"every writer's memory: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0 and adds_up(fabric)
    finally:
        for w in writers:
            kill(w)
        fabric.shutdown()


RECONNECTER = """
import os, sys, time
from distributed import Client
import datafabric
from datafabric.errors import FabricError
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
creation = fabric.create("departed/reconnecting", "", "65536 * float64")
print(client.id, flush=True)
while not os.path.exists(sys.argv[2]):
    creation.array[...] = 42.0
    time.sleep(0.005)
for attempt in range(100):
    try:
        creation.seal()
        print("sealed", flush=True)
        break
    except (FabricError, OSError) as exc:  # its stream may be down right now
        print("retry", type(exc).__name__, exc, flush=True, file=sys.stderr)
        time.sleep(0.2)
"""


def test_a_writer_cut_off_many_times_while_writing_seals_its_own_bytes_and_nobody_else_s(client, tmp_path):
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    go = tmp_path / "seal-now"
    writer = start_writer(tmp_path, RECONNECTER, client.scheduler.address, str(go))
    mine = {}
    try:
        writer_id = writer.stdout.readline().strip()
        assert writer_id, "the writer did not start"
        for cut in range(1, 6):
            wait_for(lambda: client.run_on_scheduler(connected, client_id=writer_id), "the writer to reconnect")
            assert client.run_on_scheduler(cut_stream, client_id=writer_id)
            wait_for(lambda c=cut: client.run_on_scheduler(departures, client_id=writer_id) >= c, "the departure")
            time.sleep(0.7)  # a check in between: the writer lives
            for _ in range(4):  # memory a wrong free would hand out goes to these
                name = f"departed/mine/{len(mine)}"
                try:
                    fabric.insert(name, "", "16384 * float64", np.full(16384, -1.0 - len(mine)))
                except OutOfSpaceError:
                    break
                mine[name] = -1.0 - len(mine)
        go.touch()
        assert writer.stdout.readline().strip() == "sealed"
        assert (fabric.get("departed/reconnecting") == 42.0).all()
        for name, value in mine.items():
            assert (fabric.get(name) == value).all(), f"{name} took the writer's bytes"
        for name in [*mine, "departed/reconnecting"]:
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"every byte to return: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0 and adds_up(fabric)
    finally:
        kill(writer)
        fabric.shutdown()


def write_through_retirement(fabric, flags: str) -> str:
    """A task's create in its worker's own block, written on after its worker was retired,
    then sealed: what the seal did is written down (the task's result may never arrive)."""
    import os
    from pathlib import Path

    from datafabric.errors import FabricError, WorkerLostError

    creation = fabric.create("retired/own", "", "16384 * float64", fill=-1.0)
    Path(flags, f"created-{os.getpid()}").write_text(str(creation._write.local))
    deadline = time.monotonic() + 60
    while not Path(flags, "go").exists() and time.monotonic() < deadline:
        creation.array[...] = 9.5
        time.sleep(0.01)
    creation.array[...] = 9.5
    try:
        creation.seal()
        outcome = "sealed"
    except WorkerLostError:  # HolderAwayError among them: the worker counted gone
        outcome = "WorkerLostError"
    except FabricError as exc:
        outcome = type(exc).__name__
    Path(flags, f"outcome-{os.getpid()}").write_text(outcome)
    return outcome


def test_a_worker_retired_while_its_task_writes_into_its_own_block_changes_nobody_s_bytes(tmp_path):
    """``retire_workers`` removes a worker whose task is filling a ``create`` in the worker's
    own block; the memory is filled meanwhile, the task writes on and seals.  Nobody's bytes
    change, the seal works (the variable holds the task's bytes) or is refused by name, and
    once the worker's process is gone every byte returns.  (Dask runs the task again on the
    other worker, which seals the name with the same bytes.)"""
    import os
    from pathlib import Path

    from distributed import Client

    from tests.conftest import local_cluster

    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=4)
        before = used(fabric)
        a = sorted(client.scheduler_info()["workers"])[0]
        pid = client.run(os.getpid, workers=[a])[a]
        task = client.submit(write_through_retirement, fabric, str(tmp_path), workers=[a], pure=False)
        wait_for(lambda: Path(tmp_path, f"created-{pid}").exists(), "the task's create")
        assert Path(tmp_path, f"created-{pid}").read_text() == "True"  # in its worker's own block
        client.retire_workers([a], close_workers=False)
        wait_for(lambda: a not in client.scheduler_info()["workers"], "the worker's retirement")
        mine = {}
        try:
            while True:
                name = f"retired/mine/{len(mine)}"
                fabric.insert(name, "", "16384 * float64", np.full(16384, 1.0 + len(mine)))
                mine[name] = 1.0 + len(mine)
        except OutOfSpaceError:
            pass
        Path(tmp_path, "go").touch()
        outcome = wait_for(lambda: Path(tmp_path, f"outcome-{pid}").read_text(), "the seal", ignoring=(OSError,))
        assert outcome in ("sealed", "WorkerLostError", "VariableUnavailableError"), outcome
        changed = [n for n, v in mine.items() if not (fabric.get(n) == v).all()]
        assert not changed, f"{changed} hold the retired worker's bytes"
        task.cancel()
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or processes.start_time(pid) is None, "a's exit", 120)
        wait_for(lambda: not any(b.get("orphaned") for b in fabric.status()), "the blocks' adoption", timeout=120)
        outcomes = [f.read_text() for f in Path(tmp_path).glob("outcome-*")]  # Dask may run it again elsewhere
        if "retired/own" in fabric.get_list("retired/own"):
            assert "sealed" in outcomes, outcomes
            assert (fabric.get("retired/own") == 9.5).all()
            fabric.delete("retired/own")
        for name in mine:
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"every byte to return: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0 and adds_up(fabric)
        fabric.shutdown()


def test_writers_departing_and_killed_during_defragments_keep_everyone_s_bytes(client, tmp_path):
    """Two writers each hold a reservation among variables of the test's, half of them
    deleted; their streams are cut while the blocks are compacted, again and again, with
    the freed room filled in between.  The reservations never move under them: the one
    sealed after it all holds its bytes; the one SIGKILLed during a compaction gives its
    memory back; every variable of the test keeps its bytes throughout."""
    import random
    import threading

    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    rng = random.Random(5)
    mine: dict[str, float] = {}
    made = iter(range(10**6))

    def insert_some(count: int) -> None:
        for _ in range(count):
            k = next(made)
            name, value = f"defrag/mine/{k}", float(k + 1)
            try:
                fabric.insert(name, "", "8192 * float64", np.full(8192, value))
            except OutOfSpaceError:
                return
            mine[name] = value

    def check() -> None:
        for name, value in mine.items():
            view = fabric.get(name, cache=False)
            assert (view == value).all(), f"{name} holds {np.unique(view)[:4]}, not {value}"
            del view

    insert_some(8)
    go = tmp_path / "seal-now"
    sealer = start_writer(tmp_path, RECONNECTER, client.scheduler.address, str(go))
    insert_some(8)
    doomed = start_writer(tmp_path, CREATOR, client.scheduler.address, "doomed")
    try:
        ids = [sealer.stdout.readline().strip(), doomed.stdout.readline().strip()]
        assert all(ids), ids
        insert_some(8)
        for compaction in range(5):
            for name in rng.sample(sorted(mine), len(mine) // 2):
                fabric.delete(name)
                del mine[name]
            for writer_id in ids:
                threading.Timer(
                    rng.random() * 0.05, client.run_on_scheduler, (cut_stream,), {"client_id": writer_id}
                ).start()
            if compaction == 3:
                threading.Timer(rng.random() * 0.05, doomed.kill).start()
            fabric.defragment()
            check()
            insert_some(6)
            check()
        go.touch()
        said = sealer.stdout.readline().strip()
        if said != "sealed":  # it gave up or died: what it met says why
            kill(sealer)
            raise AssertionError(f"the writer said {said!r}; its errors: {sealer.stderr.read()[:6000]}")
        assert (fabric.get("departed/reconnecting") == 42.0).all()
        check()
        for name in [*mine, "departed/reconnecting"]:
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"every byte to return: {fabric.status()}")
        assert client.run_on_scheduler(stranded) == 0 and adds_up(fabric)
    finally:
        kill(sealer)
        kill(doomed)
        fabric.shutdown()
