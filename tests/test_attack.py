"""Adversarial tests of the free / move / adopt protocols (issue 18's fixes).

Each test drives real worker processes (and real SIGSTOP / SIGKILL) into a window one of
the protocols leaves open, and checks an invariant of ``docs/protocols.md`` or the
README: a refused call changes nothing, and a variable's memory is freed once the
variable is deleted and unread.  Every variable's bytes are derived from its name, so a
wrong byte shows.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import numpy as np
import pytest
from distributed import Client, Event

from datafabric import errors, start
from tests.conftest import local_cluster, simulated_nodes
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1 << 20


def data_of(name: str, nbytes: int) -> np.ndarray:
    """The bytes a variable named ``name`` holds: drawn from a seed of its name."""
    return np.random.default_rng(zlib.crc32(name.encode())).integers(0, 256, nbytes, dtype=np.uint8)


def insert_here(fabric, names: list[str], nbytes: int) -> None:
    """In a task: every insert lands in this worker's own block (no RPC to place it)."""
    for name in names:
        fabric.insert(name, "", np.uint8, data_of(name, nbytes))


def hold_a_reservation(fabric, name: str, event: str) -> bool:
    """In a task: an in-place write left open until ``event`` is set."""
    with fabric.create(name, "", "1024 * uint8") as out:
        out[:] = 7
        Event(event).wait(60)
    return True


def plugin_extents(shm_id: str, dask_worker=None) -> list[tuple[int, int, int]]:
    return dask_worker.plugins["datafabric"].block_extents(shm_id)


def names_in(fabric, shm_id: str) -> list[str]:
    """The names the directory locates in block ``shm_id``."""
    return [n for n in fabric.get_list() if any(s == shm_id for _, s, _ in fabric.get_locations(n))]


def block_of(fabric, worker: str) -> dict:
    [row] = [r for r in fabric.status() if r["worker"] == worker]
    return row


def test_a_refused_migrating_deallocate_changes_nothing(client, fabric):
    """README: "A refused call leaves nothing allocated and nothing visible".  A
    ``deallocate(migrate=True)`` refused because a local insert is open in the block must
    leave its variables where they were, and allocate nothing elsewhere."""
    owner, other = sorted(client.scheduler_info()["workers"])
    names = [f"refused/{i}" for i in range(4)]
    client.submit(insert_here, fabric, names, MiB, workers=[owner], pure=False).result()
    before = {r["shm_id"]: r for r in fabric.status()}
    row = block_of(fabric, owner)
    assert names_in(fabric, row["shm_id"]) == names and row["variables"] == len(names)
    event = Event("attack-held-open", client=client)
    held = client.submit(hold_a_reservation, fabric, "refused/held", event.name, workers=[owner], pure=False)
    try:
        wait_for(lambda: block_of(fabric, owner)["reserved"] == 1, "the open write's reservation")
        with pytest.raises(errors.BlockInUseError):
            fabric.deallocate(row["node"], row["shm_id"], migrate=True)
        after = {r["shm_id"]: r for r in fabric.status()}
        used_before = sum(r["used"] for r in before.values())
        used_after = sum(r["used"] for r in after.values())
        reserved = after[row["shm_id"]]["used"] - before[row["shm_id"]]["used"]  # the open write's extent
        assert names_in(fabric, row["shm_id"]) == names, (
            f"the refused deallocate moved the variables away: the block now holds "
            f"{names_in(fabric, row['shm_id'])}, the other {names_in(fabric, block_of(fabric, other)['shm_id'])}"
        )
        assert used_after - used_before == reserved, (
            f"the refused deallocate left {(used_after - used_before - reserved) / MiB:.2f} MiB allocated"
        )
    finally:
        event.set()
        held.result(timeout=30)
    for name in names:
        assert np.array_equal(fabric.get(name), data_of(name, MiB))


