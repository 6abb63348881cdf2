"""Attacks on the first views made ahead on a real cluster (the unit attacks are in
``test_attack_ready.py``): tasks take the ready views of names just published while the
client deletes, puts anew and defragments; a reader holding taken ready views is
SIGKILLed; a worker with ready pins is restarted and another retired.  Every view shows
its own variable's bytes (and no older generation of its name), all space comes back,
no pin is left in the workers and no block in /dev/shm.

Two worker processes of two threads each (nanny-run), on one node."""

from __future__ import annotations

import os
import random
import sys
import uuid
from collections import Counter

import cloudpickle
import numpy as np
import pytest
from distributed import Client, get_worker

import datafabric
from datafabric.errors import NameNotFoundError
from datafabric.protocol import WORKER_PLUGIN
from tests.conftest import fabric_segments, local_cluster
from tests.test_lifecycle import pattern, total_free, workers
from tests.test_local_reads import wait_published
from tests.waiting import kill_and_wait, results_released, wait_for
from worker_plugin.local_reads import _unpack

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NBYTES = 32 * 1024
NAMES = [f"rd/{i}" for i in range(48)]


@pytest.fixture(scope="module")
def client():
    with local_cluster(threads_per_worker=2) as cluster, Client(cluster) as client:
        yield client


def generation(name: str, gen: int) -> np.ndarray:
    """Generation ``gen`` of ``name``: its number in the first 8 bytes, the rest its own."""
    data = pattern(f"{name}#{gen}", NBYTES)
    data[:8] = np.frombuffer(np.int64(gen).tobytes(), np.uint8)
    return data


def gen_of(name: str, view: np.ndarray) -> int:
    """The generation ``view`` shows, or -1 if its bytes are no generation of ``name``."""
    gen = int(np.asarray(view[:8]).view(np.int64)[0])
    return gen if 0 <= gen < 10**6 and np.array_equal(view, generation(name, gen)) else -1


def put(fabric, gens: dict) -> None:
    fabric.insert_many([(name, "", np.uint8, generation(name, gen)) for name, gen in gens.items()])


def reads_here():
    return get_worker().plugins[WORKER_PLUGIN].local_reads


def held() -> dict:
    return get_worker().__dict__.setdefault("_attack_ready_held", {})


def read_fresh(fabric, names: list[str], at_least: dict, seed: int) -> dict:
    """First gets of names just published: each at least generation ``at_least[name]`` (the
    one put before this task was sent) and wholly one generation; some views held."""
    reads, rng, counts = reads_here(), random.Random(seed), Counter()
    for name in names:
        grant = reads._grants.get(name)
        ready = grant is not None and _unpack(grant)[0] in reads._ready
        try:
            view = fabric.get(name)
        except NameNotFoundError:
            counts["gone"] += 1
            continue
        gen = gen_of(name, view)
        counts["ready" if ready else "other"] += 1
        if gen < at_least[name]:
            counts["bad"] += 1
        if rng.random() < 0.3:
            held()[(name, seed)] = (view, gen)
    return dict(counts)


def check_held(drop: float, seed: int) -> dict:
    """Held views still show the generation they showed; ``drop`` of them let go."""
    rng, counts = random.Random(seed), Counter()
    for key, (view, gen) in list(held().items()):
        counts["checked"] += 1
        counts["bad"] += gen_of(key[0], view) != gen
        if rng.random() < drop:
            del held()[key]
    return dict(counts)


def leftovers(dask_worker) -> dict:
    """What this worker still holds of the fabric's pins: ready ones, leased ones."""
    reads = dask_worker.plugins[WORKER_PLUGIN].local_reads
    return {"ready": len(reads._ready), "leased": len(reads.state._live)}


def blocks_left(fabric) -> list[str]:
    """This fabric's blocks in /dev/shm (other test sessions' may come and go beside)."""
    return [n for n in fabric_segments() if n.startswith(f"dfab_{uuid.UUID(fabric.fabric_id).hex[:8]}_")]


def every_block_free(fabric, free: int) -> None:
    wait_for(lambda: total_free(fabric) == free, "every variable's space to come back")


