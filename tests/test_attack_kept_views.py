"""Adversarial checks of the kept-views rounds' accounting (``yp.declarations``,
``yp.kept_views``), no cluster: clients that declare twice, for a later round, or leave
mid-round; a second take-back while a round is open; a view declared with a wrong extent id;
and that every lease a round takes ends with it (the memory is freed in the end)."""

from __future__ import annotations

import asyncio

import dask
import pytest

from datafabric.errors import InvalidArgumentError
from datafabric.layout import ExtentState
from tests.directories import CAPACITY, directory, extent, ids, reservation
from tests.test_kept_views import FakeOwners, FakeScheduler, declarations, view
from yp.declarations import HOLDER_PREFIX, WAIT_KEY
from yp.kept_views import KeptViews
from yp.membership import Membership
from yp.moves import BlockMoves
from yp.records import Block, Copy


def taken_back(d, kept, shm_id: str, names: list[str]):
    copies = [Copy(shm_id, **reservation(i * 4096)) for i in range(len(names))]
    block = Block(shm_id, "n2", "w2", CAPACITY + 4096, CAPACITY, used=len(names) * 256)
    return copies, kept.take_back(
        block, d.recover_block(block, [extent(c, n) for c, n in zip(copies, names, strict=True)])
    )


def round_leases(d) -> dict:
    return {
        v.name or v.var_id: dict(v.leases)
        for v in d.by_id.values()
        if any(h.startswith(HOLDER_PREFIX) for h in v.leases)
    }


def test_declaring_twice_for_a_later_round_and_leaving_mid_round_end_every_round_lease():
    d = directory()
    kept = KeptViews(d, BlockMoves())
    a, held_a = taken_back(d, kept, "R", ["a0", "a1", "a2"])
    rounds, owners = declarations(d, ["c1", "c2", "c3"])
    first = rounds.open(held_a)
    d.acquire(d.lookup("a0"), "c1")
    rounds.declared("c1", first, d.first_id)
    rounds.declared("c1", first, d.first_id)  # twice: nothing changes
    rounds.declared("c1", first + 10, d.first_id)  # for a round not opened yet: answers the open ones only
    assert rounds.rounds[first].pending == {"c2", "c3"}
    b, held_b = taken_back(d, kept, "S", ["b0", "b1"])  # a second take-back while the first round is open
    second = rounds.open(held_b)
    assert rounds.rounds[second].pending == {"c1", "c2", "c3"}  # c1 declared before S was back
    assert d.delete(d.lookup("a1")) == [] and d.delete(d.lookup("b1")) == []  # both held by their rounds
    rounds.left("c2")  # mid-round
    rounds.declared("c3", first, d.first_id)
    assert first not in rounds.rounds and second in rounds.rounds
    assert ids(owners.freed) == [a[1].extent_id]  # a1: deleted, no longer held
    rounds.declared("c1", second, d.first_id)
    assert second in rounds.rounds  # c3 still pending on the second
    rounds.left("c3")
    assert rounds.rounds == {} and round_leases(d) == {}
    assert ids(owners.freed) == sorted([a[1].extent_id, b[1].extent_id])
    assert d.lookup("a0").leases == {"c1": 1} and d.lookup("b0").leases == {}
    assert ids(d.drop_holder("c1")) == []  # a0 is not deleted: nothing to free


def test_a_view_with_a_wrong_extent_id_waits_but_leases_nothing_at_its_take_back():
    d = directory()
    kept = KeptViews(d, BlockMoves())
    copies = [Copy("R", **reservation(i * 4096)) for i in range(2)]
    wrong = Copy("R", **{**reservation(0), "extent_id": copies[0].extent_id ^ 1})
    assert asyncio.run(kept.declare("c", [view("R", wrong), view("R", copies[1])]))["waiting"] == 2
    block = Block("R", "n2", "w2", CAPACITY + 4096, CAPACITY, used=2 * 256)
    unnamed = d.recover_block(block, [extent(copies[0], "x", state=ExtentState.DELETED), extent(copies[1], "y")])
    held = kept.take_back(block, unnamed)
    rounds, owners = declarations(d, [])
    rounds.open(held)
    assert ids(owners.freed) == [copies[0].extent_id]  # the deleted one nobody rightly declared
    assert d.lookup("y").leases == {"c": 1} and kept.waiting == {} and round_leases(d) == {}


def test_a_declarer_leaving_between_its_declaration_and_the_take_back_leaks_nothing():
    d = directory()
    kept = KeptViews(d, BlockMoves())
    c = Copy("R", **reservation(0))
    asyncio.run(kept.declare("gone", [view("R", c)]))
    d.drop_holder("gone")
    kept.forget("gone")
    asyncio.run(kept.declare("stays", [view("R", c)]))
    block = Block("R", "n2", "w2", CAPACITY + 4096, CAPACITY, used=256)
    held = kept.take_back(block, d.recover_block(block, [extent(c, "z", state=ExtentState.DELETED)]))
    rounds, owners = declarations(d, ["stays"])
    rounds.open(held)
    rounds.left("stays")
    assert owners.freed == [] and round_leases(d) == {}  # still the declarer's
    assert ids(d.drop_holder("stays")) == [c.extent_id]
    assert all(not v.leases for v in d.by_id.values()) and kept.waiting == {}


