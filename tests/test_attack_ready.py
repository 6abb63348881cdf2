"""Attacks on the first views made ahead (docs "Local leases", "First views made ahead"):
a ready pin holds no lease, a recall finds either it (dropped, no view of it outside the
table) or its lease counted, a taken view's death sends one release iff a recall reported
it, it shows its own variable's bytes, and nothing leaks, whatever threads, collections
and failures come in the middle.  Unit level, on a real block; the cluster attacks are in
``test_attack_ready_cluster.py``."""

from __future__ import annotations

import gc
import threading
import types
import weakref

import numpy as np
import pytest

import datafabric.views as views
from datafabric.references import pin_of
from tests.blocks import shm_block
from tests.grants import recall, setup
from tests.test_local_ready import entries_for, fill
from worker_plugin.survivors import kept_views

MiB = 2**20


def live_pins(segment) -> int:
    """``_Pin`` objects still alive on ``segment`` (ready or leased)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, views._Pin) and o.segment.name == segment.name)


def right(view, name: str, anew: int = 0) -> bool:
    """The view shows its own variable's bytes (``fill``: the var id's low byte), and its
    lease is for a variable ``name`` was published as (``entries_for``'s var id, or that
    plus ``anew`` for the name bound anew)."""
    pin = pin_of(view)
    ids = {10 + int(name[1:]), 10 + int(name[1:]) + anew}
    return pin is not None and bool((view == pin.var_id % 256).all()) and pin.var_id in ids


def test_a_recall_drops_a_ready_pin_at_once_and_ready_pins_are_not_declared_as_kept_views():
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = entries_for(entry, 4)
        fill(segment, names)
        reads.publish(names)
        ready = {serial: weakref.ref(pin) for serial, (pin, _) in reads._ready.items()}
        assert kept_views(reads.state) == []  # no lease: nothing to declare after a scheduler restart
        held = reads.view("n0")
        assert len(kept_views(reads.state)) == 1
        assert recall(reads, 11) == [] and ready[1]() is None  # no collection needed: no cycle holds it
        reads.close()
        assert [serial for serial, ref in ready.items() if ref() is not None] == [0]  # the taken one
        assert recall(reads, 10) == [[10, 1]] and sent == []
        del held
        assert sent == [{"op": "datafabric_release", "var_id": 10, "holder": "worker-b"}]
        gc.collect()
        assert live_pins(segment) == 0


def test_gets_recalls_and_republications_with_views_dropped_inside_collections_keep_the_count():
    """Every collection (threshold 1) drops a held view from a ``gc.callbacks`` hook, so
    pins die inside whatever step allocated: a recall's locked step, a publication's, a
    get's, ``take``'s.  Reported minus released is what is alive, throughout."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = entries_for(entry, 6)
        fill(segment, names)
        held: list = []
        wrong: list = []
        stop = threading.Event()

        dropped = {"any": 0, "locked": 0}

        def drop(phase: str, info: dict) -> None:
            locked = reads.lock._is_owned()  # inside a locked step of this thread: drop one there
            if phase == "start" and (len(held) > 3 or locked):
                try:
                    held.pop(0)  # a pin's last view may die here, in the middle of anything
                except IndexError:
                    return
                dropped["any"] += 1
                dropped["locked"] += locked

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                name = names[int(rng.integers(len(names)))]["name"]
                view = reads.view(name)
                if view is not None:
                    if not right(view, name):
                        wrong.append(name)
                    held.append(view)
                if rng.random() < 0.1:
                    stop.wait(0.0005)  # the loop gets the interpreter too

        reads.publish(names)
        threshold = gc.get_threshold()
        gc.callbacks.append(drop)
        gc.set_threshold(1)
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        try:
            for t in threads:
                t.start()
            reported = 0
            rng = np.random.default_rng(5)
            for _ in range(1000):  # the event loop
                e = names[int(rng.integers(len(names)))]
                reported += sum(count for _, count in recall(reads, e["var_id"]))
                reads.publish([e])
        finally:
            stop.set()
            for t in threads:
                t.join()
            gc.callbacks.remove(drop)
            gc.set_threshold(*threshold)
        last = sum(sum(count for _, count in recall(reads, e["var_id"])) for e in names)
        assert wrong == [] and reads._ready == {}
        assert dropped["any"] > 20 and dropped["locked"] > 0, dropped
        del held[:]
        gc.collect()
        assert reported + last == len(sent)
        assert live_pins(segment) == 0


def test_close_racing_gets_leaves_every_taken_view_counted_and_every_other_ready_pin_dead():
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = entries_for(entry, 200)
        fill(segment, names)
        for seed in range(5):
            reads.publish(names)
            got: list = []
            started = threading.Event()

            def reader(k: int, got: list = got, started: threading.Event = started, at: int = 10 + 20 * seed) -> None:
                for i, e in enumerate(names[k::2]):
                    view = reads.view(e["name"])
                    if view is not None:
                        got.append((e["name"], view))
                    if i == at:
                        started.set()  # close comes while the readers go on

            threads = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            started.wait()
            reads.close()
            for t in threads:
                t.join()
            assert reads._ready == {} and all(right(v, n) for n, v in got)
            reported = sum(sum(c for _, c in recall(reads, e["var_id"])) for e in names)
            assert reported == len(got) and sent == []
            assert live_pins(segment) == len(got)  # no ready pin survives close but those taken
            del got[:]
            assert len(sent) == reported
            sent.clear()
        gc.collect()
        assert live_pins(segment) == 0


