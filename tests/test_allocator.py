"""The allocator over real shared memory, no cluster: reserve/free/compact against a simple
model, and compaction in a child process SIGKILLed at every step of every move, after
which opening the block (``fresh=False``, what adoption runs) must find every extent whole.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from datafabric import layout
from datafabric.layout import ExtentState
from tests.blocks import check_block, put, shm_block
from tests.collector import walked_from
from worker_plugin import moves
from worker_plugin.allocator import BlockAllocator

MiB = 1 << 20
SIZES = [100, 4000, 64 * 1024, 300 * 1024, MiB, 3 * MiB // 2, 2 * MiB + 5]


@pytest.mark.parametrize("seed", range(6))
def test_random_reserve_free_compact_keep_the_invariants(seed):
    """A model (extent id -> name) against the block: after every call, the walk is the
    index, extents tile the block, and every live extent holds exactly its bytes, at the
    offset compact reported."""
    rng = random.Random(seed)
    size = 16 * MiB
    with shm_block(size) as seg:
        alloc = BlockAllocator(seg.buf, size, fresh=True)
        model: dict[int, str] = {}
        where: dict[int, int] = {}  # extent id -> extent offset, as a directory would know it
        for step in range(150):
            op = rng.random()
            if op < 0.5:
                nbytes = rng.choice(SIZES)
                if alloc.largest_free < nbytes + 2 * layout.PAGE:
                    continue
                extent_id = put(seg, alloc, f"v{step}", nbytes)
                model[extent_id] = f"v{step}"
                where[extent_id] = next(o for o, _, st in alloc.extents()[::-1] if st is ExtentState.SEALED and
                                        layout.read_extent(seg.buf, o).extent_id == extent_id)  # fmt: skip
            elif op < 0.85 and model:
                extent_id = rng.choice(sorted(model))
                assert alloc.free(where.pop(extent_id)) > 0
                del model[extent_id]
            else:
                movable = {o for o in where.values() if rng.random() < 0.8}
                sizes = {o: s for o, s, _ in alloc.extents()}
                moved = alloc.compact(movable, seg.address)
                assert set(moved) <= movable
                for extent_id, offset in list(where.items()):
                    if offset in moved:
                        new_offset, new_data = moved[offset]
                        assert new_offset < offset
                        e = layout.read_extent(seg.buf, new_offset)
                        assert (e.extent_id, e.size, e.data_offset) == (extent_id, sizes[offset], new_data)
                        where[extent_id] = new_offset
            found = check_block(seg, alloc, model)
            assert {i: e.offset for i, e in found.items()} == where
            assert_running_figures(alloc)


@pytest.mark.parametrize("seed", range(4))
def test_free_many_merges_runs_as_frees_one_by_one_would(seed):
    """Batches of every size (a few extents: removals one by one; most of the block: the
    index rebuilt), neighbours of free extents on either side: the block is as after
    freeing the same extents one at a time, and the running figures stay exact."""
    rng = random.Random(seed)
    size = 4 * MiB
    with shm_block(size) as seg, shm_block(size) as twin:
        fast, slow = BlockAllocator(seg.buf, size, fresh=True), BlockAllocator(twin.buf, size, fresh=True)
        model: dict[int, str] = {}
        for round_ in range(6):
            for i in range(rng.randrange(50, 300)):
                nbytes = rng.choice([8, 100, 3000, 20_000])
                if fast.largest_free < nbytes + 2 * layout.PAGE:
                    break
                model[put(seg, fast, f"r{round_}v{i}", nbytes)] = f"r{round_}v{i}"
                put(twin, slow, f"r{round_}v{i}", nbytes)
            live = [
                (o, layout.read_extent(seg.buf, o).extent_id)
                for o, _, st in fast.extents()
                if st is not ExtentState.FREE
            ]
            doomed = rng.sample(live, k=rng.choice([1, 3, len(live) // 10, len(live) * 9 // 10]))
            freed = fast.free_many(o for o, _ in doomed)
            assert freed == sum(slow.free(o) for o, _ in sorted(doomed)) > 0
            for _, extent_id in doomed:
                del model[extent_id]
            assert fast.extents() == slow.extents()
            check_block(seg, fast, model)
            assert_running_figures(fast)
        before = fast.extents()
        sealed = next(o for o, _, st in before if st is ExtentState.SEALED)
        free = next(o for o, _, st in before if st is ExtentState.FREE)
        with pytest.raises(ValueError, match="free already"):
            fast.free_many([sealed, free])
        assert fast.extents() == before  # refused whole: nothing freed


def assert_running_figures(alloc: BlockAllocator) -> None:
    """The figures ``status`` reads in O(1) equal a count over every extent."""
    extents = alloc.extents()
    free = [s for _, s, st in extents if st is ExtentState.FREE]
    assert (alloc.free_bytes, alloc.largest_free, len(alloc)) == (sum(free), max(free, default=0), len(extents))
    for state in ExtentState:
        assert alloc.count(state) == sum(1 for _, _, st in extents if st is state), state


def test_freeing_twice_is_refused():
    with shm_block(MiB) as seg:
        alloc = BlockAllocator(seg.buf, MiB, fresh=True)
        put(seg, alloc, "x", 1000)
        alloc.free(layout.BLOCK_HEADER_SIZE)
        with pytest.raises(ValueError, match="free already"):
            alloc.free(layout.BLOCK_HEADER_SIZE)


def test_compaction_closes_the_gaps_and_fixed_extents_stay():
    with shm_block(32 * MiB) as seg:
        alloc = BlockAllocator(seg.buf, 32 * MiB, fresh=True)
        ids = {put(seg, alloc, f"v{i}", n): f"v{i}" for i, n in enumerate([MiB, 8 * MiB, 300, 4 * MiB, 40000, MiB])}
        offsets = [o for o, _, st in alloc.extents() if st is not ExtentState.FREE]
        for o in offsets[0::2]:
            del ids[layout.read_extent(seg.buf, o).extent_id]
            alloc.free(o)
        fixed = offsets[3]
        moved = alloc.compact(set(offsets) - {fixed}, seg.address)
        assert sorted(moved) == [offsets[1], offsets[5]]
        found = check_block(seg, alloc, ids)
        assert fixed in {e.offset for e in found.values()}
        # what is left free before each moved extent is less than its data's alignment
        assert moved[offsets[1]][0] - layout.BLOCK_HEADER_SIZE < layout.PAGE


def test_a_large_extent_is_not_moved_by_a_shift_not_worth_it():
    """Sliding 8 MiB by 64 bytes would take 131,072 chunks: it stays, and so does its gap."""
    with shm_block(16 * MiB) as seg:
        alloc = BlockAllocator(seg.buf, 16 * MiB, fresh=True)
        small = put(seg, alloc, "small", 10)
        ids = {put(seg, alloc, "large", 8 * MiB): "large"}
        alloc.free(layout.BLOCK_HEADER_SIZE)
        assert small not in ids
        assert alloc.compact({o for o, _, _ in alloc.extents()}, seg.address) == {}
        check_block(seg, alloc, ids)


def test_compacting_a_large_extent_takes_few_steps():
    """1 GiB of extents slid by a page each: the number of copies stays at MAX_CHUNKS per
    extent at most, not one per shift's worth of bytes."""
    steps = []
    with shm_block(96 * MiB) as seg:
        alloc = BlockAllocator(seg.buf, 96 * MiB, fresh=True)
        put(seg, alloc, "gap", 2 * MiB)
        ids = {put(seg, alloc, "big", 64 * MiB): "big"}
        alloc.free(layout.BLOCK_HEADER_SIZE)
        moves.stage_hook = lambda stage, journal: steps.append(stage)
        try:
            moved = alloc.compact({o for o, _, _ in alloc.extents()}, seg.address)
        finally:
            moves.stage_hook = None
        assert len(moved) == 1 and steps.count("chunk") <= moves.MAX_CHUNKS
        check_block(seg, alloc, ids)


