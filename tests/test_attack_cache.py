"""Attacks on the cache of views by name (``LocalState._pins``, ``_cache_entry``; docs
"The cache by name never outlives an invalidation"): entries that take themselves out
inside collections on any thread, without the state's lock, while names are deleted and
bound anew, forgets and detaches walk the cache, finalizers run by those collections get
views themselves, and caching a pin fails.

Each variable's values are its var id, so any view tells which variable it shows; a get
that starts after its name was bound anew must show the new variable or a later one.
Seeded; bounded in time."""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import cloudpickle
import numpy as np

from datafabric import views
from tests.blocks import shm_block
from tests.collector import collect
from tests.grants import recall, setup
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
            state.forget_prefix("c/1")  # walks of the cache, each its epoch
            state.detach(["dfab_none"])
            time.sleep(0.001)
    finally:
        stop.set()
        for t in workers:
            t.join()
        gc.set_threshold(*old_threshold)
        sys.setswitchinterval(old_switch)
    collect(lambda: not state._live)
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
        collect(lambda: not reads.state._live)
        assert read == new, f"a get after c/0 was bound to var {new} read the deleted var {read}"
        assert len(sent) == names.reported == 1
        assert state._pins == {}


class _FailingCache(dict):
    """A cache whose writes fail (an allocation that found no memory) while ``failing``."""

    failing = False

    def __setitem__(self, name: str, entry: weakref.ref) -> None:
        if self.failing:
            raise MemoryError("injected")
        super().__setitem__(name, entry)

    def update(self, entries: dict) -> None:
        if self.failing:
            raise MemoryError("injected")
        super().update(entries)


def test_a_get_failing_as_it_caches_its_pin_ends_its_lease_once_and_leaves_no_entry(monkeypatch):
    """Making a cache entry, or writing it, fails (a ``MemoryError``) in a single get, in a
    get of a view made ahead, and in a batch: each lease is ended exactly once (by the
    failing get, or by its pin's death, never both), no entry is left, and gets work after."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        state = reads.state
        state._pins = cache = _FailingCache()
        names = Names(reads, entry, segment, 4)  # the views of "c/0".."c/3" made ahead
        original = views._cache_entry

        def failing_entry(*args):
            raise MemoryError("injected")

        for where in ("entry", "write"):
            if where == "entry":
                monkeypatch.setattr(views, "_cache_entry", failing_entry)
            else:
                cache.failing = True
            for get in (reads.view, lambda n: reads.pin(n).view(), lambda n: reads.pin_many([n, n])[0].view()):
                for name in names.names:
                    try:
                        get(name)
                    except MemoryError:
                        pass
                    else:
                        raise AssertionError(f"{where}: a get of {name} did not fail")
            monkeypatch.setattr(views, "_cache_entry", original)
            cache.failing = False
            collect(lambda: not reads.state._live)
            assert dict(cache) == {} and state._live == set(), where
            assert set(reads._counts.values()) == {0}, f"{where}: {reads._counts}"
        kept = [reads.view(n) for n in names.names]
        assert sorted(cache) == names.names and all(
            int(v[0]) == names.current[n] for n, v in zip(names.names, kept, strict=True)
        )
        assert set(reads._counts.values()) == {1}
        del kept
        collect(lambda: not reads.state._live)
        assert dict(cache) == {} and set(reads._counts.values()) == {0} and sent == []


class Resurrecting:
    """In a cycle with a view; its finalizer keeps the view (puts it back in a pool, say)."""

    pool: list = []

    def __init__(self, view: np.ndarray) -> None:
        self.view, self.me = view, self

    def __del__(self) -> None:
        Resurrecting.pool.append(self.view)


def test_a_view_a_finalizer_keeps_alive_keeps_its_lease():
    """A view dropped in a cycle with an object whose ``__del__`` keeps it.  A collection
    runs the weak-reference callbacks of its garbage before the finalizers: had the pin
    been part of that garbage, its lease would end and its cache entry go, and the
    ``__del__`` bring the view back under no lease.  (numpy arrays are no objects the
    collector tracks, so a pin behind a view is never part of it; this keeps it so.)
    The view is alive, so its lease must be: a recall counts it."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = Names(reads, entry, segment, 1)
        Resurrecting(reads.view("c/0"))
        collect(lambda: Resurrecting.pool)
        [view] = Resurrecting.pool
        try:
            assert int(view[0]) == names.current["c/0"]
            assert recall(reads, names.current["c/0"]) == [[names.current["c/0"], 1]]
        finally:
            Resurrecting.pool.clear()


def test_a_finalizer_getting_under_the_local_reads_lock_never_deadlocks_with_a_batch(monkeypatch):
    """A collection may run inside the local reads' locked steps (a publication's, a
    recall's, on the event loop) and run a user's finalizer that gets a name; meanwhile a
    task's batch caches its pins, and a collection in it ends a pin, whose callback takes
    the local reads' lock.  Neither may wait for the other for ever."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = Names(reads, entry, segment, 3)
        dying = [reads.pin("c/2").view()]  # its last view dies in the batch, as a collection there would end it
        locked, caching = threading.Event(), threading.Event()
        original = views._cache_entry

        def collecting(*args):
            if threading.current_thread() is batch and dying:
                caching.set()
                locked.wait(5)
                time.sleep(0.2)  # the finalizer's get is waiting by now, if it waits
                dying.clear()  # the pin's callback takes the local reads' lock
            return original(*args)

        def finalizer() -> None:
            caching.wait(5)
            with reads.lock:  # the locked step a collection ran the finalizer in
                locked.set()
                reads.view("c/0")  # an uncached get: it caches its pin

        def batching() -> None:
            reads.pin_many(["c/1"])

        monkeypatch.setattr(views, "_cache_entry", collecting)
        threads = [
            threading.Thread(target=finalizer, daemon=True),
            batch := threading.Thread(target=batching, daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "the finalizer's get and the batch wait for each other"
        assert names.current["c/0"] in reads._by_id
