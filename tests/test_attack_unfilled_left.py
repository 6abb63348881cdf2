"""Attacks on unfilled homes (``yp/chunk_homes.py``) and the one-way ticket end, by
processes that *leave* the fabric without dying.

A process "leaving" is Dask's ``remove_client`` / ``remove_worker``: the scheduler lost
its stream.  That is not its death: a client whose connection broke reconnects with the
same id, a worker removed for missed heartbeats keeps running its task until its close
waits it out.  Their threads go on copying into the memory they map.  The departure
settles a whole-writer's tickets with nothing confirmed: its unfilled homes are filled
and kept as the chunks' (not freed), so a copy still running lands in its own chunk,
never in memory the fabric gave to another variable.  A Creation's reservation is kept
while its departed producer's process lives (``yp/departed.py``): its late copy stays in
its own memory, and back, it seals or aborts as if it had never left.

Real cluster (worker processes), real shared memory; the writer is a second Dask client
of the test process whose scheduler stream is cut while its ``fill_chunks`` copy waits.
"""

from __future__ import annotations

import threading

import numpy as np
from distributed import Client

import datafabric
from datafabric.datasets import writes
from datafabric.datasets.writes import fill_chunks
from datafabric.errors import FabricError, OutOfSpaceError
from datafabric.fabric import Fabric
from tests.waiting import wait_for

ROWS, COLS = 256, 64  # a chunk: 128 KiB of float64
FILL, MINE, LATE = -1.0, 1.0, 9.5


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def cut_stream(dask_scheduler, client_id: str) -> None:
    """The scheduler's end of a client's stream breaks (a network hiccup): it removes the
    client, which reconnects with the same id."""
    dask_scheduler.client_comms[client_id].abort()


def unfilled_homes(dask_scheduler) -> int:
    return len(dask_scheduler.plugins["datafabric-yellowpages"].datasets.homes.unfilled)


def reservations_of(dask_scheduler, client_id: str) -> int:
    pending = dask_scheduler.plugins["datafabric-yellowpages"].directory.pending.values()
    return sum(p.holder == client_id for p in pending)


def take_free_memory(fabric, prefix: str) -> list[str]:
    """Variables of ``MINE`` in all the memory the fabric has free now."""
    mine: list[str] = []
    try:
        while True:
            fabric.insert(f"{prefix}/{len(mine)}", "", f"{ROWS * COLS} * float64", np.full(ROWS * COLS, MINE))
            mine.append(f"{prefix}/{len(mine)}")
    except OutOfSpaceError:
        return mine


def test_a_whole_writer_that_left_alive_never_writes_into_memory_given_to_others(cluster, client):
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    mine: list[str] = []
    started, go = threading.Event(), threading.Event()
    try:
        ds = fabric.create_dataset("left-alive", shape=(ROWS, COLS), chunks=(ROWS, COLS), fillvalue=FILL)
        failures: list[BaseException] = []
        with Client(cluster) as writer_client:
            writer = Fabric(fabric.address, fabric.fabric_id, client=writer_client)

            def fill(view, index):
                started.set()
                go.wait(30)
                view[...] = LATE  # the copy of a process the scheduler thinks has left

            def write():
                try:
                    fill_chunks(writer.dataset("left-alive"), [(0, 0)], fill)
                except BaseException as exc:  # noqa: BLE001 (reported below)
                    failures.append(exc)

            thread = threading.Thread(target=write)
            thread.start()
            assert started.wait(30), failures
            client.run_on_scheduler(cut_stream, client_id=writer_client.id)
            wait_for(lambda: client.run_on_scheduler(unfilled_homes) == 0, "the departure to settle the ticket")
            mine += take_free_memory(fabric, "left-alive/mine")
            go.set()
            thread.join(30)
            assert not thread.is_alive()
            changed = [n for n in mine if not (fabric.get(n) == MINE).all()]
            assert not changed, f"{len(changed)} variables of another process hold the departed writer's bytes"
            try:
                ds.seal()
            except FabricError:
                pass  # the dataset may have ended with a chunk it could not seal
            else:
                assert np.isin(fabric.dataset("left-alive")[...], [FILL, LATE]).all()
    finally:
        go.set()
        for name in mine:
            fabric.delete(name)
        for name in fabric.datasets("left-alive"):
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"the memory to return: {fabric.status()}")
        fabric.shutdown()


def has_left(dask_scheduler, client_id: str) -> bool:
    """The scheduler removed the client (its hooks, the YellowPages' among them, ran)."""
    return any(e.get("action") == "remove-client" for _, e in dask_scheduler.get_events(client_id))


