"""The YellowPages' directory as plain objects: no cluster, no scheduler, no shared memory.

Each rule of ``yp.directory`` (write-once names, memory held while leased and returned to
free exactly once, copies found again by extent id, blocks taken back from their headers)
is driven directly; ``test_directory_accounting.py`` model-checks the block accounting."""

from __future__ import annotations

import pytest

from datafabric.errors import (
    BlockNotFoundError,
    FabricError,
    NameExistsError,
    NameNotFoundError,
    OutOfSpaceError,
    WorkerLostError,
)
from datafabric.layout import ExtentState
from tests.directories import CAPACITY, directory, extent, ids, insert, replica, reservation, seal_item
from yp.records import Block, Copy


# -- names and reservations ----------------------------------------------------------
def test_names_are_write_once_and_a_refused_seal_changes_nothing():
    d = directory(("A", "n1", "w1"))
    d.check_new_names(["x", "y"])
    insert(d, "x")
    for batch, said in ((["x"], "'x' exists already"), (["y", "y"], "'y' exist already or come twice")):
        with pytest.raises(NameExistsError, match=said):
            d.check_new_names(batch)
    r = reservation(4096)
    d.add_pending("p1", "A", r)
    used = d.blocks["A"].used
    with pytest.raises(NameExistsError, match="write-once"):
        d.seal(seal_item("x", "A", 4096, extent_id=r["extent_id"]))
    assert d.blocks["A"].used == used and ("A", 4096) in d.pending  # the writer may still abort
    assert [c.extent_id for c in d.lookup("x").copies] != [r["extent_id"]]
    assert issubclass(NameExistsError, FabricError)


def test_seal_counts_an_extent_once_whether_or_not_the_directory_reserved_it():
    d = directory(("A", "n1", "w1"))
    r = reservation(0, 512)
    d.add_pending("p1", "A", r)
    assert d.blocks["A"].used == 512
    d.seal(seal_item("reserved", "A", 0, 512, r["extent_id"]))
    assert d.blocks["A"].used == 512 and not d.pending
    insert(d, "own-block", offset=4096, size=256)  # a writer's reservation in its own block
    assert d.blocks["A"].used == 768


def test_a_seal_into_a_block_no_longer_known_is_refused_clearly():
    d = directory(("A", "n1", "w1"))
    with pytest.raises(BlockNotFoundError, match="gone"):
        d.seal(seal_item("x", "gone", 0))
    assert "x" not in d.variables and not d.by_id


def test_a_departed_writer_that_may_map_its_reservation_keeps_it_until_it_ends_it():
    """``drop_holder`` frees the reservations of a writer that cannot map them and keeps,
    departed, those of a writer that may (``yp/departed.py``); a give-back naming another
    extent id ends nothing."""
    d = directory(("A", "n1", "w1"))
    mapped, streamed = reservation(0, 512), reservation(4096, 512)
    d.add_pending("client-1", "A", mapped)
    d.add_pending("client-1", "A", streamed)
    d.pending[("A", 0)].writer = {"boot": "b", "pid_ns": "pid:[1]", "pid": 7, "started": 9}
    freed = d.drop_holder("client-1")
    assert [c.extent_offset for c in freed] == [4096]
    assert [(k, p.departed) for k, p in d.stranded()] == [(("A", 0), True)]
    assert d.blocks["A"].used == 512 and d.live_ids("A") == [mapped["extent_id"]]
    assert d.drop_pending("A", 0, mapped["extent_id"] ^ 1) is None and d.stranded()
    d.arrived("client-1")  # back under its id: its seal works
    var = d.seal(seal_item("x", "A", 0, 512, mapped["extent_id"]))
    assert not d.stranded() and not d.pending and d.blocks["A"].used == 512 and var.copies[0].extent_offset == 0


def test_an_adoption_keeps_a_closing_owner_s_own_reservations_as_its_process_s():
    """A block handed off closing (``Block.closed_by``): its RESERVED extents the directory
    does not name are its tasks' own reservations, kept as departed writers'; any other
    extent it does not name is freed, as for every adoption."""
    d = directory(("A", "n1", None))
    process = {"boot": "b", "pid_ns": "pid:[1]", "pid": 7, "started": 9}
    d.blocks["A"].closed_by = ("w1", process)
    own, stale = Copy("A", **reservation(0)), Copy("A", **reservation(4096))
    found = [extent(own, "x", ExtentState.RESERVED), extent(stale, "y", ExtentState.DELETED)]
    adoption = d.adopt("A", "w2", CAPACITY - 512, found)
    assert ids(adoption.to_free) == [stale.extent_id]
    [(key, entry)] = d.stranded()
    assert key == ("A", 0) and (entry.holder, entry.writer, entry.copy.extent_id) == ("w1", process, own.extent_id)
    assert d.blocks["A"].used == 256 and d.blocks["A"].closed_by is None
    assert d.live_ids("A") == [own.extent_id]  # a later adoption keeps it too


