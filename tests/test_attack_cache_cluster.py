"""Attacks on the cache of views by name on a real cluster (``tests/test_attack_cache.py``
attacks it in one process): threads of tasks and of a client getting while names are
deleted and bound anew, and gets whose pin fails to be cached.  Every variable's bytes are
its name's (``tests/churn.py``) with its generation in its first word."""

from __future__ import annotations

import gc
import pickle
import random
import sys
import threading
import time
import traceback
from collections import Counter, deque

import cloudpickle
import distributed
import numpy as np
import pytest

import datafabric
from datafabric import views
from datafabric.errors import DatasetWritingError, NameNotFoundError
from datafabric.reads import task_reads
from datafabric.views import local_state
from tests.collector import collect
from tests.test_attack_batched_leases import generation_data, generation_of, rebind
from tests.test_lifecycle import total_free, workers
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMES = [f"ca/{i}/{16 * 1024 * (1 + i % 4)}" for i in range(12)]  # churn names: the size in the name
DATASET = "ca-ds"
ROWS, COLS = 64, 512  # the dataset: 8 chunks of 8 rows, every value its generation


class Finalized:
    """In a cycle with a view: the collection that frees them, on whatever thread, runs
    ``__del__``, which checks the view it held and gets the name again."""

    def __init__(self, check, name: str, view: np.ndarray, gen: int) -> None:
        self.check, self.name, self.view, self.gen, self.me = check, name, view, gen, self

    def __del__(self) -> None:
        self.check(self.name, self.view, self.gen, again=True)


def reader_threads(fabric, seed: int, seconds: float, threads: int = 3) -> dict:
    """``threads`` threads of this process get names (get, get_many with duplicates, a
    dataset's selection) for ``seconds`` under a collection every few allocations, keep
    some views and check them again later, and drop the others plainly or in cycles whose
    finalizers get again inside the collection.  Every view is its name's bytes; within a
    thread a name's generation never goes back; a kept view never changes.  The threads
    call through the client of this process (a worker's), made here: threads of a worker
    that are no task and find none race in ``distributed.get_client``."""
    fabric = datafabric.Fabric(fabric.address, fabric.fabric_id, client=distributed.get_client())
    counts: Counter[str] = Counter()
    bad: list[str] = []
    stop = time.monotonic() + seconds

    def check(name: str, view: np.ndarray, gen: int, latest: dict | None = None, again: bool = False) -> None:
        got = generation_of(name, view) if name != DATASET else int(view.min()) if view.min() == view.max() else -1
        if got < 0 or (again and got != gen):
            bad.append(f"{name}: generation {got} under a view of {gen}" if again else f"{name}: a view of other bytes")
        if latest is not None:
            if got < latest.get(name, 0):
                bad.append(f"{name}: generation {got} after {latest[name]}")
            latest[name] = max(got, latest.get(name, 0))
        if again and name != DATASET and threading.current_thread() in pool:  # not the event loop's: it may not wait
            try:
                check(name, fabric.get(name), 0)  # inside the collection: a get of its own
                counts["finalizer gets"] += 1
            except NameNotFoundError:
                counts["finalizer refused"] += 1

    def run(rng: random.Random) -> None:
        try:
            churn(rng)
        except BaseException:  # noqa: BLE001 - reported to the test
            bad.append(traceback.format_exc())

    def churn(rng: random.Random) -> None:
        latest: dict[str, int] = {}
        kept: deque = deque()
        while time.monotonic() < stop:
            how = rng.random()
            try:
                if how < 0.4:
                    batch = [rng.choice(NAMES)]
                    got = [fabric.get(batch[0])]
                elif how < 0.8:
                    batch = rng.choices(NAMES, k=rng.randint(2, 8))
                    got = fabric.get_many(batch)
                else:
                    start = rng.randrange(ROWS - 8)
                    batch, got = [DATASET], [fabric.dataset(DATASET)[start : start + rng.randint(1, 8)]]
            except (NameNotFoundError, DatasetWritingError):  # deleted, or being written anew
                counts["refused"] += 1
                continue
            counts["gets"] += len(batch)
            for name, view in zip(batch, got, strict=True):
                check(name, view, 0, latest)
                fate = rng.random()
                if fate < 0.2:
                    kept.append((name, view, generation_of(name, view) if name != DATASET else int(view.min())))
                elif fate < 0.5:
                    Finalized(check, name, view, latest[name])
                elif fate < 0.7:
                    cycle: list = [view]
                    cycle.append(cycle)
            del got, view
            while len(kept) > 10:
                check(*kept.popleft(), again=False)
        while kept:
            name, view, gen = kept.popleft()
            if (generation_of(name, view) if name != DATASET else int(view.min())) != gen:
                bad.append(f"{name}: changed under a kept view of generation {gen}")

    old_threshold, old_switch = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(7, 1, 1)
    sys.setswitchinterval(1e-5)
    pool = [threading.Thread(target=run, args=(random.Random(seed * 10 + k),)) for k in range(threads)]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        gc.set_threshold(*old_threshold)
        sys.setswitchinterval(old_switch)
    gc.collect()
    return {"counts": dict(counts), "bad": bad[:20]}