def test_a_creator_that_left_alive_never_writes_into_memory_given_to_others(cluster, client):
    """A Creation's producer whose client's stream breaks: its process lives and maps the
    block, so its reservation is not freed at the departure (``yp/departed.py``).  Memory
    taken by others meanwhile keeps their bytes when it goes on copying; reconnected, its
    seal works and the variable holds what it wrote."""
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    mine: list[str] = []
    try:
        with Client(cluster) as writer_client:
            writer = Fabric(fabric.address, fabric.fabric_id, client=writer_client)
            creation = writer.create("left-alive/created", "", f"{ROWS * COLS} * float64", fill=FILL)
            assert client.run_on_scheduler(reservations_of, client_id=writer_client.id) == 1
            client.run_on_scheduler(cut_stream, client_id=writer_client.id)
            wait_for(lambda: client.run_on_scheduler(has_left, client_id=writer_client.id), "the departure")
            mine += take_free_memory(fabric, "left-alive/mine")
            creation.array[...] = LATE  # the producer, alive, goes on
            changed = [n for n in mine if not (fabric.get(n) == MINE).all()]
            assert not changed, f"{len(changed)} variables of another process hold the departed creator's bytes"
            wait_for(lambda: writer_client.status == "running", "the writer's client to reconnect", timeout=30)
            creation.seal()  # the reservation is still its own
            assert (fabric.get("left-alive/created") == LATE).all()
            fabric.delete("left-alive/created")
    finally:
        for name in mine:
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"the memory to return: {fabric.status()}")
        fabric.shutdown()


def test_a_creator_that_left_and_came_back_gives_its_reservation_back_by_aborting(cluster, client):
    """Back after its departure, the producer aborts: the reservation it no longer writes
    returns at once, with no wait for its process to end."""
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    try:
        with Client(cluster) as writer_client:
            writer = Fabric(fabric.address, fabric.fabric_id, client=writer_client)
            creation = writer.create("left-alive/aborted", "", f"{ROWS * COLS} * float64", fill=FILL)
            client.run_on_scheduler(cut_stream, client_id=writer_client.id)
            wait_for(lambda: client.run_on_scheduler(has_left, client_id=writer_client.id), "the departure")
            wait_for(lambda: writer_client.status == "running", "the writer's client to reconnect", timeout=30)
            assert used(fabric) > before  # kept while its process lives
            creation.abort()
            wait_for(lambda: used(fabric) == before, f"the aborted reservation to return: {fabric.status()}")
            assert client.run_on_scheduler(reservations_of, client_id=writer_client.id) == 0
    finally:
        fabric.shutdown()


def test_an_end_sent_before_its_writer_reconnected_never_ends_a_ticket_begun_after(cluster, client, monkeypatch):
    """A writer's stream breaks while one of its tickets copies (its departure ends it);
    the client reconnects with the same id and begins another ticket; then the first
    copy returns and its one-way end arrives.  That end must not count as the second
    ticket's: the seal has to wait for the second, or its bytes would change a sealed
    chunk."""
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    first_copying, first_go, second_copying, second_go = (threading.Event() for _ in range(4))
    failures: list[BaseException] = []
    original = writes._write_piece

    def slow_piece(*args):  # the second ticket's copy (a part of chunk 1) waits
        second_copying.set()
        second_go.wait(30)
        original(*args)

    monkeypatch.setattr(writes, "_write_piece", slow_piece)
    try:
        ds = fabric.create_dataset("left-alive/twice", shape=(2 * ROWS, COLS), chunks=(ROWS, COLS), fillvalue=FILL)
        with Client(cluster) as writer_client:
            writer = Fabric(fabric.address, fabric.fabric_id, client=writer_client)
            mine = writer.dataset("left-alive/twice")

            def fill(view, index):
                first_copying.set()
                first_go.wait(30)
                view[...] = MINE

            def run(call):
                try:
                    call()
                except BaseException as exc:  # noqa: BLE001 (reported below)
                    failures.append(exc)

            first = threading.Thread(target=run, args=(lambda: fill_chunks(mine, [(0, 0)], fill),))
            first.start()
            assert first_copying.wait(30), failures
            client.run_on_scheduler(cut_stream, client_id=writer_client.id)
            wait_for(lambda: client.run_on_scheduler(unfilled_homes) == 0, "the departure to settle the ticket")
            wait_for(lambda: writer_client.status == "running", "the writer's client to reconnect", timeout=30)

            def second_write():
                mine[ROWS : ROWS + 8] = LATE

            second = threading.Thread(target=run, args=(second_write,))
            second.start()
            assert second_copying.wait(30), failures
            first_go.set()
            first.join(30)
            sealed = threading.Thread(target=run, args=(ds.seal,))
            sealed.start()
            sealed.join(2)
            sealing_waited = sealed.is_alive()
            second_go.set()
            second.join(30)
            sealed.join(30)
            assert not failures, failures
            assert sealing_waited, "the seal ran while a ticket was still copying"
            got = fabric.dataset("left-alive/twice")[ROWS : ROWS + 8]
            assert (got == LATE).all()
            del got
    finally:
        first_go.set()
        second_go.set()
        for name in fabric.datasets("left-alive"):
            fabric.delete(name)
        wait_for(lambda: used(fabric) == before, f"the memory to return: {fabric.status()}")
        fabric.shutdown()
