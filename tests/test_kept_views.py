"""``yp.kept_views`` as plain objects: views a process kept through a scheduler crash,
declared before and after their block is taken back (no cluster; the end-to-end case,
with a SIGKILLed scheduler, is ``test_restart_kept_views.py``)."""

from __future__ import annotations

import asyncio

from datafabric.layout import ExtentState
from tests.directories import CAPACITY, directory, extent, ids, reservation
from yp.kept_views import KeptViews
from yp.moves import BlockMoves
from yp.records import Block, Copy


def view(shm_id: str, copy: Copy) -> dict:
    return {"node": "n2", "shm_id": shm_id, "offset": copy.data_offset}


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
    assert d.recover_block(block, extents) == []
    to_free = kept.take_back(block, extents)
    assert ids(to_free) == [c[2].extent_id] and d.blocks["R"].used == 3 * 256  # the one nobody declared
    held = d.lookup("held")
    assert held.leases == {"survivor": 2}  # two views of it
    [deleted] = [v for v in d.by_id.values() if v.deleted]
    assert deleted.name not in d.variables and deleted.copies == [c[1]] and deleted.leases == {"survivor": 1}
    assert d.lookup("free").leases == {} and kept.waiting == {}
    freed = d.drop_holder("survivor")  # the survivor left: the deleted variable goes now
    assert ids(freed) == [c[1].extent_id] and d.blocks["R"].used == 2 * 256
    assert deleted.var_id not in d.by_id and held.leases == {}


def test_views_declared_after_the_take_back_are_leased_at_once():
    d = directory(("A", "n1", "w1"))
    kept = KeptViews(d, BlockMoves())
    c = Copy("R", **reservation(0))
    block = Block("R", "n2", "w2", CAPACITY + 4096, CAPACITY, used=256)
    d.recover_block(block, [extent(c, "held")])
    assert kept.take_back(block, [extent(c, "held")]) == []
    unknown = Copy("R", **reservation(8192))
    counts = asyncio.run(kept.declare("late", [view("R", c), view("R", unknown)]))
    assert counts == {"leased": 1, "waiting": 0, "lost": 1}  # nothing starts where the second view was
    assert d.lookup("held").leases == {"late": 1}


def test_a_declarer_that_leaves_forgets_its_waiting_views():
    d = directory()
    kept = KeptViews(d, BlockMoves())
    c = Copy("R", **reservation(0))
    asyncio.run(kept.declare("one", [view("R", c)]))
    asyncio.run(kept.declare("two", [view("R", c), view("S", c)]))
    kept.forget("two")
    assert kept.waiting == {"R": {c.data_offset: ["one"]}}
    kept.forget("one")
    assert kept.waiting == {}
