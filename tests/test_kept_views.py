"""``yp.kept_views`` and ``yp.declarations`` as plain objects: views a process kept through a
scheduler crash, declared before and after their block is taken back, and the take-back's
round that holds the block's memory until they are (no cluster; the end-to-end cases, with a
SIGKILLed scheduler, are ``test_restart_kept_views.py`` and ``test_attack_restart_*.py``)."""

from __future__ import annotations

import asyncio

import dask
import pytest

from datafabric.errors import KeptViewLostError
from datafabric.layout import ExtentState
from tests.directories import CAPACITY, directory, extent, ids, reservation
from yp.declarations import WAIT_KEY, Declarations
from yp.kept_views import KeptViews
from yp.moves import BlockMoves
from yp.records import Block, Copy


def view(shm_id: str, copy: Copy) -> dict:
    return {"node": "n2", "shm_id": shm_id, "offset": copy.data_offset, "extent_id": copy.extent_id}


class FakeScheduler:
    """What ``Declarations`` uses of Dask's scheduler: the connected clients, the loop, reports."""

    def __init__(self, clients: list[str]) -> None:
        self.client_comms = dict.fromkeys(clients)
        self.watching: list = []
        self.reports: list = []
        self.loop = self

    def add_callback(self, f, *args) -> None:
        self.watching.append((f, args))

    def report(self, msg: dict, client: str) -> None:
        self.reports.append((client, msg))


class FakeOwners:
    def __init__(self) -> None:
        self.freed: list[Copy] = []

    def free_later(self, copies: list[Copy]) -> None:
        self.freed += copies


def declarations(d, clients: list[str]) -> tuple[Declarations, FakeOwners]:
    """Rounds of a YellowPages started long ago: a round ends as soon as its clients declared."""
    owners = FakeOwners()
    with dask.config.set({WAIT_KEY: 0}):
        rounds = Declarations(FakeScheduler(clients), d, owners, lambda: {"op": "datafabric_took_back"})
    return rounds, owners


def test_views_declared_before_the_take_back_are_leased_in_its_step():
    d = directory(("A", "n1", "w1"))
    kept = KeptViews(d, BlockMoves())
    c = [Copy("R", **reservation(i * 4096)) for i in range(4)]
    declared = asyncio.run(kept.declare("survivor", [view("R", c[0]), view("R", c[1]), view("R", c[0])]))
    assert declared == {"leased": 0, "waiting": 3, "lost": 0}
    assert asyncio.run(kept.declare("gone", [view("R", c[2])]))["waiting"] == 1
    d.drop_holder("gone")  # it left before the take-back: its view leases nothing
    block = Block("R", "n2", "w2", CAPACITY + 4096, CAPACITY, used=4 * 256)
    extents = [
        extent(c[0], "held"),
        extent(c[1], "read-when-deleted", state=ExtentState.DELETED),
        extent(c[2], "deleted", state=ExtentState.DELETED),
        extent(c[3], "free"),
    ]
    unnamed = d.recover_block(block, extents)
    assert [e["extent_id"] for e in unnamed] == [c[1].extent_id, c[2].extent_id]
    held = kept.take_back(block, unnamed)
    assert len(held) == 4 and d.blocks["R"].used == 4 * 256  # nothing freed in the take-back's step
    assert d.lookup("held").leases == {"survivor": 2}  # two views of it
    deleted = {v.copies[0].extent_id: v for v in d.by_id.values() if v.deleted}
    assert deleted[c[1].extent_id].leases == {"survivor": 1} and deleted[c[2].extent_id].leases == {}
    assert all(v.name not in d.variables for v in deleted.values())
    rounds, owners = declarations(d, [])
    rounds.open(held)  # nobody else connected: the round ends at once
    assert ids(owners.freed) == [c[2].extent_id] and d.blocks["R"].used == 3 * 256  # the one nobody declared
    assert d.lookup("free").leases == {} and kept.waiting == {}
    freed = d.drop_holder("survivor")  # the survivor left: the deleted variable goes now
    assert ids(freed) == [c[1].extent_id] and d.blocks["R"].used == 2 * 256
    assert c[1].extent_id not in {cp.extent_id for v in d.by_id.values() for cp in v.copies}


def test_views_declared_after_the_take_back_are_leased_only_on_their_own_extent():
    d = directory(("A", "n1", "w1"))
    kept = KeptViews(d, BlockMoves())
    c = Copy("R", **reservation(0))
    block = Block("R", "n2", "w2", CAPACITY + 4096, CAPACITY, used=256)
    assert kept.take_back(block, d.recover_block(block, [extent(c, "held")])) == [d.lookup("held")]
    unknown = Copy("R", **reservation(8192))
    other = Copy("R", **{**reservation(0), "extent_id": c.extent_id + 1})  # another extent placed there since
    counts = asyncio.run(kept.declare("late", [view("R", c), view("R", unknown), view("R", other)]))
    assert counts == {"leased": 1, "waiting": 0, "lost": 2}
    assert d.lookup("held").leases == {"late": 1}
    assert d.at_location("n2", "R", c.data_offset, c.extent_id) is d.lookup("held")
    with pytest.raises(KeptViewLostError, match="drop it"):
        d.at_location("n2", "R", c.data_offset, other.extent_id)


def test_a_round_holds_the_taken_back_block_until_every_client_declared_or_left():
    """A delete during the round keeps the memory; it is freed when the last client that was
    connected has declared (one declaration answers every round up to it) or left."""
    d = directory(("A", "n1", "w1"))
    kept = KeptViews(d, BlockMoves())
    c = [Copy("R", **reservation(i * 4096)) for i in range(2)]
    block = Block("R", "n2", "w2", CAPACITY + 4096, CAPACITY, used=2 * 256)
    held = kept.take_back(block, d.recover_block(block, [extent(c[0], "x"), extent(c[1], "y")]))
    rounds, owners = declarations(d, ["client-1", "client-2", "survivor"])
    rounds.declared_all("survivor")  # a worker process's client: its one declaration covers every round
    first = rounds.open(held)
    assert rounds.rounds[first].pending == {"client-1", "client-2"} and len(rounds.scheduler.watching) == 1
    x = d.lookup("x")
    assert d.delete(x) == [] and owners.freed == []  # held by the round
    rounds.joined("client-3")  # reconnected while the round waits: waited for too
    assert d.at_location("n2", "R", c[0].data_offset, c[0].extent_id) is x  # deleted, still held: declarable
    d.acquire(x, "client-1")  # client-1 declares its view of x
    rounds.declared("client-1", first, d.first_id)
    rounds.left("client-2")
    assert owners.freed == [] and first in rounds.rounds
    rounds.declared("client-3", first + 5, d.first_id)
    assert first not in rounds.rounds and owners.freed == []  # x is still client-1's
    assert d.lookup("y").leases == {} and x.leases == {"client-1": 1}
    assert ids(d.release(x.var_id, "client-1")) == [c[0].extent_id]


def test_a_declarer_that_leaves_forgets_its_waiting_views():
    d = directory()
    kept = KeptViews(d, BlockMoves())
    c = Copy("R", **reservation(0))
    asyncio.run(kept.declare("one", [view("R", c)]))
    asyncio.run(kept.declare("two", [view("R", c), view("S", c)]))
    kept.forget("two")
    assert kept.waiting == {"R": {(c.data_offset, c.extent_id): ["one"]}}
    kept.forget("one")
    assert kept.waiting == {}
