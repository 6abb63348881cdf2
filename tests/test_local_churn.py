"""Local gets in several processes on two simulated nodes racing delete, defragment,
eviction of replicas and migration off a deallocated block: every view reads its own
name's bytes, before and while it is held, and all space comes back at the end."""

from __future__ import annotations

import random
import sys
import time
from collections import Counter, deque

import cloudpickle
import numpy as np
import pytest
from distributed import Event

import datafabric
from datafabric.errors import FabricError, NameNotFoundError
from tests.conftest import simulated_nodes
from tests.test_churn import settles
from tests.test_lifecycle import pattern
from tests.test_local_reads import count_reads, read_counts

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
NODES = ("node-a", "node-b")
ROUNDS = 4  # of each kind of operation the client runs while the readers read
BASE = [f"base/{i}" for i in range(12)]  # put on node-a, replicated to node-b again and again


@pytest.fixture(scope="module")
def two_nodes():
    with simulated_nodes(NODES, per_node=2, nthreads=3) as (_, client):
        yield client


def on_node(client, node: str) -> list[str]:
    env = client.run(lambda: __import__("dask").config.get("datafabric.node-id"))
    return sorted(w for w, n in env.items() if n == node)


def reader(fabric, stop: str, seed: int) -> dict:
    """Gets (one by one and in batches) of the base names, checked; some views held a while
    and checked again; until the Dask event ``stop`` is set."""
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    held: deque[tuple[str, np.ndarray, float]] = deque()
    bad: list[str] = []
    expected = {name: pattern(name, MiB) for name in BASE}

    def check(name: str, view: np.ndarray, when: str) -> None:
        counts["checked"] += 1
        if not np.array_equal(view, expected[name]):
            bad.append(f"{when} {name}")

    stopped, asked = Event(stop), 0.0
    while True:
        now = time.monotonic()
        if now > asked + 0.2:
            if stopped.is_set():
                break
            asked = now
        time.sleep(0.001)  # a reader that never lets go of the GIL starves its worker's event loop
        while held and held[0][2] <= now:
            name, view, _ = held.popleft()
            check(name, view, "changed-under-view")
        size = rng.choice([1, 1, 1, 4, 12])  # batches of local leases too, a name in one maybe twice
        names = rng.choices(BASE, k=size) if rng.random() < 0.3 else rng.sample(BASE, size)
        try:
            views = [fabric.get(names[0])] if len(names) == 1 else fabric.get_many(names)
        except NameNotFoundError:
            counts["gone"] += 1  # deleted just now: it comes back
            continue
        except FabricError as exc:
            counts[type(exc).__name__] += 1
            continue
        counts["gets"] += len(names)
        for name, view in zip(names, views, strict=True):
            check(name, view, "fresh")
            if rng.random() < 0.3:
                held.append((name, view, now + rng.uniform(0.01, 0.5)))
    for name, view, _ in held:
        check(name, view, "changed-under-view")
    return {"counts": dict(counts), "bad": bad}


def holding(dask_scheduler) -> list:
    """On the scheduler: what the directory still knows, and who leases it."""
    d = dask_scheduler.plugins["datafabric-yellowpages"].directory
    return [(v.name, v.deleted, dict(v.leases), len(v.copies)) for v in d.by_id.values()] + list(d.pending)


def put(fabric, name: str, nbytes: int) -> None:
    fabric.insert(name, "", np.uint8, pattern(name, nbytes))


def fill(fabric, name: str, nbytes: int) -> None:
    fabric.insert(name, "", np.uint8, np.full(nbytes, 0xAB, np.uint8))


@pytest.mark.timeout(300)
def test_local_gets_race_delete_defragment_eviction_and_migration(two_nodes):
    client = two_nodes
    a_workers, b_workers = on_node(client, "node-a"), on_node(client, "node-b")
    fabric = datafabric.start(client, mb=4 * 12)
    try:
        fabric.allocate(4 * 6)  # a second block per worker: deallocate can migrate to it
        for name in BASE:
            client.submit(put, fabric, name, MiB, workers=[a_workers[0]], pure=False).result()
            fabric.replicate(name, ["node-b"])
        client.run_on_scheduler(count_reads)
        stop = Event("stop-local-churn", client=client)
        stop.clear()
        readers = [
            client.submit(reader, fabric, stop.name, 10 * k + t, workers=[w], pure=False)
            for k, w in enumerate(a_workers + b_workers)
            for t in range(2)  # two readers per worker, and a thread left for the client's inserts
        ]
        rng = random.Random(7)
        kinds = ["evicting insert", "replicate", "defragment", "delete and put again", "migrate"] * ROUNDS
        rng.shuffle(kinds)
        ops: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for kind in kinds:
            try:
                if kind == "evicting insert":  # node-b fills up: unleased replicas are evicted to make room
                    client.submit(fill, fabric, "filler", 9 * MiB, workers=[b_workers[0]], pure=False).result()
                    fabric.delete("filler")
                elif kind == "replicate":
                    fabric.replicate(rng.choice(BASE), ["node-b"])
                elif kind == "defragment":
                    fabric.defragment()
                elif kind == "delete and put again":  # gone for a moment, then back with the same bytes
                    name = rng.choice(BASE)
                    fabric.delete(name)
                    client.submit(put, fabric, name, MiB, workers=[a_workers[0]], pure=False).result()
                elif kind == "migrate":
                    blocks = [b for b in fabric.status() if b["node"] == "node-b"]
                    victim = max(blocks, key=lambda b: b["used"])
                    fabric.deallocate("node-b", victim["shm_id"], migrate=True)
                    fabric.allocate(2 * victim["size"] / MiB)  # node-b gets the victim's size back
                ops[kind] += 1
            except FabricError as exc:  # refused for lack of room or an insert in progress: documented
                failed[f"{kind}: {type(exc).__name__}"] += 1
        stop.set()
        results = client.gather(readers)
        counts = sum((Counter(r["counts"]) for r in results), Counter())
        bad = [b for r in results for b in r["bad"]]
        print(dict(ops), dict(failed), dict(counts), client.run_on_scheduler(read_counts))

        assert not bad, bad
        assert counts["gets"] > 200 and counts["checked"] > counts["gets"]
        assert all(ops[k] >= ROUNDS - 1 for k in ("evicting insert", "defragment", "delete and put again")), ops
        assert ops["migrate"] >= 2, (ops, failed)
        asked = sum(client.run_on_scheduler(read_counts).values())
        assert asked < counts["gets"] / 2, "most gets in tasks should have been local"
        refusals = {"OutOfSpaceError", "BlockInUseError"}  # no room, or an insert in progress: documented
        assert {k.split(": ")[1] for k in failed} <= refusals, failed

        for name in fabric.get_list():
            fabric.delete(name)
        if not settles(lambda: all(b["free"] == b["capacity"] for b in fabric.status())):
            used = [
                (b["shm_id"][-6:], b["capacity"] - b["free"]) for b in fabric.status() if b["free"] != b["capacity"]
            ]
            pytest.fail(f"space still used after deleting everything: {used}; held: {client.run_on_scheduler(holding)}")
    finally:
        fabric.shutdown()
