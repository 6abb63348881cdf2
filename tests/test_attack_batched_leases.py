"""Attacks on batched local leases (``LocalReads.pin_many``, a task's ``get_many``; docs
"Local leases: reads that stay on the node"): a name deleted and bound anew while a batch
that counted its old grant is still making its pins, a batch half local and half refused,
duplicate names, and a worker SIGKILLed holding batched local leases of variables another
process holds too.  Real worker processes and shared memory; every view is checked against
its name's bytes (``tests/churn.py``: a name's bytes are a function of the name alone)."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections import Counter, deque

import cloudpickle
import numpy as np
import pytest
from distributed import Client, get_worker

import datafabric
from datafabric.errors import NameNotFoundError, OutOfSpaceError
from datafabric.views import local_state
from tests.churn import content, differing
from tests.conftest import local_cluster
from tests.test_lifecycle import total_free, workers
from tests.test_local_reads import wait_published
from tests.waiting import kill_and_wait, results_released, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20


def held() -> dict:
    """Views a test keeps alive in a worker between tasks."""
    return get_worker().__dict__.setdefault("_attack_batched", {})


def get_slowly(fabric, name: str, how: str) -> None:
    """In a thread of this worker: lease ``name`` locally (``get`` or ``get_many``), and
    before its pin is cached by name, wait until ``go`` (a thread the interpreter switched
    away from at that step; the wait only widens the window).  The view is kept in
    ``held()`` under ``how``."""
    state = local_state(fabric.fabric_id)
    step = "pin" if how == "get" else "cache"
    original = getattr(state, step)
    started, go = threading.Event(), threading.Event()

    def slowed(*args, **kwargs):
        if threading.current_thread() is reader:  # the count is taken: the pin and its cache entry come next
            started.set()
            go.wait(30)
        return original(*args, **kwargs)

    setattr(state, step, slowed)

    keep = held()  # the worker's, found here: the reader thread is no task

    def read() -> None:
        keep[how] = fabric.get(name) if how == "get" else fabric.get_many([name])[0]

    reader = threading.Thread(target=read)
    reader.start()
    started.wait(30)
    get_worker()._attack_reader = (reader, go, state, step, original)


def finish() -> None:
    reader, go, state, step, original = get_worker()._attack_reader
    go.set()
    reader.join(30)
    setattr(state, step, original)


NOW = 2.0  # the value of the name bound anew


def differs_from_now(fabric, name: str) -> int:
    """A later task's get of ``name`` on this worker: how many values are not the new ones."""
    return int(np.count_nonzero(fabric.get(name) != NOW))


def drop_all() -> None:
    held().clear()


@pytest.mark.parametrize("how", ["get", "get_many"])
def test_a_name_bound_anew_while_a_local_lease_is_being_cached_is_read_anew(client, fabric, how):
    """A task's local lease of "x" is counted; before its pin is cached by name, "x" is
    deleted (the recall reports the lease, the worker is told to drop "x" from its cache)
    and inserted again with other bytes.  A later get of "x" on that worker must read the
    new variable, not the deleted one's view cached after the invalidation."""
    a, _ = workers(client)
    free = total_free(fabric)
    name = f"bl/{how}/x"
    fabric.insert(name, "", np.float64, np.full(1000, 1.0))
    wait_published(client, a, [name])
    client.submit(get_slowly, fabric, name, how, workers=[a], pure=False).result()
    fabric.delete(name)
    fabric.insert(name, "", np.float64, np.full(1000, NOW))
    client.submit(finish, workers=[a], pure=False).result()
    wait_published(client, a, [name])
    wrong = client.submit(differs_from_now, fabric, name, workers=[a], pure=False).result()
    client.submit(drop_all, workers=[a], pure=False).result()
    fabric.delete(name)
    wait_for(lambda: total_free(fabric) == free, "the memory back")
    assert wrong == 0, f"a get after {name!r} was bound anew read {wrong} of 1000 values of the deleted variable"


# -- a worker SIGKILLed holding batched local leases ----------------------------------
NAMES = [f"bk/{i}/{MiB}" for i in range(8)]  # tests/churn.py names: the size travels in the name


def hold_many(fabric, names: list[str]) -> tuple[int, int]:
    """A task's get_many (local leases, one lock for the batch), the views kept in the
    worker; (this process's id, bytes that differ from the names' own)."""
    views = fabric.get_many(names)
    held().setdefault("many", []).extend(zip(names, views, strict=True))
    return os.getpid(), sum(differing(n, v) for n, v in zip(names, views, strict=True))


def held_differ() -> int:
    return sum(differing(n, v) for n, v in held().get("many", []))


def fill_node(fabric) -> int:
    """Insert 1 MiB variables until nothing more fits: memory freed under a view is written
    over.  Returns how many."""
    n = 0
    while True:
        try:
            fabric.insert(f"bk-fill/{n}", "", np.uint8, np.full(MiB, 0xA5, np.uint8))
        except OutOfSpaceError:
            return n
        n += 1