def test_a_round_whose_client_never_declares_ends_at_its_deadline_with_its_leases():
    d = directory()
    kept = KeptViews(d, BlockMoves())
    a, held = taken_back(d, kept, "R", ["a0", "a1"])
    rounds, owners = declarations(d, ["silent"])
    n = rounds.open(held)
    assert d.delete(d.lookup("a0")) == [] and round_leases(d)
    [(watch, args)] = rounds.scheduler.watching
    asyncio.run(asyncio.wait_for(watch(*args), 5))  # W = 0: the deadline has passed at the first look
    assert n not in rounds.rounds and round_leases(d) == {}
    assert ids(owners.freed) == [a[0].extent_id]
    assert (
        rounds.declared("silent", n, d.first_id) == {} and rounds.rounds == {}
    )  # a late declaration: nothing to settle


def test_a_declarer_that_leaves_while_its_declaration_awaits_a_move_leaves_nothing_waiting():
    d = directory(("R", "n2", "w2"))
    moves = BlockMoves()
    kept = KeptViews(d, moves)
    on_r, on_s = Copy("R", **reservation(0)), Copy("S", **reservation(0))  # R is back, S is not

    async def race():
        held, release = asyncio.Event(), asyncio.Event()

        async def compaction():
            async with moves.exclusive("R"):
                held.set()
                await release.wait()

        mover = asyncio.create_task(compaction())
        await held.wait()
        declaring = asyncio.create_task(kept.declare("gone", [view("R", on_r), view("S", on_s)]))
        await asyncio.sleep(0)  # the declaration waits for R's move
        kept.forget("gone")  # the declarer left meanwhile (YellowPages.remove_client)
        d.drop_holder("gone")
        release.set()
        await mover
        return await declaring

    counts = asyncio.run(race())
    assert counts["lost"] == 2  # its holder is gone: neither view leases or waits for anything
    assert kept.waiting == {}


def test_a_declaration_answering_another_incarnation_s_event_settles_no_round_here():
    """Round numbers start again in every incarnation: a client's ``declared`` answering an
    earlier YellowPages' took-back event (its ``first_id``), reaching this one late, leaves
    this one's rounds waiting for the client; its own event's declaration settles them."""
    d = directory()
    kept = KeptViews(d, BlockMoves())
    _, held = taken_back(d, kept, "R", ["x"])
    rounds, owners = declarations(d, ["c1"])
    first = rounds.open(held)
    assert d.delete(d.lookup("x")) == []  # held by the round
    rounds.declared("c1", first + 1, d.first_id - 1_000)  # an earlier incarnation's ids start lower
    assert rounds.rounds[first].pending == {"c1"} and owners.freed == []
    rounds.declared("c1", first, d.first_id)
    assert rounds.rounds == {} and len(owners.freed) == 1


def test_a_worker_declarer_that_leaves_mid_declaration_is_not_counted_as_having_declared():
    """``Membership.declare_kept`` awaits a move of a block; its client leaves meanwhile
    (its leases end).  It must not be recorded as having declared every view: a client
    reconnecting under that id holds no lease, and later rounds wait for it."""
    d = directory(("R", "n2", "w2"))
    with dask.config.set({WAIT_KEY: 0}):
        members = Membership(FakeScheduler(["c1"]), "fabric", d, FakeOwners(), BlockMoves())
    on_r = Copy("R", **reservation(0))

    async def race():
        held, release = asyncio.Event(), asyncio.Event()

        async def compaction():
            async with members.moves.exclusive("R"):
                held.set()
                await release.wait()

        mover = asyncio.create_task(compaction())
        await held.wait()
        declaring = asyncio.create_task(members.declare_kept("c1", [view("R", on_r)]))
        await asyncio.sleep(0)  # the declaration waits for R's move
        members.kept.forget("c1")  # the client leaves (YellowPages.remove_client)
        members.declarations.left("c1")
        d.drop_holder("c1")
        release.set()
        await mover
        return await declaring

    assert asyncio.run(race())["lost"] == 1
    assert "c1" not in members.declarations.complete
    d.arrived("c1")  # back under its id
    members.declarations.joined("c1")
    n = members.declarations.open([])
    assert members.declarations.rounds[n].pending == {"c1"}


def test_a_declaration_naming_no_round_number_is_refused_and_changes_nothing():
    d = directory()
    kept = KeptViews(d, BlockMoves())
    _, held = taken_back(d, kept, "R", ["a0"])
    rounds, _ = declarations(d, ["c1"])
    n = rounds.open(held)
    for bad in ("1", None, 1.0, True, [n]):
        with pytest.raises(InvalidArgumentError, match="round number"):
            rounds.declared("c1", bad, d.first_id)
    assert rounds.rounds[n].pending == {"c1"}
    rounds.declared("c1", n, d.first_id)
    assert rounds.rounds == {}
