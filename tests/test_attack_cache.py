"""Attacks on the cache of views by name (``LocalState._pins``, ``_cache_entry``; docs
"The cache by name never outlives an invalidation"): entries that take themselves out
inside collections on any thread, without the state's lock, while names are deleted and
bound anew, blocks detached, and finalizers run by those collections get views themselves.

Each variable's values are its var id, so any view tells which variable it shows; a get
that starts after its name was bound anew must show the new variable or a later one.
Seeded; bounded in time."""

from __future__ import annotations

import gc
import random
import sys
import threading
import time
import traceback
import weakref
from collections import Counter, deque

import cloudpickle
import distributed
import numpy as np

import datafabric
from datafabric import views
from datafabric.errors import DatasetWritingError, NameNotFoundError
from datafabric.reads import task_reads
from datafabric.views import local_state
from tests.blocks import shm_block
from tests.grants import recall, setup
from tests.test_attack_batched_leases import generation_data, generation_of
from tests.test_lifecycle import total_free, workers
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
SLOT = 256  # bytes per variable: 128 uint16, each its var id
FIRST = 100  # the first var id; a var id's slot is fixed, never reused


class Names:
    """A worker's view of a few names bound and bound anew on one real block: the var id
    each name is bound to now (set once the invalidation of its previous one is done), and
    the name of every var id ever bound."""

    def __init__(self, reads, entry: dict, segment, count: int) -> None:
        self.reads, self.entry, self.segment = reads, entry, segment
        self.names = [f"c/{i}" for i in range(count)]
        self.current: dict[str, int] = {}
        self.name_of: dict[int, str] = {}
        self.next_id = FIRST
        self.reported = 0  # local leases the recalls reported: each sends one release
        for name in self.names:
            self.bind(name)

    def bind(self, name: str) -> None:
        var_id = self.next_id
        self.next_id += 1
        at = 4096 + SLOT * (var_id - FIRST)
        assert at + SLOT <= self.segment.size, "the block is full: fewer rebinds"
        np.frombuffer(self.segment.buf, np.uint16, SLOT // 2, at)[:] = var_id
        self.name_of[var_id] = name
        self.reads.publish(
            [{**self.entry, "var_id": var_id, "name": name, "type": f"{SLOT // 2} * uint16", "data_offset": at}]
        )
        self.current[name] = var_id

    def rebind(self, name: str) -> None:
        """As a worker sees a delete and a new insert: the recall of the old grant, the
        invalidation, the publication of the new variable."""
        old = self.current[name]
        self.reported += sum(count for _, count in recall(self.reads, old))
        self.reads.state.invalidate([old])
        self.bind(name)

    def check(self, name: str, view: np.ndarray, floor: int) -> None:
        """``view`` shows one variable, bound to ``name``, no older than ``floor``."""
        var_id = int(view[0])
        assert (view == var_id).all(), f"{name}: a view of mixed values"
        assert self.name_of.get(var_id) == name, f"{name}: a view of {self.name_of.get(var_id)}'s var {var_id}"
        assert var_id >= floor, f"{name}: a get after it was bound to var {floor} read the deleted var {var_id}"


class Cycle:
    """Dies only in a collection; its finalizer, run by that collection on whatever thread
    allocated, gets a view itself (``__del__`` runs after the weak-reference callbacks of
    the pins dying in the same collection) and checks it and the view it held."""

    def __init__(self, get, name: str, view: np.ndarray, floor: int) -> None:
        self.get, self.name, self.view, self.floor = get, name, view, floor
        self.me = self

    def __del__(self) -> None:
        self.get(self.name, self.view, self.floor)


def churn(names: Names, seconds: float, seed: int, threads: int = 4) -> list[BaseException]:
    """``threads`` threads get names (a cached get, a task's get, a batch with duplicates),
    check each view, keep some, drop others plainly or in cycles whose finalizers get
    again; this thread binds names anew meanwhile.  Returns what the threads raised."""
    reads, state = names.reads, names.reads.state
    errors: list[BaseException] = []
    stop = threading.Event()

    def get(name: str, held: np.ndarray | None = None, floor: int = FIRST) -> np.ndarray | None:
        if held is not None:  # a finalizer's: the view it held is still its variable's
            names.check(name, held, floor)
        floor = names.current[name]
        view = state.cached_view(name)
        if view is None:
            view = reads.view(name)
        if view is not None:
            names.check(name, view, floor)
        return view

    def finalizer_get(name: str, held: np.ndarray, floor: int) -> None:
        try:
            get(name, held, floor)
        except BaseException as e:  # noqa: BLE001 - a finalizer's error is only printed: reported below
            errors.append(e)

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        kept: list[tuple[str, np.ndarray, int]] = []
        try:
            while not stop.is_set():
                how = rng.integers(3)
                if how < 2:
                    name = names.names[rng.integers(len(names.names))]
                    floor = names.current[name]
                    got = [(name, get(name), floor)]
                else:
                    batch = [names.names[i] for i in rng.integers(len(names.names), size=6)]
                    floors = [names.current[n] for n in batch]
                    pins = reads.pin_many(batch)
                    got = [(n, None if p is None else p.view(), f) for n, p, f in zip(batch, pins, floors, strict=True)]
                    del pins
                for name, view, floor in got:
                    if view is None:
                        continue
                    names.check(name, view, floor)
                    fate = rng.integers(4)
                    if fate == 0:
                        kept.append((name, view, floor))
                    elif fate == 1:
                        Cycle(finalizer_get, name, view, floor)
                    elif fate == 2:
                        cycle: list = [view]
                        cycle.append(cycle)
                del got, view
                if len(kept) > 8:
                    for name, view, floor in kept[:4]:
                        names.check(name, view, floor)
                    del kept[:4]
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    old_threshold, old_switch = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(7, 1, 1)  # a collection every few allocations, on every thread
    sys.setswitchinterval(1e-5)  # threads switch between any two steps
    workers = [threading.Thread(target=run, args=(seed + i,)) for i in range(threads)]
    try:
        for t in workers:
            t.start()
        rng = np.random.default_rng(seed)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not errors:
            names.rebind(names.names[rng.integers(len(names.names))])
            time.sleep(0.001)
    finally:
        stop.set()
        for t in workers:
            t.join()
        gc.set_threshold(*old_threshold)
        sys.setswitchinterval(old_switch)
    gc.collect()
    return errors


def test_gets_racing_names_bound_anew_never_read_the_deleted_variable():
    """Four threads get, batch and drop (plainly, and in cycles whose finalizers get again
    inside the collection) while names are bound anew: every view is its name's variable,
    never one deleted before the get started; afterwards the cache is empty, every count
    is back to zero and every lease a recall reported was released once."""
    with shm_block(8 * MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = Names(reads, entry, segment, 8)
        errors = churn(names, 4.0, seed=1)
        assert errors == [], errors[:3]
        state = reads.state
        assert state._pins == {} and state._live == set()
        assert set(reads._counts.values()) <= {0}
        assert len(sent) == names.reported
        assert all(msg["op"] == "datafabric_release" for msg in sent)


class _PausingCache(dict):
    """A cache that stops the thread ``pause_in`` right after it writes an entry, until
    ``on``: the interpreter may switch away there, for as long as it likes."""

    pause_in: threading.Thread | None = None

    def __init__(self) -> None:
        super().__init__()
        self.written, self.on = threading.Event(), threading.Event()

    def __setitem__(self, name: str, entry: weakref.ref) -> None:
        super().__setitem__(name, entry)
        if threading.current_thread() is self.pause_in:
            self.written.set()
            self.on.wait(30)


def test_a_get_after_a_name_is_bound_anew_never_finds_the_deleted_variable_cached(monkeypatch):
    """A task's get of "c/0" counts its local lease; before it makes its cache entry,
    "c/0" is deleted (recalled, invalidated) and bound anew; then it goes on, and stops
    again if it writes the entry.  A get of "c/0" that starts now, in another thread, must
    read the new variable: an entry written after the invalidation must never answer it."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        state = reads.state
        state._pins = cache = _PausingCache()  # before any entry: the entries' callbacks hold it
        names = Names(reads, entry, segment, 1)
        old = names.current["c/0"]
        making, go = threading.Event(), threading.Event()

        def paused_entry(*args):
            if threading.current_thread() is reader:
                making.set()
                go.wait(30)
            return original(*args)

        original = views._cache_entry
        monkeypatch.setattr(views, "_cache_entry", paused_entry)
        got: list = []
        cache.pause_in = reader = threading.Thread(target=lambda: got.append(reads.pin("c/0").view()))
        reader.start()
        try:
            assert making.wait(30)
            names.rebind("c/0")
            new = names.current["c/0"]
            go.set()
            wait_for(lambda: cache.written.is_set() or not reader.is_alive(), "the entry written, or the get done")
            view = state.cached_view("c/0")
            if view is None:
                view = reads.view("c/0")
        finally:
            go.set()
            cache.on.set()
            reader.join(30)
        assert int(got[0][0]) == old  # the reader's own view: its lease, counted before the recall
        read = int(view[0])
        got.clear()
        del view
        gc.collect()
        assert read == new, f"a get after c/0 was bound to var {new} read the deleted var {read}"
        assert len(sent) == names.reported == 1
        assert state._pins == {}


# -- a real cluster: tasks' threads and a client's, names and a dataset bound anew ------
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
    gc.collect()
    state, reads = local_state(fabric_id), task_reads(fabric_id, address)
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
        name = rng.choice(NAMES)
        fabric.delete(name)
        if rng.random() < 0.5:  # its memory written over at once, unless a view holds it
            fabric.insert("ca-filler", "", np.uint8, np.full(int(name.rsplit("/", 1)[1]), 0x5A, np.uint8))
            fabric.delete("ca-filler")
        gens[name] += 1
        fabric.insert(name, "", np.uint8, generation_data(name, gens[name]))
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
