"""Adversarial checks of the run-merging bulk free (``BlockAllocator.free_many`` through the
worker's ``free`` handler), no cluster: seeded random blocks of many extents in every state,
random batches with duplicates, already-free extents, stale ids, stale offsets (inside an
extent, or of an extent a compaction moved away), the block's last extent and runs split by
one SEALED or RESERVED extent.  Each result is compared with freeing the same extents one at
a time on a twin block, and the allocator's running figures with a fresh walk of the headers.
A forked owner is then SIGKILLed before each store of a several-run batch and the block,
walked as it was left, must show every run as it was or merged, never torn."""

from __future__ import annotations

import random

import pytest

from datafabric import layout
from datafabric.layout import ExtentState
from tests.blocks import check_block, put, shm_block
from tests.test_bulk_free_killed import free_in_child, owner
from worker_plugin.allocator import BlockAllocator

KiB = 1 << 10
SIZE = 1 << 20


def lay_out(segment, seed: int) -> tuple[BlockAllocator, list[tuple[int, int, ExtentState]]]:
    """A block filled with extents of seeded sizes and states, a few holes, last one
    included; returns the allocator and [(offset, extent id, state)] of every extent."""
    rng = random.Random(seed)
    allocator = BlockAllocator(segment.buf, SIZE, fresh=True)
    i = 0
    while True:
        nbytes = rng.choice((rng.randrange(1, 200), rng.randrange(200, 6 * KiB), rng.randrange(6 * KiB, 20 * KiB)))
        if allocator.largest_free < nbytes + 4 * KiB:
            break
        put(segment, allocator, f"v{i}", nbytes, seal=rng.random() > 0.1)
        i += 1
    for offset, _, state in list(allocator.extents()):
        roll = rng.random()
        if state is ExtentState.SEALED and roll < 0.15:
            allocator.set_state(offset, ExtentState.DELETED)
    extents = list(allocator.extents())
    for offset, _, state in extents:
        if state is not ExtentState.FREE and rng.random() < 0.08 and allocator.state_of(offset) is not None:
            allocator.free(offset)
    return allocator, [
        (o, layout.extent_id_at(segment.buf, o) if st is not ExtentState.FREE else 0, st)
        for o, _, st in allocator.extents()
    ]


def batch_for(extents, seed: int) -> tuple[list[tuple[int, int]], set[int]]:
    """A batch the directory could send, and the offsets that must be freed from it."""
    rng = random.Random(seed + 1)
    batch, valid = [], set()
    for k, (offset, extent_id, state) in enumerate(extents):
        roll = rng.random()
        if state is ExtentState.FREE:
            if roll < 0.5:
                batch.append((offset, rng.getrandbits(63) + 1))  # freed already: an old id
        elif roll < 0.45 or k == len(extents) - 1 or k == 0:
            batch.append((offset, extent_id))
            valid.add(offset)
            if rng.random() < 0.2:
                batch.append((offset, extent_id))  # a duplicate
        elif roll < 0.55:
            batch.append((offset, extent_id ^ 1))  # a stale id: must stay
        elif roll < 0.6:
            batch.append((offset + layout.ALIGN, extent_id))  # a stale offset inside the extent
    rng.shuffle(batch)
    return batch, valid


def figures(allocator: BlockAllocator) -> tuple:
    return (
        allocator.extents(),
        allocator.free_bytes,
        allocator.largest_free,
        len(allocator),
        tuple(allocator.count(st) for st in ExtentState),
    )


@pytest.mark.parametrize("seed", range(12))
def test_a_random_bulk_free_is_freeing_one_at_a_time_and_a_fresh_walk(seed):
    with shm_block(SIZE) as bulk_seg, shm_block(SIZE) as single_seg:
        bulk, extents = lay_out(bulk_seg, seed)
        single, twin = lay_out(single_seg, seed)
        assert [e[::2] for e in extents] == [e[::2] for e in twin]
        batch, valid = batch_for(extents, seed)
        name = bulk_seg.name.lstrip("/")
        before = {i for _, i, st in extents if st is not ExtentState.FREE}
        owner(name, bulk_seg, bulk).free([(name, o, i) for o, i in batch] + [("no-such-block", 64, 1)])
        for offset in sorted(valid, key=lambda _: random.Random(seed).random()):
            single.free(offset)
        assert bulk.extents() == single.extents()
        assert figures(bulk) == figures(single)
        fresh = BlockAllocator(bulk_seg.buf, SIZE, fresh=False)
        assert figures(bulk) == figures(fresh)
        freed_ids = {i for o, i, _ in extents if o in valid}
        kept = check_block(bulk_seg, bulk)
        assert set(kept) == before - freed_ids
        assert bulk.largest_free == max((s for _, s, st in bulk.extents() if st is ExtentState.FREE), default=0)
        # the figures stay true once the merged free extents are handed out again
        rng = random.Random(seed + 2)
        while bulk.largest_free > 8 * KiB:
            put(bulk_seg, bulk, "again", rng.randrange(1, bulk.largest_free - 4 * KiB))
            assert figures(bulk) == figures(BlockAllocator(bulk_seg.buf, SIZE, fresh=False))