# -- SIGKILL at every step of a move ------------------------------------------------------
CRASH_SIZE = 24 * MiB


def fragmented(seg) -> tuple[BlockAllocator, dict[int, str], set[int]]:
    """Small and large sealed extents behind holes, a fixed one in the middle, a reserved
    one: compaction makes single- and multi-chunk moves, page- and ALIGN-aligned."""
    alloc = BlockAllocator(seg.buf, CRASH_SIZE, fresh=True)
    ids = {}
    sizes = [256 * 1024, 3 * MiB // 2, 300 * 1024, 3 * MiB, 200 * 1024, 2 * MiB, 600 * 1024, 4 * MiB, 90]
    for i, n in enumerate([*sizes, 3000, 5000, 700]):
        ids[put(seg, alloc, f"v{i}", n)] = f"v{i}"
    ids[put(seg, alloc, "reserved", 4096, seal=False)] = "reserved"
    offsets = [o for o, _, st in alloc.extents() if st is ExtentState.SEALED]
    for o in (offsets[0], offsets[2], offsets[4], offsets[6], offsets[9]):
        del ids[layout.read_extent(seg.buf, o).extent_id]
        alloc.free(o)
    movable = set(offsets) - {offsets[5]}
    return alloc, ids, movable


def compact_in_child(seg, alloc, movable, stop_at: int | None, torn: bool) -> tuple[int, list[str]]:
    """Fork a child that compacts and SIGSTOPs itself at hook call ``stop_at`` (after
    copying half of the chunk at a "chunk" stage if ``torn``: a kill mid-memmove); SIGKILL
    it there.  Returns the child's pid status and, from a run with no stop, the stages."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only the compaction
        os.close(read)
        calls = []

        def hook(stage, journal):
            calls.append(stage)
            if len(calls) - 1 == stop_at:
                if torn and stage == "chunk":
                    n = min(journal.chunk, journal.length - journal.done) // 2
                    src, dst = journal.source + journal.done, journal.dest + journal.done
                    seg.buf[dst : dst + n] = seg.buf[src : src + n]
                os.kill(os.getpid(), signal.SIGSTOP)

        moves.stage_hook = hook
        try:
            alloc.compact(movable, seg.address)
            os.write(write, " ".join(calls).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    stages = os.read(read, 1 << 16).decode().split()
    os.close(read)
    return status, stages


def test_sigkill_at_every_step_of_compaction_leaves_every_extent_whole():
    """Every hook call of a whole compaction, each once clean and (at a chunk) torn; then
    the block is opened as an adopter opens it and must hold every extent exactly."""
    with shm_block(CRASH_SIZE) as seg:
        alloc, ids, movable = fragmented(seg)
        pristine = bytes(seg.buf)
        _, stages = compact_in_child(seg, alloc, movable, None, False)
        assert stages.count("chunk") > stages.count("split") > 3  # multi-chunk moves among them
        assert {"split", "begun", "chunk", "copied", "progress", "freed", "ended"} <= set(stages)
        runs = [(k, False) for k in range(len(stages))] + [(k, True) for k, s in enumerate(stages) if s == "chunk"]
        interrupted = 0
        for stop_at, torn in runs:
            seg.buf[:] = pristine
            status, _ = compact_in_child(seg, alloc, movable, stop_at, torn)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (stop_at, stages[stop_at])
            interrupted += layout.read_journal(seg.buf) is not None
            adopted = BlockAllocator(seg.buf, CRASH_SIZE, fresh=False)
            assert layout.read_journal(seg.buf) is None
            check_block(seg, adopted, ids)
            assert_running_figures(adopted)  # a rebuild's merges of free neighbours counted too
        assert interrupted > len(stages) // 2  # most stops were inside a journaled move


def test_sigkill_at_random_instants_of_compaction_leaves_every_extent_whole():
    """The same at moments nobody chose: a real SIGKILL into a running compaction."""
    rng = random.Random(7)
    with shm_block(CRASH_SIZE) as seg:
        alloc, ids, movable = fragmented(seg)
        pristine = bytes(seg.buf)
        for _ in range(12):
            seg.buf[:] = pristine
            pid = os.fork()
            if pid == 0:
                try:
                    alloc.compact(movable, seg.address)
                finally:
                    os._exit(0)
            time.sleep(rng.uniform(0, 0.004))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            check_block(seg, BlockAllocator(seg.buf, CRASH_SIZE, fresh=False), ids)


def test_a_full_collection_walks_nothing_per_extent():
    """The owner's index of a block of a million small variables is a million entries: a
    full garbage collection of the worker walks none of them (it walked them all, and a
    long insert_many slowed as the block filled)."""
    with shm_block(16 * MiB) as seg:
        alloc = BlockAllocator(seg.buf, 16 * MiB, fresh=True)
        for i in range(100):
            put(seg, alloc, f"few/{i}", 8)
        few = walked_from(alloc)
        for i in range(10_000):
            put(seg, alloc, f"many/{i}", 8)
        assert walked_from(alloc) <= few and len(alloc) == 10_101
        check_block(seg, alloc)
