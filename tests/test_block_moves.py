"""Block moves and compaction as plain asyncio: no cluster, no scheduler.

``BlockMoves`` is the protocol that keeps offsets valid while they are used (exclusive
holds for moves, shared holds for frees and marks, settled waits for leases); these
tests drive it with tasks that hold and wait, each run bounded so a deadlock fails
instead of hanging.  ``Compaction`` is driven with a fake owner that records its calls."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from datafabric.errors import WorkerLostError
from tests.directories import CAPACITY, directory, extent, insert
from yp.membership import Membership
from yp.moves import BlockMoves, Compaction

BOUND = 5.0  # seconds any scenario may take; the holds themselves take none


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), BOUND))


async def turns(n: int = 5) -> None:
    """Let every ready task run a few steps: whatever could proceed has."""
    for _ in range(n):
        await asyncio.sleep(0)


def holder(
    moves: BlockMoves, kind: str, shm_ids: list[str], log: list[str], tag: str
) -> tuple[asyncio.Task, asyncio.Event]:
    """A task that takes a hold, logs ``tag+`` when in and ``tag-`` when out, and holds
    until its event is set."""
    done = asyncio.Event()

    async def hold() -> None:
        cm = moves.exclusive(shm_ids[0]) if kind == "exclusive" else moves.shared(shm_ids)
        async with cm:
            log.append(f"{tag}+")
            await done.wait()
            log.append(f"{tag}-")

    return asyncio.create_task(hold()), done


# -- holds ----------------------------------------------------------------------------
def test_an_exclusive_hold_waits_for_shared_holds_to_end():
    async def scenario():
        moves, log = BlockMoves(), []
        s1, end_s1 = holder(moves, "shared", ["A", "B"], log, "s1")
        s2, end_s2 = holder(moves, "shared", ["A"], log, "s2")
        await turns()
        e, end_e = holder(moves, "exclusive", ["A"], log, "e")
        await turns()
        assert log == ["s1+", "s2+"] and not moves.busy(["A"])
        end_s1.set()
        await turns()
        assert "e+" not in log  # s2 still holds A
        end_s2.set()
        await turns()
        assert log[-1] == "e+" and moves.busy(["A"]) and moves.held() == {"A"}
        end_e.set()
        await asyncio.gather(s1, s2, e)
        assert moves.held() == set()

    run(scenario)


def test_a_shared_hold_waits_for_an_exclusive_one_and_for_one_waiting():
    async def scenario():
        moves, log = BlockMoves(), []
        s1, end_s1 = holder(moves, "shared", ["A"], log, "s1")
        await turns()
        e, end_e = holder(moves, "exclusive", ["A"], log, "e")
        await turns()
        s2, end_s2 = holder(moves, "shared", ["A"], log, "s2")  # behind the waiting e
        other, end_other = holder(moves, "shared", ["B"], log, "b")  # another block: no wait
        await turns()
        assert log == ["s1+", "b+"]
        end_s1.set()
        await turns()
        assert log[-2:] == ["s1-", "e+"]
        end_e.set()
        await turns()
        assert log[-2:] == ["e-", "s2+"]
        end_s2.set()
        end_other.set()
        await asyncio.gather(s1, e, s2, other)

    run(scenario)


def test_exclusive_holders_of_one_block_run_one_at_a_time():
    async def scenario():
        moves, inside, most = BlockMoves(), [0], [0]

        async def compact() -> None:
            async with moves.exclusive("A"):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                await turns(3)
                inside[0] -= 1

        await asyncio.gather(*(compact() for _ in range(6)), *(_shared_once(moves, ["A"]) for _ in range(3)))
        assert most == [1] and inside == [0] and moves.held() == set()

    run(scenario)


async def _shared_once(moves: BlockMoves, shm_ids: list[str]) -> None:
    async with moves.shared(shm_ids):
        assert not moves.busy(shm_ids)
        await asyncio.sleep(0)


def test_settled_asks_again_which_blocks_to_wait_on_after_each_change():
    async def scenario():
        moves, log = BlockMoves(), []
        where = ["A"]  # the blocks of a variable; a migration moves it from A to B
        a, end_a = holder(moves, "exclusive", ["A"], log, "a")
        await turns()
        reader = asyncio.create_task(moves.settled(lambda: list(where)))
        await turns()
        b, end_b = holder(moves, "exclusive", ["B"], log, "b")
        await turns()
        where[:] = ["B"]
        end_a.set()
        await turns()
        assert not reader.done()  # A is settled, but the variable is in B now, which moves
        end_b.set()
        await asyncio.wait_for(reader, BOUND)
        await asyncio.gather(a, b)

    run(scenario)


@pytest.mark.parametrize("seed", range(20))
def test_random_holds_never_overlap_wrongly_and_never_deadlock(seed):
    """Many tasks taking exclusive and shared holds and settled waits on a few blocks,
    in random orders and durations: while one holds a block exclusively nobody else
    holds it, and every task finishes."""

    async def scenario():
        rng, moves = random.Random(seed), BlockMoves()
        exclusive: set[str] = set()
        shared: dict[str, int] = dict.fromkeys("ABC", 0)

        async def one(kind: str, ids: list[str]) -> None:
            await turns(rng.randrange(3))
            if kind == "exclusive":
                async with moves.exclusive(ids[0]):
                    assert ids[0] not in exclusive and not shared[ids[0]]
                    exclusive.add(ids[0])
                    await turns(rng.randrange(4))
                    exclusive.discard(ids[0])
            elif kind == "shared":
                async with moves.shared(ids):
                    assert not exclusive & set(ids)
                    for s in ids:
                        shared[s] += 1
                    await turns(rng.randrange(4))
                    for s in ids:
                        shared[s] -= 1
            else:
                await moves.settled(lambda: ids)
                assert not exclusive & set(ids)

        tasks = [
            one(rng.choice(["exclusive", "shared", "settled"]), rng.sample("ABC", rng.randint(1, 3))) for _ in range(40)
        ]
        await asyncio.gather(*tasks)
        assert moves.held() == set()

    run(scenario)


def test_a_cancelled_exclusive_waiter_lets_shared_holds_in_at_once():
    async def scenario():
        moves, log = BlockMoves(), []
        s1, end_s1 = holder(moves, "shared", ["A"], log, "s1")
        await turns()
        e, _ = holder(moves, "exclusive", ["A"], log, "e")
        await turns()
        s2, end_s2 = holder(moves, "shared", ["A"], log, "s2")  # writer preference: behind e
        await turns()
        assert log == ["s1+"]
        e.cancel()  # the compaction's caller went away
        await turns()
        try:
            assert log == ["s1+", "s2+"], "s2 still waits for an exclusive hold nobody wants"
        finally:
            end_s1.set()
            end_s2.set()
            await asyncio.gather(s1, s2, e, return_exceptions=True)

    run(scenario)


# -- compaction -------------------------------------------------------------------------
class FakeOwners:
    """Answers ``ask`` with ``answer(worker, op, kwargs)``, recording each call."""

    def __init__(self, answer: Callable[[str, str, dict], object]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, dict]] = []

    async def ask(self, worker: str, op: str, **kwargs: object) -> object:
        self.calls.append((worker, op, kwargs))
        await asyncio.sleep(0)  # an owner answers later: others run meanwhile
        return self.answer(worker, op, kwargs)


def report(moved: list[tuple[int, int, int, int]]) -> dict:
    return {"moved": moved, "bytes_moved": 100, "largest_free_before": 10, "largest_free_after": 20}


def test_a_compaction_moves_only_unleased_visible_copies_and_records_where_they_went():
    async def scenario():
        d = directory(("A", "n1", "w1"))
        a, leased, gone, b = (insert(d, n, offset=(i + 1) * 4096) for i, n in enumerate(["a", "leased", "gone", "b"]))
        d.acquire(leased, "p1")
        d.acquire(gone, "p1")
        d.delete(gone)
        owners = FakeOwners(lambda w, op, kw: report([(4096, 0, 64, 256), (16384, 256, 320, 128)]))
        moves, lost = BlockMoves(), []
        compaction = Compaction(d, moves, owners, lost.append)
        seen = []

        async def reader() -> None:  # a get of "a" while the block moves sees the new offset
            await moves.settled(lambda: [c.shm_id for c in a.copies])
            seen.append(d.info(a)["locations"])

        result, _ = await asyncio.gather(compaction.compact(d.blocks["A"]), _after_start(moves, reader))
        assert owners.calls == [("w1", "compact", {"shm_id": "A", "movable": [4096, 16384]})]
        assert result["moved"] == ["a", "b"] and result["bytes_moved"] == 100
        assert (result["largest_free_before"], result["largest_free_after"]) == (10, 20)
        assert (a.copies[0].extent_offset, a.copies[0].data_offset) == (0, 64)
        assert (b.copies[0].extent_offset, b.copies[0].extent_size) == (256, 128)
        assert leased.copies[0].extent_offset == 8192 and gone.copies[0].extent_offset == 12288
        assert d.blocks["A"].used == 4 * 256 - 128 and seen == [[("n1", "A", 64)]] and not lost
        assert moves.held() == set()

    run(scenario)


async def _after_start(moves: BlockMoves, reader: Callable[[], Awaitable[None]]) -> None:
    while not moves.held():
        await asyncio.sleep(0)
    await reader()


def test_an_owner_lost_mid_compaction_leaves_offsets_and_calls_lost():
    async def scenario():
        d = directory(("A", "n1", "w1"))
        a = insert(d, "a", offset=4096)

        def die(worker, op, kwargs):
            raise WorkerLostError(f"worker {worker} was lost during {op!r}")

        moves, lost = BlockMoves(), []
        with pytest.raises(WorkerLostError, match="w1 was lost"):
            await Compaction(d, moves, FakeOwners(die), lost.append).compact(d.blocks["A"])
        assert lost == [d.blocks["A"]] and a.copies[0].extent_offset == 4096 and moves.held() == set()

    run(scenario)


def test_a_block_with_no_owner_or_no_longer_known_is_not_asked():
    async def scenario():
        d = directory(("A", "n1", None), ("B", "n1", "w1"))
        owners = FakeOwners(lambda w, op, kw: pytest.fail("asked"))
        compaction = Compaction(d, BlockMoves(), owners, lambda b: pytest.fail("lost"))
        removed = d.remove_block("B")
        for block in (d.blocks["A"], removed):
            result = await compaction.compact(block)
            assert result["moved"] == [] and result["shm_id"] == block.shm_id
        assert owners.calls == []

    run(scenario)


class FakeScheduler:
    """What ``Membership.lost_block`` needs of a scheduler: a loop to schedule on."""

    def __init__(self) -> None:
        self.scheduled: list[tuple] = []
        self.loop = self

    def add_callback(self, *call: object) -> None:
        self.scheduled.append(call)


def test_an_owner_lost_after_its_block_was_adopted_leaves_the_adopter_in_place():
    async def scenario():
        d = directory(("A", "n1", "w1"))
        a = insert(d, "a", offset=4096)
        asked, answer = asyncio.Event(), asyncio.Event()

        async def hang(worker, op, **kwargs):  # the owner hangs, is removed, and fails at last
            asked.set()
            await answer.wait()
            raise WorkerLostError(f"worker {worker} was lost during {op!r}")

        owners = FakeOwners(lambda w, op, kw: None)
        owners.ask = hang
        membership = Membership(FakeScheduler(), "fabric", d, owners, BlockMoves())
        task = asyncio.create_task(Compaction(d, BlockMoves(), owners, membership.lost_block).compact(d.blocks["A"]))
        await asyncio.wait_for(asked.wait(), BOUND)
        d.orphan_blocks("w1")  # Dask removed w1; a peer adopts its block (as Membership.remove does)
        d.adopt("A", "w2", CAPACITY - 256, [extent(a.copies[0], "a")])
        answer.set()
        with pytest.raises(WorkerLostError):
            await task
        block = d.blocks["A"]
        assert (block.worker, block.unsettled) == ("w2", False), "the adopted block was orphaned again"
        assert d.info(a)["locations"] == [("n1", "A", 4096 + 64)]

    run(scenario)