def test_runs_split_by_one_sealed_or_reserved_extent_stay_split():
    with shm_block(SIZE) as segment:
        allocator = BlockAllocator(segment.buf, SIZE, fresh=True)
        ids = [put(segment, allocator, f"v{i}", 1000 + i, seal=(i % 4 != 3)) for i in range(16)]
        offsets = [o for o, _, st in allocator.extents() if st is not ExtentState.FREE]
        allocator.free(offsets[5])  # a hole: a run starting with a free extent
        keep = {3, 7, 11, 15}  # RESERVED (i % 4 == 3) and never in the batch
        keep |= {9}  # one SEALED extent between two runs
        batch = [(offsets[k], ids[k]) for k in range(16) if k not in keep and k != 5]
        name = segment.name.lstrip("/")
        owner(name, segment, allocator).free([(name, o, i) for o, i in batch])
        got = [(st, s) for _, s, st in allocator.extents()]
        states = [st for st, _ in got]
        F, S, R = ExtentState.FREE, ExtentState.SEALED, ExtentState.RESERVED
        assert states == [F, R, F, R, F, S, F, R, F, R, F]
        fresh = BlockAllocator(segment.buf, SIZE, fresh=False)
        assert figures(allocator) == figures(fresh)
        check_block(segment, allocator)


def test_a_batch_removing_most_of_the_index_rebuilds_it_consistently():
    with shm_block(SIZE) as segment:
        allocator = BlockAllocator(segment.buf, SIZE, fresh=True)
        ids = [put(segment, allocator, f"v{i}", 200) for i in range(400)]
        offsets = [o for o, _, st in allocator.extents() if st is not ExtentState.FREE]
        keep = set(range(0, 400, 7))
        name = segment.name.lstrip("/")
        owner(name, segment, allocator).free([(name, offsets[k], ids[k]) for k in range(400) if k not in keep])
        fresh = BlockAllocator(segment.buf, SIZE, fresh=False)
        assert figures(allocator) == figures(fresh)
        check_block(segment, allocator)
        # the index still works: new reservations land in the freed runs, and a second batch frees them
        more = [put(segment, allocator, f"w{i}", 300) for i in range(50)]
        assert figures(allocator) == figures(BlockAllocator(segment.buf, SIZE, fresh=False))
        again = {
            layout.extent_id_at(segment.buf, o): o for o, _, st in allocator.extents() if st is not ExtentState.FREE
        }
        owner(name, segment, allocator).free([(name, again[i], i) for i in more])
        assert figures(allocator) == figures(BlockAllocator(segment.buf, SIZE, fresh=False))
        check_block(segment, allocator)


def test_offsets_of_extents_a_compaction_moved_free_nothing_else():
    with shm_block(SIZE) as segment:
        allocator = BlockAllocator(segment.buf, SIZE, fresh=True)
        ids = [put(segment, allocator, f"v{i}", 3000 + 64 * i) for i in range(30)]
        offsets = [o for o, _, st in allocator.extents() if st is not ExtentState.FREE]
        view = list(zip(offsets, ids, strict=True))  # the directory's view before the compaction
        for k in range(0, 30, 3):
            allocator.free(offsets[k])
        moved = allocator.compact({o for o, _, st in allocator.extents() if st is ExtentState.SEALED}, segment.address)
        assert moved
        live = {i for k, i in enumerate(ids) if k % 3}
        name = segment.name.lstrip("/")
        before = figures(allocator)
        owner(name, segment, allocator).free([(name, o, i) for o, i in view])  # every offset stale or moved
        stale_hits = {o for o, i in view if allocator.state_of(o) is not None}
        assert stale_hits, "some old offsets head other extents now"
        unmoved = {i for o, i in view if o not in moved and i in live}
        found = check_block(segment, allocator)
        assert set(found) == live - unmoved
        assert before != figures(allocator) or not unmoved
        assert figures(allocator) == figures(BlockAllocator(segment.buf, SIZE, fresh=False))