def test_publications_from_several_threads_racing_recalls_and_gets_keep_counts_and_bytes():
    """Publish is the event loop's, but nothing in it may depend on that: several threads
    publish, one recalls, three get; names are bound anew to other variables too."""
    with shm_block(4 * MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        base = entries_for(entry, 8)
        anew = [{**e, "var_id": e["var_id"] + 100, "data_offset": e["data_offset"] + 512 * 1024} for e in base]
        fill(segment, base + anew)
        everything = base + anew
        stop = threading.Event()
        wrong: list = []
        alive: list = []
        reported = [0]

        def publisher(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                reads.publish([everything[int(k)] for k in rng.integers(len(everything), size=3)])

        def recaller() -> None:
            rng = np.random.default_rng(77)
            while not stop.is_set():
                var_id = everything[int(rng.integers(len(everything)))]["var_id"]
                reported[0] += sum(count for _, count in recall(reads, var_id))

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                name = base[int(rng.integers(len(base)))]["name"]
                view = reads.view(name)
                if view is not None:
                    if not right(view, name, 100):
                        wrong.append(name)
                    if rng.random() < 0.2:
                        alive.append(view)
                    elif alive and rng.random() < 0.3:
                        try:
                            alive.pop()
                        except IndexError:
                            pass

        threads = [threading.Thread(target=publisher, args=(s,)) for s in range(2)]
        threads += [threading.Thread(target=reader, args=(10 + s,)) for s in range(3)]
        threads.append(threading.Thread(target=recaller))
        for t in threads:
            t.start()
        threading.Event().wait(2.0)
        stop.set()
        for t in threads:
            t.join()
        last = sum(sum(c for _, c in recall(reads, e["var_id"])) for e in everything)
        assert wrong == [] and reads._ready == {}
        gc.collect()
        assert reported[0] + last - len(sent) == len(alive)
        del alive[:]
        gc.collect()
        assert reported[0] + last == len(sent)
        assert live_pins(segment) == 0


def get_view(reads, name):
    return reads.view(name)


def get_pin(reads, name):
    pin = reads.pin(name)
    return None if pin is None else pin.view()


def get_batch(reads, name):
    [pin] = reads.pin_many([name])
    return None if pin is None else pin.view()


@pytest.mark.parametrize("get", [get_view, get_pin])
def test_a_failure_at_the_start_of_the_lease_hand_over_ends_the_count_once(monkeypatch, get):
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish([entry])

        def refuse(*args):
            raise MemoryError("injected: no weak reference")

        monkeypatch.setattr(views, "_Lease", refuse)
        with pytest.raises(MemoryError):
            get(reads, "x")
        monkeypatch.undo()
        gc.collect()
        assert reads._counts == {0: 0} and recall(reads, 7) == [] and sent == []
        assert live_pins(segment) == 0


@pytest.mark.parametrize("get", [get_view, get_pin])
def test_a_failure_between_the_count_and_the_hand_over_ends_the_count(monkeypatch, get):
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish([entry])

        def refuse(*args):
            raise MemoryError("injected: no bound method")

        monkeypatch.setattr("worker_plugin.local_reads.MethodType", refuse)
        with pytest.raises(MemoryError):
            get(reads, "x")
        monkeypatch.undo()
        gc.collect()
        assert reads._counts == {0: 0}, "a count no pin holds"
        assert recall(reads, 7) == [] and sent == []


@pytest.mark.parametrize("get", [get_view, get_pin])
def test_a_failure_at_the_last_step_of_the_lease_hand_over_ends_the_count_once(monkeypatch, get):
    """The lease's weak reference is registered, then the name's cache entry fails (an
    allocation): the caller ends the count, and the pin's death must not end it again."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish([entry])

        def refuse(*args):
            raise MemoryError("injected: no cache entry")

        monkeypatch.setattr(views, "weakref", types.SimpleNamespace(ref=refuse))
        with pytest.raises(MemoryError):
            get(reads, "x")
        monkeypatch.undo()
        gc.collect()
        assert reads._counts == {0: 0}, "the lease was ended twice"
        assert recall(reads, 7) == [] and sent == []


@pytest.mark.parametrize("get", [get_view, get_pin, get_batch])
def test_a_name_deleted_and_bound_anew_while_its_old_grant_is_taken_is_not_cached_stale(get):
    """Between a get's count and its cache entry the event loop recalls the old grant
    (counted), the deletion's invalidation comes, and the name is published bound to
    another variable: a later get of the name in this process must not answer with the
    deleted variable's view."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        fill(segment, [entry, {**entry, "var_id": 8, "data_offset": 8192}])
        reads.publish([entry])
        state = reads.state
        step = {get_view: "take", get_pin: "pin", get_batch: "cache"}[get]
        real = getattr(state, step)

        def loop_runs_first(*args, **kwargs):
            setattr(state, step, real)
            assert recall(reads, 7) == [[7, 1]]
            state.invalidate([7])
            reads.publish([{**entry, "var_id": 8, "data_offset": 8192}])
            return real(*args, **kwargs)

        setattr(state, step, loop_runs_first)
        old = get(reads, "x")
        assert (old == 7).all()
        again = state.cached_view("x")
        assert again is None or (again == 8).all(), "a get of x answers with the deleted variable"