def cache_left(fabric_id: str, address: str) -> dict:
    """After a collection: this process's cache entries, pins alive, and local leases
    counted (a worker's)."""
    state, reads = local_state(fabric_id), task_reads(fabric_id, address)
    collect(lambda: not state._live)
    counted = 0 if reads is None else sum(reads._counts.values())
    return {"entries": sorted(state._pins), "pins": len(state._live), "counted": counted}


def test_threads_of_tasks_and_of_a_client_racing_names_bound_anew_and_defragments(client, fabric):
    """Three threads in each worker (local leases) and three in this client (leases of
    the YellowPages) get, batch and read a dataset under a collection every few
    allocations, dropping views in cycles whose finalizers get again, while this thread
    deletes names and binds them anew, rebuilds the dataset, fills freed memory and
    defragments.  Every view holds its name's bytes; afterwards no cache entry, pin or
    local lease is left anywhere, and every byte comes back."""
    free = total_free(fabric)
    gens = dict.fromkeys(NAMES, 1)
    for name in NAMES:
        fabric.insert(name, "", np.uint8, generation_data(name, 1))
    fabric.create_dataset(DATASET, data=np.full((ROWS, COLS), 1.0), chunks=(8, COLS))
    seconds = 8.0
    tasks = [
        client.submit(reader_threads, fabric, k, seconds, workers=[w], pure=False)
        for k, w in enumerate(workers(client))
    ]
    mine: list = []
    here = threading.Thread(target=lambda: mine.append(reader_threads(fabric, 99, seconds)))
    here.start()
    rng, rounds = random.Random(5), Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rebind(fabric, rng.choice(NAMES), gens, rng, "ca-filler")
        rounds["rebound"] += 1
        if rng.random() < 0.1:
            fabric.delete(DATASET)
            rounds["dataset"] += 1
            fabric.create_dataset(DATASET, data=np.full((ROWS, COLS), 1.0 + rounds["dataset"]), chunks=(8, COLS))
        if rng.random() < 0.1:
            fabric.defragment()
            rounds["defragment"] += 1
    results = client.gather(tasks)
    here.join(60)
    results += mine
    bad = [b for r in results for b in r["bad"]]
    assert not bad, "\n".join(bad)
    assert all(r["counts"].get("gets", 0) > 50 and r["counts"].get("finalizer gets", 0) > 0 for r in results), results
    assert rounds["rebound"] >= 5, rounds
    fabric.delete_many(NAMES)
    fabric.delete(DATASET)
    left = client.run(cache_left, fabric.fabric_id, fabric.address)
    left["client"] = cache_left(fabric.fabric_id, fabric.address)
    assert all(v == {"entries": [], "pins": 0, "counted": 0} for v in left.values()), left
    wait_for(lambda: total_free(fabric) == free, "every byte back once the readers are done")


# -- a get whose pin fails to be cached --------------------------------------------------
def pointer(fabric, name: str) -> datafabric.Pointer:
    [(node, shm_id, offset)] = fabric.get_locations(name)
    return fabric.get_ptr(node, shm_id, offset)


@pytest.mark.parametrize("how", ["get", "get_ptr", "materialise"])
def test_a_client_get_failing_as_it_caches_its_pin_keeps_no_lease(client, fabric, monkeypatch, how):
    """The client's get takes a lease of the YellowPages, then its pin fails to be cached
    (a ``MemoryError`` making the entry): the pin ends no lease on such a failure, its
    caller must.  Once the name is deleted, every byte comes back."""
    free = total_free(fabric)
    name = f"cf/{how}/{64 * 1024}"
    fabric.insert(name, "", np.uint8, generation_data(name, 1))
    read = {"get": lambda: fabric.get(name), "get_ptr": lambda: pointer(fabric, name)}.get(how)
    if read is None:
        kept = fabric.get(name)  # keeps the name's pin: the reference is materialised anew, its own lease
        read = lambda: pickle.loads(pickle.dumps(kept))  # noqa: E731
        fabric._state.forget(name)
    original = views._cache_entry

    def failing(*args):
        raise MemoryError("injected")

    monkeypatch.setattr(views, "_cache_entry", failing)
    with pytest.raises(MemoryError):
        read()
    monkeypatch.setattr(views, "_cache_entry", original)
    kept = None
    collect(lambda: not fabric._state._live)
    assert fabric._state._pins == {}
    fabric.delete(name)
    wait_for(lambda: total_free(fabric) == free, "every byte back: no lease left", timeout=15)
