"""A worker's local leases without a cluster: what a recall reports, and which ending pin
sends a release, whatever order publications, gets, recalls and collections come in."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np

from tests.blocks import shm_block
from tests.collector import collect, walked_from
from tests.grants import churn_against_recalls, recall, setup
from worker_plugin.local_reads import READY

MiB = 2**20


def test_a_recall_reports_the_live_local_leases_and_only_they_send_releases():
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        assert reads.pin("x") is None  # not published: ask the YellowPages
        reads.publish([entry])
        gone, kept = reads.pin("x").view(), reads.pin("x").view()
        del gone
        gc.collect()
        assert sent == []  # ended before any recall: the YellowPages never knew of it
        assert recall(reads, 7) == [[7, 1]]
        assert reads.pin("x") is None  # recalled: the next get asks the YellowPages
        reads.publish([entry])  # published again after the move, say
        fresh = reads.pin("x").view()
        del kept
        gc.collect()
        assert sent == [{"op": "datafabric_release", "var_id": 7, "holder": "worker-b"}]  # the reported one
        assert recall(reads, 7) == [[7, 1]]  # the fresh one, under the new grant only
        del fresh
        gc.collect()
        assert len(sent) == 2
        assert recall(reads, 7) == []  # nothing published: nothing to report


def test_local_reads_are_reported_as_uses_once_a_second_in_one_message(monkeypatch):
    """The YellowPages evicts replicas least recently used: local reads must reach it, one
    one-way message for all the names first leased since the last, and not on every get."""
    with shm_block(MiB) as segment:
        sent: list = []
        later: list = []
        reads, entry = setup(segment, sent, later)
        reads.publish([entry, {**entry, "var_id": 8, "name": "y", "data_offset": 8192}])
        views = [reads.pin("x").view(), reads.pin("y").view(), reads.pin("x").view()]
        assert len(later) == 1 and sent == []  # one flush scheduled for both names
        later.pop()()
        assert sent == [{"op": "datafabric_used", "var_ids": [7, 8]}]
        views.append(reads.pin("x").view())  # within the second: not reported again
        assert later == []
        clock = time.monotonic() + 1.5
        monkeypatch.setattr("worker_plugin.local_reads.time.monotonic", lambda: clock)
        views.append(reads.pin("x").view())
        later.pop()()
        assert sent[-1] == {"op": "datafabric_used", "var_ids": [7]}
        assert recall(reads, 7) == [[7, 4]] and recall(reads, 8) == [[8, 1]]


def test_a_publication_for_a_name_bound_anew_leaves_the_old_grant_recallable():
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish([entry])
        old = reads.pin("x")
        reads.publish([{**entry, "var_id": 8, "data_offset": 8192}])
        assert reads.pin("x").var_id == 8
        assert recall(reads, 7) == [[7, 1]]
        assert old.var_id == 7


def test_many_threads_getting_and_dropping_while_recalls_come_keep_the_count_exact():
    """Every pin is either counted by exactly one recall (and then sends one release) or
    ends uncounted and sends nothing: reported minus released is what is still alive."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish([entry])

        def take(rng: np.random.Generator) -> list | None:
            pin = reads.pin("x")
            if pin is None:
                reads.publish([entry])
                return None
            return [pin.view()] if rng.random() < 0.5 else []

        reported, alive = churn_against_recalls(take, lambda _: sum(count for _, count in recall(reads, 7)))
        last = sum(count for _, count in recall(reads, 7))  # the grant in force now
        still = len(alive)
        released = len(sent)
        # Live pins under recalled grants are counted and have not released; those under
        # the last grant are counted by the last recall.
        assert reported + last - released == still


def test_a_full_collection_walks_nothing_per_grant():
    """A worker holds a grant per name its node holds, a million at a million names: a
    full garbage collection of the worker walks none of them (it walked them all, and a
    long insert_many slowed as the node filled).  The grants still read and recall right,
    names of any UTF-8 included."""
    with shm_block(MiB) as segment:
        segment.buf[4096:5096] = bytes(range(200)) * 5
        sent: list = []
        reads, entry = setup(segment, sent)
        # as many as the first views made ahead can hold (``READY``): those are walked, a bounded few
        reads.publish([{**entry, "var_id": 100 + i, "name": f"few/{i}"} for i in range(READY)])
        few = walked_from(reads)
        reads.publish([{**entry, "var_id": 1000 + i, "name": f"many/é/{i}"} for i in range(10_000)])
        assert walked_from(reads) <= few
        view = reads.pin("many/é/9999").view()
        np.testing.assert_array_equal(view, np.frombuffer(bytes(range(200)) * 5, np.uint8))
        assert recall(reads, 10_999) == [[10_999, 1]] and reads.pin("many/é/9999") is None
        assert "many/é/9999" not in reads.names() and "many/é/9998" in reads.names()
        del view
        gc.collect()
        assert sent == [{"op": "datafabric_release", "var_id": 10_999, "holder": "worker-b"}]