def test_a_worker_killed_holding_batched_local_leases_frees_only_what_nobody_else_holds():
    """Worker a holds a get_many of every name, some twice, partly reported (a defragment
    recalled them) and partly not (taken again after); worker b and the client hold views
    of overlapping halves.  a is SIGKILLed, every name deleted, the node filled and
    defragmented: the views of b and of the client keep their bytes, and once they are
    dropped every byte of the fabric comes back."""
    with local_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=32)
        try:
            a, b = workers(client)
            free = total_free(fabric)
            for name in NAMES:
                fabric.insert(name, "", np.uint8, content(name))
            wait_published(client, a, NAMES)
            wait_published(client, b, NAMES)
            pid, wrong = client.submit(hold_many, fabric, NAMES + NAMES[:3], workers=[a], pure=False).result()
            assert wrong == 0
            assert client.submit(hold_many, fabric, NAMES[2:6], workers=[b], pure=False).result()[1] == 0
            mine = list(zip(NAMES[4:], fabric.get_many(NAMES[4:]), strict=True))
            fabric.defragment()  # recalls them all: the local counts become leases the YellowPages holds
            wait_published(client, a, NAMES)
            assert client.submit(hold_many, fabric, NAMES[::-1], workers=[a], pure=False).result()[1] == 0
            results_released(client, a)
            kill_and_wait(pid)
            fabric.delete_many(NAMES)
            filled = fill_node(fabric)
            fabric.defragment()
            assert filled > 0
            assert client.submit(held_differ, workers=[b], pure=False).result() == 0
            assert sum(differing(n, v) for n, v in mine) == 0
            client.submit(drop_all, workers=[b], pure=False).result()
            del mine
            fabric.delete_prefix("bk-fill/")
            wait_for(lambda: total_free(fabric) == free, "every byte back once the views are dropped")
        finally:
            fabric.shutdown()


# -- batches of overlapping names racing deletes, new bindings and defragments ---------
BASE = [f"bg/{i}/{64 * 1024 * (1 + i % 4)}" for i in range(16)]  # churn names: the size in the name
MISSING = "bg/never/4096"


def generation_data(name: str, gen: int) -> np.ndarray:
    """The name's own bytes, its first word the generation of this binding of it."""
    data = content(name).copy()
    data[:8] = np.frombuffer(np.uint64(gen).tobytes(), np.uint8)
    return data


def rebind(fabric, name: str, gens: dict, rng, filler: str) -> None:
    """Delete ``name`` and bind it anew with its next generation; half the time its freed
    memory is first written over by ``filler``'s bytes (freed at once unless a view holds it)."""
    fabric.delete(name)
    if rng.random() < 0.5:
        fabric.insert(filler, "", np.uint8, np.full(int(name.rsplit("/", 1)[1]), 0x5A, np.uint8))
        fabric.delete(filler)
    gens[name] += 1
    fabric.insert(name, "", np.uint8, generation_data(name, gens[name]))


def generation_of(name: str, view: np.ndarray) -> int:
    """The view's generation, or -1 if any other byte is not the name's own."""
    data = np.asarray(view).reshape(-1).view(np.uint8)
    want = content(name)
    if data.size != want.size or not np.array_equal(data[8:], want[8:]):
        return -1
    return int(data[:8].view(np.uint64)[0])


def batch_reader(fabric, seed: int, seconds: float) -> dict:
    """get_many of random overlapping sets (duplicates, and now and then a name that does not
    exist, which refuses the whole batch): every view holds its name's bytes, each name's
    generation never goes back within this process, and kept views never change."""
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    bad: list[str] = []
    latest: dict[str, int] = {}
    kept: deque[tuple[str, np.ndarray, int]] = deque()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.002)  # the worker's event loop runs: recalls are answered meanwhile
        names = rng.choices(BASE, k=rng.randint(1, 10))
        if rng.random() < 0.15:
            names.insert(rng.randrange(len(names) + 1), MISSING)
        try:
            views = fabric.get_many(names)
        except NameNotFoundError:
            counts["refused"] += 1
            continue
        counts["batches"] += 1
        for name, view in zip(names, views, strict=True):
            gen = generation_of(name, view)
            if gen < latest.get(name, 0):
                bad.append(f"{name}: generation {gen} after {latest.get(name)}")
            latest[name] = max(gen, latest.get(name, 0))
            if rng.random() < 0.2:
                kept.append((name, view, gen))
        while len(kept) > 12:
            name, view, gen = kept.popleft()
            if generation_of(name, view) != gen:
                bad.append(f"{name}: changed under a view of generation {gen}")
    counts["kept"] = len(kept)
    for name, view, gen in kept:
        if generation_of(name, view) != gen:
            bad.append(f"{name}: changed under a view of generation {gen}")
    return {"counts": dict(counts), "bad": bad[:20]}


def test_batches_of_overlapping_names_racing_deletes_new_bindings_and_defragments(client, fabric):
    """Two tasks per worker read batches of the same names while the client deletes them,
    binds them anew with the next generation, fills freed memory and defragments."""
    free = total_free(fabric)
    gens = dict.fromkeys(BASE, 1)
    for name in BASE:
        fabric.insert(name, "", np.uint8, generation_data(name, 1))
    rng = random.Random(7)
    readers = [
        client.submit(batch_reader, fabric, 100 + k, 8.0, workers=[w], pure=False)
        for k, w in enumerate(workers(client) * 2)
    ]
    deadline, rounds = time.monotonic() + 8.0, Counter()
    while time.monotonic() < deadline:
        rebind(fabric, rng.choice(BASE), gens, rng, "bg-filler")
        rounds["rebound"] += 1
        if rng.random() < 0.2:
            fabric.defragment()
            rounds["defragment"] += 1
    results = client.gather(readers)
    bad = [b for r in results for b in r["bad"]]
    assert not bad, bad
    assert all(r["counts"].get("batches", 0) > 10 and r["counts"].get("refused", 0) > 0 for r in results), results
    assert rounds["rebound"] > 20, rounds
    fabric.delete_many(BASE)
    wait_for(lambda: total_free(fabric) == free, "every byte back once the readers are done")