def test_a_reservation_given_back_is_freed_once():
    d = directory(("A", "n1", "w1"))
    r = reservation(0, 512)
    d.add_pending("p1", "A", r)
    assert d.drop_pending("A", 0).extent_id == r["extent_id"]
    assert d.drop_pending("A", 0) is None
    assert d.blocks["A"].used == 0


def test_a_copy_filled_by_the_fabric_becomes_a_replica():
    d = directory(("A", "n1", "w1"), ("B", "n2", "w2"))
    var = insert(d, "x")
    d.add_pending("yp", "B", reservation(0))
    copy = d.seal_pending_copy("B", 0)
    d.add_copy(var, copy)
    assert not d.pending and d.blocks["B"].used == 256 and d.nodes_of(var) == {"n1", "n2"}


# -- leases and deletes ----------------------------------------------------------------
def test_memory_of_a_deleted_variable_is_freed_once_when_its_last_lease_ends():
    d = directory(("A", "n1", "w1"), ("B", "n2", "w2"))
    var = insert(d, "x")
    replica(d, var, "B")
    d.acquire(var, "p1")
    d.acquire(var, "p1")
    d.acquire(var, "p2")
    assert d.delete(var) == []  # leased: the name goes, the memory stays
    assert "x" not in d.variables and d.by_id[var.var_id] is var
    assert (d.blocks["A"].used, d.blocks["B"].used) == (256, 256)
    assert d.release(var.var_id, "p3") == []  # not a holder
    assert d.release(var.var_id, "p1") == [] and d.release(var.var_id, "p1") == []
    assert d.release(var.var_id, "p1") == []  # one release too many ends nothing
    freed = d.release(var.var_id, "p2")
    assert ids(freed) == ids(var.copies) and len(freed) == 2
    assert (d.blocks["A"].used, d.blocks["B"].used) == (0, 0) and var.var_id not in d.by_id
    assert d.release(var.var_id, "p2") == [] and d.drop_holder("p2") == []


def test_an_unleased_delete_frees_at_once():
    d = directory(("A", "n1", "w1"))
    var = insert(d, "x")
    assert ids(d.delete(var)) == ids(var.copies) and d.blocks["A"].used == 0


def test_delete_of_a_stale_variable_is_refused():
    d = directory(("A", "n1", "w1"))
    old = insert(d, "x")
    d.acquire(old, "p1")
    d.delete(old)
    new = insert(d, "x", offset=4096)  # the name is bound anew while old is still read
    with pytest.raises(NameNotFoundError, match="deleted meanwhile"):
        d.delete(old)
    assert d.lookup("x") is new and d.blocks["A"].used == 512
    assert ids(d.release(old.var_id, "p1")) == ids(old.copies)
    assert d.lookup("x") is new and d.blocks["A"].used == 256


def test_a_holder_that_leaves_ends_its_leases_and_gives_back_its_reservations():
    d = directory(("A", "n1", "w1"))
    var = insert(d, "x")
    d.acquire(var, "p1")
    d.acquire(var, "p1")
    d.acquire(var, "p2")
    d.delete(var)
    mine = d.add_pending("p1", "A", reservation(4096))
    theirs = d.add_pending("p2", "A", reservation(8192))
    assert ids(d.drop_holder("p1")) == [mine.extent_id]  # p2 still reads x
    assert ids(d.drop_holder("p2")) == ids([var.copies[0], theirs])
    assert not d.pending and d.blocks["A"].used == 0


def test_evictable_replicas_are_unleased_never_a_last_copy_and_least_recently_used_first():
    d = directory(("A", "n1", "w1"), ("B", "n2", "w2"))
    only = insert(d, "only", "B")
    old, new, leased = (insert(d, n, offset=i * 4096) for i, n in enumerate(["old", "new", "leased"]))
    for i, var in enumerate([old, new, leased]):
        replica(d, var, "B", (i + 1) * 4096)
    d.acquire(new, "p1")
    d.release(new.var_id, "p1")
    d.acquire(leased, "p1")
    found = d.evictable("n2")
    assert [v.name for v, _ in found] == ["old", "new"] and all(c.shm_id == "B" for _, c in found)
    assert only not in [v for v, _ in found]
    d.drop_copy(old, found[0][1])
    assert d.blocks["B"].used == 4 * 256 - 256 and [v.name for v, _ in d.evictable("n2")] == ["new"]


# -- moves, orphans and adoption -------------------------------------------------------
def test_movable_leaves_out_leased_and_deleted_copies_and_moved_records_new_offsets():
    d = directory(("A", "n1", "w1"))
    a, b, gone = insert(d, "a", offset=4096), insert(d, "b", offset=8192), insert(d, "gone", offset=12288)
    d.acquire(b, "p1")
    d.acquire(gone, "p1")
    d.delete(gone)
    movable = d.movable("A")
    assert sorted(movable) == [4096] and movable[4096][0] is a
    names = d.moved(d.blocks["A"], movable, [(4096, 0, 64, 128)])
    assert names == ["a"] and (a.copies[0].extent_offset, a.copies[0].data_offset) == (0, 64)
    assert d.blocks["A"].used == 3 * 256 - 128


