"""A worker's batches of local leases (``LocalReads.pin_many``, the path of a task's
``get_many``) without a cluster: one count per name asked, recalls that find every count
of a batch or none, and a batch that fails part way leaves no count behind."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from tests.blocks import shm_block
from tests.grants import churn_against_recalls, recall, setup

MiB = 2**20


def publish_two(reads, entry) -> None:
    reads.publish([entry, {**entry, "var_id": 8, "name": "y", "data_offset": 8192}])


def test_a_batch_counts_every_name_asked_and_reads_its_own_bytes():
    with shm_block(MiB) as segment:
        segment.buf[4096:5096] = bytes(range(200)) * 5
        segment.buf[8192:9192] = bytes(1000)
        sent: list = []
        reads, entry = setup(segment, sent)
        publish_two(reads, entry)
        pins = reads.pin_many(["x", "y", "x", "z"])  # a name twice; one never published
        assert pins[3] is None and [p.var_id for p in pins[:3]] == [7, 8, 7]
        views = [p.view() for p in pins[:3]]
        np.testing.assert_array_equal(views[0], np.frombuffer(bytes(range(200)) * 5, np.uint8))
        assert not views[1].any() and not views[0].flags.writeable
        assert reads.state.cached_view("x") is not None  # later gets of the names answer from the cache
        del pins, views[1]
        gc.collect()
        assert sent == []  # the y pin ended before any recall: nobody was told
        assert recall(reads, 7) == [[7, 2]] and recall(reads, 8) == []
        assert reads.pin_many(["x", "y"])[0] is None  # recalled: asks the YellowPages
        del views
        gc.collect()
        assert sent == [{"op": "datafabric_release", "var_id": 7, "holder": "worker-b"}] * 2


def test_a_batch_failing_part_way_ends_exactly_the_counts_no_pin_holds(monkeypatch):
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        publish_two(reads, entry)
        made = []
        hold = reads.state.hold

        def failing_hold(*args):
            if len(made) == 2:
                raise MemoryError("the third pin")
            made.append(hold(*args))
            return made[-1]

        monkeypatch.setattr(reads.state, "hold", failing_hold)
        with pytest.raises(MemoryError):
            reads.pin_many(["x", "y", "x", "y"])
        assert recall(reads, 8) == [[8, 1]]  # the y pin made before the failure, still alive
        made.clear()
        gc.collect()
        assert recall(reads, 7) == []  # the x pin died uncounted-for after the failure; no count left
        assert sent == [{"op": "datafabric_release", "var_id": 8, "holder": "worker-b"}]  # y's, reported


def test_threads_batching_while_recalls_come_keep_the_count_exact():
    """Every pin of every batch is counted by exactly one recall (and then sends one
    release) or ends uncounted and sends nothing."""
    with shm_block(MiB) as segment:
        sent: list = []
        reads, entry = setup(segment, sent)
        reads.publish([entry])

        def take(rng: np.random.Generator) -> list | None:
            pins = reads.pin_many(["x"] * int(rng.integers(1, 6)))
            if pins[0] is None:
                reads.publish([entry])
                return None
            return [p.view() for p in pins if p is not None]

        def recall_round(_: int) -> int:
            time.sleep(0.001)  # the batching threads run between recalls
            return sum(count for _, count in recall(reads, 7))

        reported, alive = churn_against_recalls(take, recall_round)
        last = sum(count for _, count in recall(reads, 7))
        still = len(alive)
        assert reported > 0 and reported + last - len(sent) == still