def test_ready_views_taken_while_names_are_deleted_put_anew_and_defragmented(client):
    fabric = datafabric.start(client, mb=16)
    try:
        a, b = workers(client)
        free, gens, rng, counts = total_free(fabric), dict.fromkeys(NAMES, 0), random.Random(3), Counter()
        client.submit(put, fabric, gens, workers=[a], pure=False).result()
        for rnd in range(8):
            batch = rng.sample(NAMES, 16)
            fabric.delete_many(batch)
            gens.update({name: gens[name] + 1 for name in batch})
            client.submit(put, fabric, {n: gens[n] for n in batch}, workers=[rng.choice([a, b])], pure=False).result()
            readers = [
                client.submit(read_fresh, fabric, batch, dict(gens), 10 * rnd + k, workers=[w], pure=False)
                for k, w in enumerate([a, b, b])
            ]
            for name in rng.sample(batch, 4):  # under the readers: gone, then back a generation on
                fabric.delete(name)
                gens[name] += 1
                client.submit(put, fabric, {name: gens[name]}, workers=[a], pure=False).result()
            fabric.defragment()
            for result in client.gather(readers):
                counts.update(result)
            for w in (a, b):
                counts.update(client.submit(check_held, 0.5, rnd, workers=[w], pure=False).result())
        print(dict(counts))
        assert counts["bad"] == 0, counts
        assert counts["ready"] > 50 and counts["checked"] > 50, counts
        for w in (a, b):
            client.submit(check_held, 1.0, 0, workers=[w], pure=False).result()
        fabric.delete_many(NAMES)
        every_block_free(fabric, free)
        assert client.run(leftovers) == {w: {"ready": 0, "leased": 0} for w in (a, b)}
    finally:
        fabric.shutdown()
    wait_for(lambda: not blocks_left(fabric), "the fabric's blocks to leave /dev/shm")


def hold_fresh(fabric, names: list[str]) -> tuple[int, int]:
    """Take the ready views of ``names`` and hold them: (pid, views taken ready)."""
    reads, taken = reads_here(), 0
    for name in names:
        grant = reads._grants.get(name)
        taken += grant is not None and _unpack(grant)[0] in reads._ready
        held()[(name, 0)] = (fabric.get(name), 0)
    return os.getpid(), taken


def test_a_reader_killed_holding_taken_ready_views_frees_them(client):
    fabric = datafabric.start(client, mb=16)
    try:
        a, b = workers(client)
        free = total_free(fabric)
        gens = dict.fromkeys(NAMES[:8], 0)
        client.submit(put, fabric, gens, workers=[a], pure=False).result()
        wait_published(client, b, list(gens))
        pid, taken = client.submit(hold_fresh, fabric, NAMES[:4], workers=[b], pure=False).result()
        assert taken == 4
        fabric.defragment()  # recalls them all: b's four local leases become the YellowPages'
        results_released(client, b)
        kill_and_wait(pid)
        fabric.delete_many(list(gens))
        every_block_free(fabric, free)
        client.wait_for_workers(2)
    finally:
        fabric.shutdown()


def test_a_worker_restarted_and_one_retired_with_ready_pins_leave_nothing_behind(client):
    fabric = datafabric.start(client, mb=16)
    try:
        a, b = workers(client)
        gens = dict.fromkeys(NAMES[:16], 0)
        client.submit(put, fabric, gens, workers=[a], pure=False).result()
        wait_published(client, b, list(gens))
        assert client.run(leftovers)[b]["ready"] == 16
        client.submit(hold_fresh, fabric, NAMES[:2], workers=[b], pure=False).result()
        client.restart_workers([b])  # its teardown drops the ready pins and leaves the blocks
        client.wait_for_workers(2)
        assert all(gen_of(n, v) == 0 for n, v in zip(gens, fabric.get_many(list(gens)), strict=True))
        assert client.run(leftovers)[a]["ready"] == 16  # the writer's, never taken
        client.retire_workers([a])  # its blocks go to the restarted worker
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, "one worker to retire")
        views = fabric.get_many(list(gens))
        assert all(gen_of(n, v) == 0 for n, v in zip(gens, views, strict=True))
        del views
        fabric.delete_many(list(gens))
        wait_for(lambda: all(b["free"] == b["capacity"] for b in fabric.status()), "every block to be free")
    finally:
        fabric.shutdown()
    wait_for(lambda: not blocks_left(fabric), "the fabric's blocks to leave /dev/shm")