def test_an_adopted_block_finds_its_copies_by_extent_id_and_drops_the_missing():
    d = directory(("A", "n1", "w1"), ("B", "n1", "w1"))
    kept, lost, twice = insert(d, "kept"), insert(d, "lost", offset=4096), insert(d, "twice", offset=8192)
    replica(d, twice, "B")
    assert d.orphan_blocks("w1") == ["kept", "lost", "twice"]  # unavailable until adopted
    assert sorted(d.live_ids("A")) == ids([kept.copies[0], lost.copies[0], twice.copies[0]])
    moved = extent(kept.copies[0], "kept", extent_offset=512, data_offset=576)
    dropped = d.adopt("A", "w2", CAPACITY - 256, [moved]).lost  # a compaction moved kept; lost is gone
    assert sorted(dropped) == ["lost", "twice"]
    assert (kept.copies[0].extent_offset, kept.copies[0].data_offset) == (512, 576)
    assert "lost" not in d.variables and lost.var_id not in d.by_id  # no copy of it left anywhere
    assert [c.shm_id for c in d.lookup("twice").copies] == ["B"]
    block = d.blocks["A"]
    assert (block.worker, block.used, block.unsettled) == ("w2", 256, False)


def test_info_leaves_out_copies_of_an_unsettled_block():
    d = directory(("A", "n1", "w1"), ("B", "n2", "w2"))
    var = insert(d, "x")
    replica(d, var, "B")
    d.blocks["A"].worker, d.blocks["A"].unsettled = None, True  # its owner died compacting it
    info = d.info(var)
    assert info["locations"] == [("n2", "B", 64)] and info["workers"] == ["w2"]


def test_a_taken_back_block_rebuilds_variables_replicas_and_returns_what_it_does_not_name():
    d = directory(("A", "n1", "w1"))
    known = insert(d, "known")
    clash = insert(d, "clash", offset=4096)
    block = Block("R", "n2", "w2", CAPACITY + 4096, CAPACITY, used=4 * 256)
    c = [Copy("R", **reservation(i * 4096)) for i in range(5)]
    extents = [
        extent(c[0], "new"),
        extent(c[1], "known"),  # same type and size: a replica
        extent(c[2], "clash", nbytes=16),  # another size: no visible variable
        extent(c[3], "half", state=ExtentState.RESERVED),  # a seal the crash cut: no visible variable
        extent(c[4], "other", type="2 * int32"),
    ]
    unnamed = d.recover_block(block, extents)
    assert [e["extent_id"] for e in unnamed] == [c[2].extent_id, c[3].extent_id]
    assert d.blocks["R"].used == 4 * 256  # still counted: KeptViews.take_back holds them until declared
    assert d.lookup("new").copies == [c[0]] and "half" not in d.variables
    assert d.lookup("known") is known and known.copies[1] == c[1]
    assert d.lookup("clash") is clash and len(clash.copies) == 1
    assert d.lookup("other").type == "2 * int32"
    assert d.lookup("new").var_id >= d.first_id


def test_a_block_being_created_is_not_used_until_confirmed():
    d = directory()
    d.begin_block("C", "n1", "w1")
    assert d.ready() == [] and d.placement(1, None) == []
    with pytest.raises(BlockNotFoundError, match="datafabric status"):
        d.block("n1", "C")
    d.orphan_blocks("w1")
    assert [b.shm_id for b in d.orphaned("n1")] == ["C"]  # its adopter removes it
    d.blocks["C"].worker = "w1"
    d.confirm_block("C", CAPACITY + 4096, CAPACITY)
    assert d.block("n1", "C").free == CAPACITY and [b.shm_id for b in d.placement(1, "n1")] == ["C"]


def test_out_of_space_says_whether_owners_or_room_are_missing():
    d = directory(("A", "n1", None), ("B", "n2", "w2"))
    insert(d, "big", "B", size=CAPACITY - 1024)
    assert "has a live owner" in str(d.out_of_space(4096, "n1"))
    msg = str(d.out_of_space(4096))
    assert "free in one piece" in msg and "n1: 1.0 MiB" in msg and "n2: 0.0 MiB" in msg
    assert isinstance(d.out_of_space(1), OutOfSpaceError)
    assert "no blocks" in str(d.out_of_space(4096, "n3"))


def test_a_request_of_a_holder_that_left_records_nothing():
    """A reserve or acquire in flight when its process left would otherwise hold memory
    that nobody ever gives back (the soak found such a RESERVED extent)."""
    d = directory(("A", "n1", "w1"))
    x = insert(d, "x")
    d.drop_holder("gone")
    with pytest.raises(WorkerLostError):
        d.add_pending("gone", "A", reservation(4096))
    with pytest.raises(WorkerLostError):
        d.acquire(x, "gone")
    assert not d.pending and not x.leases and d.blocks["A"].used == 256
    d.arrived("gone")  # the same address (or client id) came back
    d.acquire(x, "gone")
    assert x.leases["gone"] == 1
