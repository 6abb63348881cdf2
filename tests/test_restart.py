"""A scheduler that crashes and is restarted at the same address takes its fabric back.

Real processes: ``dask scheduler --preload datafabric.preload`` and one ``dask worker``
(with its nanny) on each of two simulated nodes.  The scheduler is SIGKILLed; its workers
close, as Dask workers do when they lose their scheduler, and leave their blocks in
/dev/shm.  A new scheduler on the same port and new workers (what a supervisor would
start) rebuild the directory from the blocks' headers.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client, get_worker

import datafabric
from datafabric.cleanup import remove
from tests.conftest import fabric_segments
from tests.processes import ProcessCluster
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
NODES = ("restart-a", "restart-b")


def plant_copy(shm_id: str) -> str:
    """A well-formed block of the fabric, same bytes, but readable by others: what a
    second user who knows the scheduler's address could leave in /dev/shm."""
    name = shm_id[: -len("0123456789abcdef")] + "0123456789abcdef"
    with open(f"/dev/shm/{shm_id}", "rb") as src, open(f"/dev/shm/{name}", "xb") as dst:
        dst.write(src.read())
    os.chmod(f"/dev/shm/{name}", 0o644)
    return name


def worker_of(client: Client) -> dict[str, str]:
    nodes = client.run(lambda: dask.config.get("datafabric.node-id"))
    return {node: worker for worker, node in nodes.items()}


def insert_here(fabric, items):
    return fabric.insert_many([(name, f"doc of {name}", np.float64, data) for name, data in items.items()])