def test_the_cache_of_views_holds_an_entry_per_view_alive_not_per_name_ever_read():
    """A worker that reads a million names over its life must not keep a cache entry for
    each: an entry goes when its view's pin dies, and a name read again is cached again."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish([{**entry, "var_id": 100 + i, "name": f"n/{i}"} for i in range(2 * READY)])
        kept = reads.view("n/0")
        for i in range(1, 2 * READY):
            reads.view(f"n/{i}")  # dropped at once
        for i in range(1, READY):
            assert reads.pin(f"n/{i}").view() is not None  # the uncached path, dropped at once
        gc.collect()
        assert list(reads.state._pins) == ["n/0"]
        again = reads.state.cached_view("n/0")
        assert again is not None and again.__array_interface__ == kept.__array_interface__
        del kept, again
        gc.collect()
        assert reads.state._pins == {} and reads.state.cached_view("n/0") is None
        assert reads.view("n/1") is not None
        assert reads.state._pins == {}  # its pin died with the view, no collection needed
        view = reads.view("n/2")
        assert list(reads.state._pins) == ["n/2"] and reads.state.cached_view("n/2") is not None
        assert sent == []  # nothing recalled: every lease ended here, uncounted
        del view


def test_cache_entries_leaving_inside_collections_on_any_thread_never_break_a_walk_of_the_cache():
    """Pins that die in reference cycles die inside collections, which run at any
    allocation on any thread, and their cache entries leave then, without the state's
    lock: invalidations, forgets and detaches walking the cache meanwhile must not fail,
    and a cached view is always one of its name's variable."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = [f"n/{i}" for i in range(64)]
        at = {name: 4096 + 1024 * i for i, name in enumerate(names)}
        for i, name in enumerate(names):
            segment.buf[at[name] : at[name] + 1000] = bytes([i]) * 1000  # each name's own bytes
        reads.publish([{**entry, "var_id": 100 + i, "name": n, "data_offset": at[n]} for i, n in enumerate(names)])
        state, errors, stop = reads.state, [], threading.Event()

        def churn(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    name = names[rng.integers(len(names))]
                    view = state.cached_view(name)
                    if view is None:
                        view = reads.view(name)
                    if view is not None:
                        assert view[0] == view[-1] == names.index(name), name
                        cycle: list = [view]
                        cycle.append(cycle)  # dies only in a collection
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        old = gc.get_threshold()
        gc.set_threshold(20, 2, 2)  # a collection every few allocations
        threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
        try:
            for t in threads:
                t.start()
            rng = np.random.default_rng(99)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                state.invalidate(rng.integers(100, 164, 4).tolist())
                state.forget_prefix("n/1")
                state.forget(names[rng.integers(len(names))])
                state.detach(["no-such-block"])
        finally:
            stop.set()
            for t in threads:
                t.join()
            gc.set_threshold(*old)
        assert errors == []
        collect(lambda: state._pins == {})  # the views in cycles die in collections
        assert state._pins == {}
        for name in names:  # every grant still answers, its view at the grant's bytes
            view = reads.view(name)
            assert view is not None and (view == names.index(name)).all()


def test_use_notes_go_as_a_task_stops_running_and_not_at_other_transitions():
    """So they leave in the batch of that task's result, not alone (one more write and one
    more batch for the scheduler each)."""
    from types import SimpleNamespace

    from worker_plugin.use_reports import UseReports

    sent: list = []
    worker = SimpleNamespace(batched_stream=SimpleNamespace(send=sent.append), periodic_callbacks={})
    reports = UseReports(worker, 3600, "uses")
    try:
        reports.later(lambda send: send("notes"))
        for start in ("released", "waiting", "ready", "constrained", "fetch", "flight", "memory"):
            reports.transitioned(start)  # another task arriving, fetched, released while one runs
        assert sent == []
        reports.transitioned("executing")
        assert sent == ["notes"]
        reports.later(lambda send: send("seceded"))
        reports.transitioned("long-running")
        assert sent == ["notes", "seceded"]
    finally:
        reports.stop()