def tiling(buf) -> list[tuple[int, int, int, int]]:
    return [(e.offset, e.size, int(e.state), e.extent_id) for e in layout.walk(buf, SIZE)]


def runs_of(before, freed: set[int]) -> list[list[int]]:
    """The maximal runs of neighbours freed or free already, as indexes into ``before``."""
    runs, cur = [], []
    for k, (offset, _, state, _) in enumerate(before):
        if offset in freed or state == ExtentState.FREE:
            cur.append(k)
        else:
            if cur:
                runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [r for r in runs if any(before[k][0] in freed for k in r)]


def kill_at(segment, allocator, batch, stop_at):
    """The owner frees ``batch`` in a child stopped, then killed, before its ``stop_at``-th
    store; the stores it made when not stopped, or None."""
    name = segment.name.lstrip("/")
    stores = free_in_child(owner(name, segment, allocator), name, batch, stop_at)
    return None if stores < 0 else stores


@pytest.mark.parametrize("seed", (0, 1, 3))
def test_a_kill_before_any_store_of_a_random_batch_leaves_each_run_whole_or_merged(seed):
    with shm_block(SIZE) as segment:
        allocator, extents = lay_out(segment, seed)
        batch, valid = batch_for(extents, seed)
        before = tiling(segment.buf)
        stores = kill_at(segment, allocator, batch, None)
    runs = runs_of(before, valid)
    assert len(runs) > 3 and any(before[r[0]][2] == ExtentState.FREE for r in runs)
    assert stores and stores <= 2 * len(runs)
    for stop_at in range(stores + 1):
        with shm_block(SIZE) as segment:
            allocator, extents = lay_out(segment, seed)  # extent ids are drawn anew: the same tiling
            batch, valid = batch_for(extents, seed)
            before = tiling(segment.buf)
            runs = runs_of(before, valid)
            kill_at(segment, allocator, batch, stop_at)
            after = {e[0]: e for e in tiling(segment.buf)}  # walks: tiles, or raises
            for run in runs:
                head = before[run[0]]
                got = after[head[0]]
                whole = all(after.get(before[k][0]) == before[k] for k in run)
                merged = got[2] == ExtentState.FREE and got[1] == sum(before[k][1] for k in run)
                # between the state and size stores, only the head is freed: the tail's still as it was
                head_only = (
                    got[2] == ExtentState.FREE
                    and got[1] == head[1]
                    and all(after.get(before[k][0]) == before[k] for k in run[1:])
                )
                assert whole or merged or head_only, f"run {run} torn at store {stop_at}"
            untouched = {b for b in before if not any(b is before[k] for r in runs for k in r)}
            for b in untouched:
                assert after[b[0]] == b, f"extent outside the batch changed at store {stop_at}"
            fresh = BlockAllocator(segment.buf, SIZE, fresh=False)
            check_block(segment, fresh)


def test_a_kill_between_the_heads_state_and_size_stores_leaves_a_valid_tiling():
    """A run's head rewritten FREE, then killed before its size spans the run: the head
    alone is free, the rest as it was (docs/protocols.md, "Bulk deletes and frees")."""
    with shm_block(SIZE) as segment:
        allocator = BlockAllocator(segment.buf, SIZE, fresh=True)
        ids = [put(segment, allocator, f"v{i}", 1000) for i in range(3)]
        offsets = [o for o, _, st in allocator.extents() if st is not ExtentState.FREE]
        before = tiling(segment.buf)
        assert kill_at(segment, allocator, [(offsets[0], ids[0]), (offsets[1], ids[1])], None) == 2
    with shm_block(SIZE) as segment:
        allocator = BlockAllocator(segment.buf, SIZE, fresh=True)
        ids = [put(segment, allocator, f"v{i}", 1000) for i in range(3)]
        before = tiling(segment.buf)
        kill_at(segment, allocator, [(offsets[0], ids[0]), (offsets[1], ids[1])], 1)  # after the state store
        head, second = tiling(segment.buf)[:2]
        whole = (head[:3], second[:3]) == (before[0][:3], before[1][:3])
        merged = head[2] == ExtentState.FREE and head[1] == before[0][1] + before[1][1]
        head_alone = head[2] == ExtentState.FREE and head[1] == before[0][1] and second[:3] == before[1][:3]
        assert whole or merged or head_alone, f"head {head}, next {second}"
        assert head_alone  # killed after the state store: the docs' third state, which an adopter repairs
        check_block(segment, BlockAllocator(segment.buf, SIZE, fresh=False))  # a valid tiling all the same