def test_a_variable_deleted_while_its_orphaned_block_is_adopted_is_freed():
    """A variable deleted and unread has its memory freed (README, delete).  Here the
    delete lands while a peer is adopting the block of the variable's dead owner: the
    directory sent the peer the extent ids to keep before the delete, and the free the
    delete asks for is skipped (the block has no owner), so nobody frees it."""
    os.environ["DASK_DATAFABRIC__NODE_ID"] = "attack-adopt"  # both workers on one node
    try:
        cluster = local_cluster(n_workers=2)
    finally:
        del os.environ["DASK_DATAFABRIC__NODE_ID"]
    with cluster, Client(cluster) as client:
        fabric = start(client, mb=64)
        try:
            owner, peer = sorted(client.scheduler_info()["workers"])
            names = [f"adopt/{i}" for i in range(20)]
            client.submit(insert_here, fabric, names, 64 * 1024, workers=[owner], pure=False).result()
            shm_id = block_of(fabric, owner)["shm_id"]
            pids = client.run(os.getpid)
            deleted = names[:10]
            os.kill(pids[peer], signal.SIGSTOP)  # the adoption waits for it
            with ThreadPoolExecutor(1) as pool:
                try:
                    os.kill(pids[owner], signal.SIGKILL)
                    wait_for(lambda: owner not in client.scheduler_info()["workers"], "the owner's removal")
                    time.sleep(1.0)  # the YellowPages has asked the peer to adopt by now
                    # Deletes of the block's variables land now, or wait for the adoption.
                    deleting = pool.submit(lambda: [fabric.delete(name) for name in deleted])
                    time.sleep(1.0)
                finally:
                    os.kill(pids[peer], signal.SIGCONT)
                deleting.result(timeout=60)
            row = wait_for(
                lambda: next((r for r in fabric.status() if r["shm_id"] == shm_id and r["worker"]), None),
                "the adoption",
            )
            holder = row["worker"]
            live = [e for e in client.run(plugin_extents, shm_id, workers=[holder])[holder] if e[2] != 0]
            assert names_in(fabric, shm_id) == sorted(names[10:]) and row["variables"] == len(names[10:])
            assert len(live) == len(names) - len(deleted), (
                f"block {shm_id} still holds {len(live)} extents after its adoption, for "
                f"{row['variables']} sealed variables: the {len(live) - row['variables']} "
                "deleted while it was adopted were never freed"
            )
            for name in names[10:]:
                assert np.array_equal(fabric.get(name), data_of(name, 64 * 1024))
        finally:
            fabric.shutdown()


def read_private_copies(fabric, name: str, seconds: float) -> list:
    """In a task on another node: the bytes over the comms (chunk by chunk, under a
    lease), again and again for ``seconds``; each read's checksum, or its error."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(zlib.crc32(fabric.get(name, cache=False).tobytes()))
        except Exception as exc:  # noqa: BLE001 - the symptom is the point
            out.append(repr(exc))
    return out


def test_a_remote_read_under_lease_survives_a_migrating_deallocate():
    """docs/protocols.md: "the bytes at an offset the directory gave it with a lease are
    the variable's, unchanged, for as long as it holds the lease".  A reader on another
    node holds a lease and pulls the bytes chunk by chunk from the owner's block; a
    ``deallocate(migrate=True)`` of that block takes its exclusive hold, which waits for
    no lease, migrates the variable and unlinks the block under the reader."""
    with simulated_nodes(("attack-a", "attack-b")) as (_, client):
        fabric = start(client, mb=2 * 320)
        try:
            fabric.allocate(2 * 320)  # a second block on each node, to migrate into
            nodes = client.run(lambda: __import__("dask").config.get("datafabric.node-id"))
            a = next(w for w, n in nodes.items() if n == "attack-a")
            b = next(w for w, n in nodes.items() if n == "attack-b")
            name, nbytes = "remote/big", 256 * MiB
            client.submit(insert_here, fabric, [name], nbytes, workers=[a], pure=False).result()
            [(node, shm_id, _)] = fabric.get_locations(name)
            expected = zlib.crc32(data_of(name, nbytes).tobytes())
            reading = client.submit(read_private_copies, fabric, name, 4.0, workers=[b], pure=False)
            time.sleep(1.5)  # reads are running
            fabric.deallocate(node, shm_id, migrate=True)
            results = reading.result(timeout=60)
            wrong = [r for r in results if r != expected]
            assert not wrong, (
                f"{len(wrong)} of {len(results)} reads holding their lease failed or read wrong bytes when "
                f"their block was migrated away: {sorted(set(map(str, wrong)))[:3]}"
            )
        finally:
            fabric.shutdown()
