"""The directory's block accounting, model-checked: a rule-based state machine checks
after every step that each block's ``used`` is the sum of the extents the directory
counts, and that no copy is ever freed twice."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from datafabric.errors import NameNotFoundError
from datafabric.messages import Reservation
from tests.directories import directory, extent, ids, reservation, seal_item
from yp.records import Copy, Variable

HOLDERS = ["p1", "p2", "w1"]  # processes reading or writing; a worker holds leases too


class AccountingMachine(RuleBasedStateMachine):
    """Random inserts, replicas, evictions, leases, deletes, holders leaving, compactions
    and adoptions, against a model of which extents the directory must count: each freed
    copy was counted (never freed twice) and each block's ``used`` is their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.d = directory(("A", "n1", "w1"), ("B", "n1", "w1"), ("C", "n2", "w2"))
        self.end = dict.fromkeys(self.d.blocks, 0)  # a bump allocator per block: offsets never clash
        self.counted: dict[int, tuple[str, int]] = {}  # extent id -> (shm_id, size)
        self.pending: dict[tuple[str, int], str] = {}  # (shm_id, offset) -> holder
        self.leases: dict[int, Counter] = {}  # var_id -> holder -> count, for every var in by_id
        self.deleted: set[int] = set()
        self.names = (f"v{i}" for i in itertools.count())

    def place(self, shm_id: str, size: int) -> Reservation:
        offset, self.end[shm_id] = self.end[shm_id], self.end[shm_id] + size
        return reservation(offset, size)

    def count(self, shm_id: str, r: Reservation) -> None:
        self.counted[r["extent_id"]] = (shm_id, r["extent_size"])

    def freed(self, copies: list[Copy], expected: set[int]) -> None:
        assert ids(copies) == sorted(expected)
        for c in copies:
            assert self.counted.pop(c.extent_id, None) == (c.shm_id, c.extent_size), "freed twice or never counted"

    def forget(self, var: Variable) -> set[int]:
        self.leases.pop(var.var_id)
        self.deleted.discard(var.var_id)
        return {c.extent_id for c in var.copies}

    def visible(self, data) -> Variable:
        return self.d.variables[data.draw(st.sampled_from(sorted(self.d.variables)))]

    @rule(holder=st.sampled_from(HOLDERS), shm_id=st.sampled_from("ABC"), size=st.integers(1, 4096))
    def reserve(self, holder, shm_id, size):
        r = self.place(shm_id, size)
        self.d.add_pending(holder, shm_id, r)
        self.pending[(shm_id, r["extent_offset"])] = holder
        self.count(shm_id, r)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), reuse=st.booleans())
    def seal_reserved(self, data, reuse):
        shm_id, offset = data.draw(st.sampled_from(sorted(self.pending)))
        copy = self.d.pending[(shm_id, offset)].copy
        gone = sorted({v.name for v in self.d.by_id.values()} - set(self.d.variables))
        name = gone[0] if reuse and gone else next(self.names)  # a deleted name may be bound anew
        var = self.d.seal(seal_item(name, shm_id, offset, copy.extent_size, copy.extent_id))
        del self.pending[(shm_id, offset)]
        self.leases[var.var_id] = Counter()

    @rule(shm_id=st.sampled_from("ABC"), size=st.integers(1, 4096))
    def seal_in_own_block(self, shm_id, size):
        r = self.place(shm_id, size)
        var = self.d.seal({**seal_item(next(self.names), shm_id, 0), **r})
        self.count(shm_id, r)
        self.leases[var.var_id] = Counter()

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def abort(self, data):
        key = data.draw(st.sampled_from(sorted(self.pending)))
        del self.pending[key]
        copy = self.d.drop_pending(*key)
        self.freed([copy], {copy.extent_id})

    @precondition(lambda self: self.d.variables)
    @rule(data=st.data(), shm_id=st.sampled_from("ABC"))
    def replicate(self, data, shm_id):
        var = self.visible(data)
        r = self.place(shm_id, var.copies[0].extent_size)
        self.d.add_pending("datafabric-yellowpages", shm_id, r)
        self.d.add_copy(var, self.d.seal_pending_copy(shm_id, r["extent_offset"]))
        self.count(shm_id, r)

    @rule(node=st.sampled_from(["n1", "n2"]))
    def evict(self, node):
        found = self.d.evictable(node)
        for var, copy in found:
            assert not self.leases[var.var_id] and var.var_id not in self.deleted and len(var.copies) > 1
            assert self.d.blocks[copy.shm_id].node == node
        if found:
            var, copy = found[0]
            self.freed([self.d.drop_copy(var, copy)], {copy.extent_id})

    @precondition(lambda self: self.d.variables)
    @rule(data=st.data(), holder=st.sampled_from(HOLDERS))
    def acquire(self, data, holder):
        var = self.visible(data)
        self.d.acquire(var, holder)
        self.leases[var.var_id][holder] += 1

    @precondition(lambda self: self.d.by_id)
    @rule(data=st.data(), holder=st.sampled_from(HOLDERS))
    def release(self, data, holder):
        var = self.d.by_id[data.draw(st.sampled_from(sorted(self.d.by_id)))]
        held = self.leases[var.var_id]
        ends = held[holder] == 1 and sum(held.values()) == 1 and var.var_id in self.deleted
        if held[holder]:
            held[holder] -= 1
        self.leases[var.var_id] = +held  # no holder left with a zero count
        self.freed(self.d.release(var.var_id, holder), self.forget(var) if ends else set())

    @precondition(lambda self: self.d.variables)
    @rule(data=st.data())
    def delete(self, data):
        var = self.visible(data)
        leased = any(self.leases[var.var_id].values())
        self.deleted.add(var.var_id)
        self.freed(self.d.delete(var), set() if leased else self.forget(var))
        with pytest.raises(NameNotFoundError):
            self.d.delete(var)  # a stale object: refused, nothing freed twice

    @rule(holder=st.sampled_from(HOLDERS))
    def holder_leaves(self, holder):
        expected = set()
        for var in list(self.d.by_id.values()):
            self.leases[var.var_id].pop(holder, None)
            if var.var_id in self.deleted and not any(self.leases[var.var_id].values()):
                expected |= self.forget(var)
        for key in [k for k, h in self.pending.items() if h == holder]:
            del self.pending[key]
            expected.add(self.d.pending[key].copy.extent_id)
        self.freed(self.d.drop_holder(holder), expected)
        self.d.arrived(holder)  # a later process under the same name (test_a_request_of_a_holder_that_left...)

    @rule(data=st.data(), shm_id=st.sampled_from("ABC"))
    def compact(self, data, shm_id):
        movable = self.d.movable(shm_id)
        expected = {
            c.extent_offset
            for v in self.d.variables.values()
            if not any(self.leases[v.var_id].values())
            for c in v.copies
            if c.shm_id == shm_id
        }
        assert set(movable) == expected
        moved = []
        for old in data.draw(st.lists(st.sampled_from(sorted(movable)), unique=True)) if movable else []:
            copy = movable[old][1]
            r = self.place(shm_id, data.draw(st.integers(1, copy.extent_size)))  # an extent may shrink
            moved.append((old, r["extent_offset"], r["data_offset"], r["extent_size"]))
            self.counted[copy.extent_id] = (shm_id, r["extent_size"])
        self.d.moved(self.d.blocks[shm_id], movable, moved)

    @rule(data=st.data(), shm_id=st.sampled_from("ABC"))
    def owner_dies_and_a_peer_adopts(self, data, shm_id):
        block = self.d.blocks[shm_id]
        block.worker, block.unsettled = None, True
        in_block = sorted(i for i, (s, _) in self.counted.items() if s == shm_id)
        assert sorted(self.d.live_ids(shm_id)) == in_block
        copies = [(v, c) for v, c in self.d.copies_in(shm_id)]
        lost = data.draw(st.sets(st.sampled_from([c.extent_id for _, c in copies]))) if copies else set()
        extents = [extent(Copy(shm_id, **self.place(shm_id, c.extent_size))) for _, c in copies]  # moved
        extents = [{**e, "extent_id": c.extent_id} for e, (_, c) in zip(extents, copies, strict=True)]
        extents = [e for e in extents if e["extent_id"] not in lost]
        for i in lost:
            del self.counted[i]
        free = block.capacity - sum(size for s, size in self.counted.values() if s == shm_id)
        dropped = self.d.adopt(shm_id, "w3", free, extents).lost
        assert sorted(dropped) == sorted(v.name for v, c in copies if c.extent_id in lost)
        for var, _ in copies:
            if not var.copies and var.var_id in self.leases:  # no copy left anywhere: it is gone
                self.forget(var)
        found = {c.extent_id: c for _, c in self.d.copies_in(shm_id)}
        assert all(found[e["extent_id"]].extent_offset == e["extent_offset"] for e in extents)

    @invariant()
    def used_is_the_sum_of_counted_extents(self):
        assert set(self.d.by_id) == set(self.leases)
        assert all(v.var_id in self.leases and v.var_id not in self.deleted for v in self.d.variables.values())
        for shm_id, block in self.d.blocks.items():
            model = sum(size for s, size in self.counted.values() if s == shm_id)
            listed = sum(c.extent_size for _, c in self.d.copies_in(shm_id))
            listed += sum(p.copy.extent_size for (s, _), p in self.d.pending.items() if s == shm_id)
            assert block.used == model == listed, shm_id
            assert block.free == block.capacity - model


AccountingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_accounting_against_a_model = AccountingMachine.TestCase
