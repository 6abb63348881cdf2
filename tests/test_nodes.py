"""Several simulated nodes on one machine (workers with distinct node ids) behave like
separate machines: no shared-memory shortcut between them, data crosses on Dask's comms."""

from __future__ import annotations

import sys

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import get_worker

import datafabric
from datafabric import errors, layout
from tests.conftest import simulated_nodes
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
NODES = ("node-a", "node-b")


@pytest.fixture(scope="module")
def nodes_client():
    with simulated_nodes(NODES, per_node=2) as (_, client):
        yield client


@pytest.fixture
def nfabric(nodes_client):
    fabric = datafabric.start(nodes_client, mb=4 * 32)  # 32 MiB per worker
    yield fabric
    fabric.shutdown()


def node_workers(client) -> dict[str, list[str]]:
    env = client.run(lambda: dask.config.get("datafabric.node-id"))
    return {node: sorted(w for w, n in env.items() if n == node) for node in NODES}


def insert_here(fabric, name, data):
    return fabric.insert(name, "", np.float64, data)


def read_here(fabric, name, cache=True):
    view = fabric.get(name, cache=cache)
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    mapped = getattr(getattr(base, "segment", None), "name", None)
    return float(view.sum()), view.flags.owndata or base is None, mapped


def test_node_ids_come_from_config_and_blocks_are_per_node(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    assert all(len(ws) == 2 for ws in per_node.values())
    nodes = {b["node"] for b in nfabric.status()}
    assert nodes == set(NODES)


def test_remote_get_adds_a_replica_and_the_next_get_is_local(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    a0, b0, b1 = per_node["node-a"][0], per_node["node-b"][0], per_node["node-b"][1]
    data = np.arange(3 * MiB // 8, dtype=np.float64)
    [(node, shm_a, _)] = nodes_client.submit(insert_here, nfabric, "x", data, workers=[a0]).result()
    assert node == "node-a"

    total, private, mapped = nodes_client.submit(read_here, nfabric, "x", workers=[b0]).result()
    assert total == data.sum() and not private
    locations = nfabric.get_locations("x")
    assert [loc[0] for loc in locations] == ["node-a", "node-b"]
    assert mapped == locations[1][1]  # B reads its own node's replica, zero-copy

    # another process of node-b: local at once, through the replica
    total, private, mapped = nodes_client.submit(read_here, nfabric, "x", workers=[b1]).result()
    assert total == data.sum() and not private and mapped == locations[1][1]
    assert len(nfabric.get_locations("x")) == 2


def test_get_without_cache_copies_privately_and_adds_no_location(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    data = np.ones(1000)
    nodes_client.submit(insert_here, nfabric, "y", data, workers=[per_node["node-a"][0]]).result()
    total, private, _ = nodes_client.submit(read_here, nfabric, "y", False, workers=[per_node["node-b"][0]]).result()
    assert total == 1000 and private
    assert len(nfabric.get_locations("y")) == 1


def test_concurrent_remote_gets_on_one_node_fetch_once(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    nodes_client.submit(insert_here, nfabric, "z", np.ones(2 * MiB // 8), workers=[per_node["node-a"][0]]).result()
    futures = [nodes_client.submit(read_here, nfabric, "z", workers=[w], pure=False) for w in per_node["node-b"]]
    assert [f.result()[0] for f in futures] == [2 * MiB // 8] * 2
    assert [loc[0] for loc in nfabric.get_locations("z")] == ["node-a", "node-b"]


def test_where_and_submit_run_next_to_the_data(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    nodes_client.submit(insert_here, nfabric, "w", np.ones(10), workers=[per_node["node-b"][1]]).result()
    assert nfabric.where("w") == per_node["node-b"]
    where = nodes_client.submit(lambda: get_worker().address, workers=nfabric.where("w")).result()
    assert where in per_node["node-b"]
    address, total = nfabric.submit(lambda v: (get_worker().address, float(v.sum())), "w").result()
    assert address in per_node["node-b"] and total == 10


def test_replicate_ahead_of_time(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    nodes_client.submit(insert_here, nfabric, "r", np.ones(10), workers=[per_node["node-a"][0]]).result()
    locations = nfabric.replicate("r", ["node-b"])
    assert [loc[0] for loc in locations] == ["node-a", "node-b"]
    assert nfabric.replicate("r") == locations  # every node has it already
    with pytest.raises(errors.BlockNotFoundError):
        nfabric.replicate("r", ["node-z"])


def test_replicas_are_evicted_least_recently_used_and_last_copies_never(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    a0, b0 = per_node["node-a"][0], per_node["node-b"][0]
    for i in range(3):  # three 14 MiB variables on node-a, replicated onto node-b
        nodes_client.submit(insert_here, nfabric, f"e{i}", np.full(14 * MiB // 8, float(i)), workers=[a0]).result()
        nfabric.replicate(f"e{i}", ["node-b"])
    nodes_client.submit(lambda f: f.get("e0").sum(), nfabric, workers=[a0]).result()  # e0 used last
    # no block anywhere has 18 MiB in one piece: node-b must drop replicas, oldest first
    nodes_client.submit(insert_here, nfabric, "big", np.zeros(18 * MiB // 8), workers=[b0]).result()
    assert nfabric.get_locations("big")[0][0] == "node-b"
    copies = {i: [loc[0] for loc in nfabric.get_locations(f"e{i}")] for i in range(3)}
    assert copies[0] == ["node-a", "node-b"]  # the most recently used replica survives
    assert copies[1] == ["node-a"]  # the least recently used went first
    for i in range(3):  # no variable lost its last copy
        assert copies[i][0] == "node-a" and float(nfabric.get(f"e{i}")[0]) == i


def test_client_off_every_node_streams_inserts_and_reads_private_copies(nodes_client, nfabric):
    with dask.config.set({"datafabric.node-id": "laptop"}):
        fabric = datafabric.connect(nodes_client)
        data = np.arange(100.0)
        [(node, _, _)] = fabric.insert("from-laptop", "", np.float64, data)
        assert node in NODES
        view = fabric.get("from-laptop")
        np.testing.assert_array_equal(view, data)
        assert view.flags.owndata or view.base is not None and not view.flags.writeable
        with pytest.raises(errors.NotOnThisNodeError):
            fabric.create("made-remotely", "", "10 * float64")
    assert fabric.get_list(prefix="from-") == ["from-laptop"]


# -- worker loss ------------------------------------------------------------------------
def kill(client, worker: str) -> None:
    """SIGKILL: no teardown, no atexit; the nanny starts a new worker on the same node."""
    import os
    import signal

    pid = client.run(os.getpid, workers=[worker])[worker]
    os.kill(pid, signal.SIGKILL)


def keep_unsealed(fabric, name):
    """A producer that reserved memory and then dies before sealing."""
    creation = fabric.create(name, "", "1000 * float64")
    creation.array[:] = 1
    get_worker()._datafabric_test_unsealed = creation  # keep it alive, unsealed


def blocks_by_owner(fabric) -> dict[str, str | None]:
    return {b["shm_id"]: (None if b.get("orphaned") else b["worker"]) for b in fabric.status()}


def test_killed_owner_s_blocks_are_adopted_and_its_variables_stay_readable(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    victim, peer = per_node["node-a"]
    data = np.arange(MiB // 8, dtype=np.float64)
    [(_, shm_id, offset)] = nodes_client.submit(insert_here, nfabric, "survivor", data, workers=[victim]).result()
    nodes_client.submit(insert_here, nfabric, "replicated", data, workers=[victim]).result()
    nfabric.replicate("replicated", ["node-b"])
    nodes_client.submit(insert_here, nfabric, "doomed", data, workers=[victim]).result()
    nodes_client.submit(keep_unsealed, nfabric, "never-sealed", workers=[victim]).result()
    capacity = {b["shm_id"]: b["capacity"] for b in nfabric.status()}[shm_id]

    kill(nodes_client, victim)
    wait_for(
        lambda: blocks_by_owner(nfabric)[shm_id] not in (None, victim),
        "a peer to adopt the block",
        ignoring=(Exception,),
    )
    adopter = blocks_by_owner(nfabric)[shm_id]
    assert adopter == peer or adopter in node_workers(nodes_client)["node-a"]

    assert nfabric.get_locations("survivor") == [("node-a", shm_id, offset)]
    total, private, mapped = nodes_client.submit(read_here, nfabric, "survivor", workers=[adopter]).result()
    assert total == data.sum() and not private and mapped == shm_id
    b0 = node_workers(nodes_client)["node-b"][0]
    assert nodes_client.submit(read_here, nfabric, "replicated", workers=[b0]).result()[0] == data.sum()
    np.testing.assert_array_equal(nfabric.get("survivor"), data)
    assert "never-sealed" not in nfabric.get_list()

    # the adopter's allocator is rebuilt from the headers: the unsealed reservation was
    # reclaimed, a delete frees memory, and the block's accounts add up
    nfabric.delete("doomed")
    stats = {b["shm_id"]: b for b in nfabric.status()}[shm_id]
    extent = lambda name: layout.extent_size_for(layout.BLOCK_HEADER_SIZE, name, "131072 * float64", "", MiB)  # noqa: E731
    assert stats["reserved"] == 0
    assert stats["free"] + stats["used"] == capacity
    assert stats["used"] <= extent("survivor") + extent("replicated") + 2 * layout.PAGE


def test_a_node_whose_workers_all_died_comes_back_with_its_data(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    data = np.full(1000, 3.0)
    nodes_client.submit(insert_here, nfabric, "phoenix", data, workers=[per_node["node-a"][0]]).result()
    for worker in per_node["node-a"]:
        kill(nodes_client, worker)
    wait_for(
        lambda: len(node_workers(nodes_client)["node-a"]) == 2 and all(blocks_by_owner(nfabric).values()),
        "node-a's new worker and every block owned",
        ignoring=(Exception,),
    )
    assert "phoenix" in nfabric.get_list()
    b0 = node_workers(nodes_client)["node-b"][0]
    assert nodes_client.submit(read_here, nfabric, "phoenix", workers=[b0]).result()[0] == 3000.0


def a_slice(fabric, name):
    return fabric.get(name)[5::3]


def what_arrived(x):
    from datafabric.references import pin_of

    return float(x.sum()), x.shape, pin_of(x) is not None, x.flags.writeable


def test_a_view_moved_by_dask_to_another_node_arrives_as_a_private_copy(nodes_client, nfabric):
    per_node = node_workers(nodes_client)
    a0, a1, b0 = per_node["node-a"][0], per_node["node-a"][1], per_node["node-b"][0]
    data = np.arange(30_000, dtype=np.float64)
    nodes_client.submit(insert_here, nfabric, "moved", data, workers=[a0]).result()
    on_a = nodes_client.submit(a_slice, nfabric, "moved", workers=[a0], pure=False)
    expected = (float(data[5::3].sum()), data[5::3].shape)
    same_node = nodes_client.submit(what_arrived, on_a, workers=[a1], pure=False).result()
    assert same_node == (*expected, True, False)  # mapped
    other_node = nodes_client.submit(what_arrived, on_a, workers=[b0], pure=False).result()
    assert other_node == (*expected, False, False)  # the bytes, read from a0 into private memory
    assert [loc[0] for loc in nfabric.get_locations("moved")] == ["node-a"]  # no replica from a transfer
