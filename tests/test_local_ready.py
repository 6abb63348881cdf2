"""First views made ahead for the newest grants (``LocalReads._make_ready``), without a
cluster: a ready pin holds no lease until a get takes it; a get that takes it counts its
lease where a recall sees it; a recall drops the ready pins it withdraws; and the bytes a
taken view shows are its variable's, whatever order publications, gets, recalls and
collections come in."""

from __future__ import annotations

import gc

import numpy as np

from datafabric.references import FabricView, pin_of
from tests.blocks import shm_block
from tests.grants import churn_against_recalls, recall, setup
from worker_plugin.local_reads import READY

MiB = 2**20
SIZE = 1000


def fill(segment, entries: list[dict]) -> None:
    """Each entry's bytes are its var id, so a view of the wrong variable shows."""
    for entry in entries:
        segment.buf[entry["data_offset"] : entry["data_offset"] + SIZE] = bytes([entry["var_id"] % 256]) * SIZE


def entries_for(entry: dict, n: int) -> list[dict]:
    return [{**entry, "var_id": 10 + i, "name": f"n{i}", "data_offset": 4096 + 1024 * i} for i in range(n)]


def test_a_taken_ready_view_is_leased_reported_by_a_recall_and_released_once():
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        fill(segment, [entry])
        reads.publish([entry])
        assert set(reads._ready) == {0}  # made ahead, with no lease counted
        assert recall(reads, 7) == []  # a ready pin is no lease
        assert reads._ready == {} and reads.view("x") is None  # dropped with its grant
        reads.publish([entry])
        view = reads.view("x")
        assert reads._ready == {}  # taken
        assert isinstance(view, FabricView) and (view == 7).all()
        assert pin_of(view) is not None and pin_of(view[3:]) is pin_of(view)
        again = reads.view("x")  # the next get of the name makes its own view
        assert np.shares_memory(view, again)
        assert recall(reads, 7) == [[7, 2]]
        del view
        gc.collect()
        assert sent == [{"op": "datafabric_release", "var_id": 7, "holder": "worker-b"}]
        del again
        gc.collect()
        assert len(sent) == 2


def test_a_ready_view_dropped_unused_sends_nothing_and_lets_go_of_the_mapping():
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish(entries_for(entry, 3))
        assert len(reads._ready) == 3
        reads.close()
        gc.collect()
        assert reads._ready == {} and sent == []
        for i in range(3):  # gets still lease, made as before
            assert (reads.view(f"n{i}") is not None) and recall(reads, 10 + i) == [[10 + i, 1]]


def test_only_the_newest_grants_are_made_ready_and_the_rest_read_the_same():
    with shm_block(4 * MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        many = entries_for(entry, READY + 50)
        fill(segment, many)
        reads.publish(many)
        assert len(reads._ready) == READY
        views = [reads.view(e["name"]) for e in many]
        assert all((v == e["var_id"] % 256).all() for v, e in zip(views, many, strict=True))
        assert reads._ready == {}
        assert all(recall(reads, e["var_id"]) == [[e["var_id"], 1]] for e in many)


def test_threads_taking_ready_views_while_recalls_and_publications_come_keep_counts_and_bytes():
    """Each view is counted by exactly one recall (and sends one release when it dies) or
    ends uncounted and sends nothing; a view never shows another variable's bytes."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        names = entries_for(entry, 8)
        fill(segment, names)
        reads.publish(names)
        wrong: list = []
        order = np.random.default_rng(99)

        def take(rng: np.random.Generator) -> list | None:
            e = names[int(rng.integers(len(names)))]
            view = reads.view(e["name"])
            if view is None:
                return None
            if not (view == e["var_id"] % 256).all():
                wrong.append(e["name"])
            return [view]

        def recall_round(_: int) -> int:  # the event loop: a recall, and a publication made ready again
            e = names[int(order.integers(len(names)))]
            reported = sum(count for _, count in recall(reads, e["var_id"]))
            reads.publish([e])
            return reported

        reported, alive = churn_against_recalls(take, recall_round, rounds=300)
        last = sum(sum(count for _, count in recall(reads, e["var_id"])) for e in names)
        still = len(alive)
        assert wrong == []
        assert reads._ready == {}  # every grant recalled: nothing ready is left
        assert reported + last - len(sent) == still
        del alive[:]
        gc.collect()
        assert reported + last == len(sent)