def insert_ones(fabric, name, nbytes):
    return fabric.insert(name, "", np.float64, np.ones(nbytes // 8))


def hold(fabric, name):
    """A reader that keeps its view: the variable is deleted while read."""
    get_worker()._datafabric_test_held = fabric.get(name)


def write_without_sealing(fabric, name):
    creation = fabric.create(name, "", f"{MiB // 8} * float64")
    creation.array[:] = 1.0
    get_worker()._datafabric_test_unsealed = creation


def read_here(fabric, names):
    return {name: np.array(fabric.get(name)) for name in names}


@pytest.fixture
def processes():
    procs = ProcessCluster(NODES)
    procs.start()
    try:
        yield procs
    finally:
        procs.stop()
        from yp.plugin import durable_fabric_id

        left = [s for s in fabric_segments() if s.startswith(f"dfab_{durable_fabric_id(procs.address)[:8]}_")]
        for name in set(left) - set(remove(left)):  # a planted segment, which cleanup leaves alone
            os.unlink(f"/dev/shm/{name}")


def test_scheduler_restart_rebuilds_the_directory_from_the_blocks(processes):
    rng = np.random.default_rng(7)
    data = {
        node: {f"{node}/v{i}": rng.random(rng.integers(1, 400_000)) for i in range(4)}
        | {f"{node}/small": rng.random(3)}
        for node in NODES
    }
    expected = {name: array for per_node in data.values() for name, array in per_node.items()}
    expected["from-client"] = rng.random(5000)  # streamed by a client off the nodes, sealed by the owner
    replicated = f"{NODES[0]}/v0"

    with Client(processes.address) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)  # the preloaded, durable fabric
        workers = worker_of(client)
        for node, items in data.items():
            client.submit(insert_here, fabric, items, workers=[workers[node]]).result()
        fabric.replicate(replicated, nodes=[NODES[1]])
        fabric.insert("from-client", "", np.float64, expected["from-client"])
        client.submit(
            insert_here, fabric, {"deleted-while-read": rng.random(1000)}, workers=[workers[NODES[0]]]
        ).result()
        client.submit(hold, fabric, "deleted-while-read", workers=[workers[NODES[0]]], pure=False).result()
        fabric.delete("deleted-while-read")
        client.submit(insert_here, fabric, {"deleted": rng.random(1000)}, workers=[workers[NODES[1]]]).result()
        fabric.delete("deleted")
        client.submit(write_without_sealing, fabric, "never-sealed", workers=[workers[NODES[1]]], pure=False).result()
        blocks = {b["shm_id"]: b for b in fabric.status()}
        assert sum(b["reserved"] for b in blocks.values()) == 1

    processes.crash_scheduler()
    assert set(blocks) <= set(fabric_segments()), "the blocks must outlive the scheduler"
    planted = plant_copy(sorted(blocks)[0])  # another user's file with the fabric's prefix
    processes.start()

    with Client(processes.address) as client:
        client.wait_for_workers(2)
        again = datafabric.connect(client)
        assert again.fabric_id == fabric.fabric_id
        wait_for(lambda: set(again.get_list()) == set(expected), f"names after restart: {again.get_list()}")
        workers = worker_of(client)

        assert {b["shm_id"] for b in again.status()} == set(blocks), "the planted segment must not be taken"
        os.unlink(f"/dev/shm/{planted}")

        def reclaimed() -> bool:
            """The unsealed write and the deleted variables are free again (once the take-backs'
            waits for kept views end: yp/declarations.py)."""
            status = again.status()
            tiled = all(b["free"] + b["used"] == b["capacity"] and b["reserved"] == 0 for b in status)
            return tiled and sum(b["used"] for b in blocks.values()) - sum(b["used"] for b in status) > MiB

        wait_for(reclaimed, f"the unsealed write and the deleted variables still hold memory: {again.status()}")

        assert {loc[0] for loc in again.get_locations(replicated)} == set(NODES)
        assert again.info(f"{NODES[1]}/v1")["doc"] == f"doc of {NODES[1]}/v1"
        for node in NODES:  # every variable, byte for byte, read on each node
            got = client.submit(read_here, again, sorted(expected), workers=[workers[node]], pure=False).result()
            for name, array in expected.items():
                np.testing.assert_array_equal(got[name], array, err_msg=name)

        # the rebuilt fabric works on: inserts, defragmentation, deletes down to empty
        client.submit(insert_here, again, {"after": np.arange(10.0)}, workers=[workers[NODES[0]]]).result()
        again.defragment()
        for name in again.get_list():
            again.delete(name)
        wait_for(lambda: all(b["used"] == 0 for b in again.status()), "space still used after deleting everything")
        again.shutdown()
    assert not set(blocks) & set(fabric_segments())


def pin_of(view: np.ndarray):
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def listed(fabric) -> list[str]:
    try:
        return fabric.get_list()
    except OSError:  # the client is still reconnecting
        return []


def test_views_kept_through_a_restart_get_their_leases_back(processes):
    """A client process outlives the scheduler with a view open.  Once its block is back,
    the view's lease is declared again: defragmenting does not move the memory under it,
    and deleting the variable frees it only when the view is dropped."""
    held_data = np.arange(200_000.0)
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        on_a = worker_of(client)[NODES[0]]
        items = {"gap": np.zeros(100_000), "held": held_data, "after": np.ones(1000)}
        client.submit(insert_here, fabric, items, workers=[on_a]).result()
        view = fabric.get("held")  # mapped straight from node A's block: this process is on node A
        assert not view.flags.owndata and view.flags.writeable is False
        fabric.delete("gap")  # a hole before "held": an unleased "held" would be moved into it
        lease = pin_of(view).lease  # the release message the view's pin sends when it dies
        granted_before = lease["var_id"]

        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected
        wait_for(lambda: set(listed(fabric)) == {"held", "after"}, "the variables did not come back")
        wait_for(lambda: lease["var_id"] != granted_before, "the kept view's lease was not declared again")

        assert "held" not in fabric.defragment()["moved"]
        np.testing.assert_array_equal(view, held_data)
        fabric.delete("held")
        used = sum(b["used"] for b in fabric.status())
        np.testing.assert_array_equal(view, held_data)
        del view  # the last view goes: its lease ends and the memory is freed
        wait_for(lambda: sum(b["used"] for b in fabric.status()) < used - held_data.nbytes, "memory not freed")
        fabric.shutdown()


def test_an_insert_placed_by_compacting_the_writer_s_own_block_survives_a_restart(processes):
    """A task's insert that does not fit its worker's own block in one piece is placed by
    the YellowPages, which compacts that block and reserves there.  The insert returned,
    so its header must say sealed: a restarted scheduler lists it again."""
    small, big = 1_000_000, 6_000_000
    rng = np.random.default_rng(3)
    smalls = {f"a/s{i:02d}": rng.random(small // 8) for i in range(30)}
    with Client(processes.address) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)  # 32 MiB per node: one block each
        workers = worker_of(client)
        a, b = workers[NODES[0]], workers[NODES[1]]
        client.submit(insert_ones, fabric, "b/fill", 30_000_000, workers=[b]).result()
        client.submit(insert_here, fabric, smalls, workers=[a]).result()
        for name in sorted(smalls)[::2]:  # node A: free space in 1 MB pieces and a short tail
            fabric.delete(name)
            del smalls[name]
        blocks = {row["node"]: row for row in fabric.status()}
        assert blocks[NODES[0]]["largest_free"] < big <= blocks[NODES[0]]["free"], (
            f"A must need compaction: {fabric.status()}"
        )
        assert blocks[NODES[1]]["free"] < big, "B must have no room for 'big'"

        data = rng.random(big // 8)
        [(node, shm_id, _)] = client.submit(insert_here, fabric, {"big": data}, workers=[a]).result()[0]
        assert (node, shm_id) == (NODES[0], blocks[NODES[0]]["shm_id"]), "'big' must land in A's compacted block"
        reserved = {row["node"]: row["reserved"] for row in fabric.status()}
        expected = {*smalls, "b/fill", "big"}

    processes.crash_scheduler()
    processes.start()

    with Client(processes.address) as client:
        client.wait_for_workers(2)
        again = datafabric.connect(client)
        wait_for(lambda: set(again.get_list()) >= set(expected) - {"big"}, f"names after restart: {again.get_list()}")
        time.sleep(1)  # both nodes are back: give a late name the same chance
        listed_after = again.get_list()
        got = None
        if "big" in listed_after:
            got = client.submit(read_here, again, ["big"], workers=[worker_of(client)[NODES[0]]], pure=False).result()
        again.shutdown()
    problems = [f"'big' returned, yet A's block held {reserved[NODES[0]]} RESERVED extent(s)"] * bool(
        reserved[NODES[0]]
    )
    if "big" not in listed_after:
        problems.append(f"'big' (its insert returned) LOST after the restart; listed: {sorted(listed_after)}")
    assert not problems, problems
    np.testing.assert_array_equal(got["big"], data)
