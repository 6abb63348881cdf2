"""Chunks in columns against a model, on the directory with no cluster: seeded random
sequences of seals (datasets and ordinary variables, their ids interleaved), look-ups by
name, by id and by location, leases, deletes, block walks and blocks lost.  After every
step each name and id answers as the model says (a chunk deleted and let go never comes
back from its columns, an id never finds another dataset's chunk) and
``tests.columns.audit_directory`` finds nothing: one record per chunk, exact ``used``."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from datafabric.names import chunk_name
from tests.columns import audit_directory
from yp.directory import Directory
from yp.records import Block, Copy

SIZE = 4096  # every extent's size; data 64 bytes in
TYPE = "512 * float64"


class Model:
    """What the directory should answer: name -> (var id, block, data offset) of the visible
    (``live``) and of the deleted but leased (``held``), the leases, and the names gone."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.d = rng, Directory()
        self.blocks = itertools.count()
        self.next_offset: dict[str, int] = {}
        self.live: dict[str, tuple[int, str, int]] = {}
        self.held: dict[str, tuple[int, str, int]] = {}  # deleted, still leased
        self.dead: list[tuple[str, int]] = []
        self.datasets: dict[int, list[str]] = {}
        self.leases: Counter[str] = Counter()
        self.extent_ids = itertools.count(1)
        for _ in range(3):
            self.new_block()

    def new_block(self) -> None:
        shm_id = f"b{next(self.blocks)}"
        self.d.add_block(Block(shm_id, f"n{len(self.d.blocks) % 2}", f"w{shm_id}", 2**30, 2**30))
        self.next_offset[shm_id] = 0

    def place(self) -> Copy:
        shm_id = self.rng.choice(sorted(self.d.blocks))
        offset = self.next_offset[shm_id]
        self.next_offset[shm_id] += SIZE
        return Copy(shm_id, offset, SIZE, offset + 64, next(self.extent_ids))

    # -- steps ---------------------------------------------------------------------------
    def seal_dataset(self) -> None:
        dataset_id = next(self.d._ids)  # as Datasets.create takes it
        flats = sorted(self.rng.choice(40, int(self.rng.integers(0, 12)), replace=False).tolist())
        homes = {f: self.place() for f in flats}
        columns = self.d.seal_chunks(dataset_id, "n0", lambda f: TYPE, homes)
        self.datasets[dataset_id] = [chunk_name(dataset_id, f) for f in flats]
        for i, f in enumerate(flats):
            self.live[chunk_name(dataset_id, f)] = (columns.first_id + i, homes[f].shm_id, homes[f].data_offset)

    def seal_variable(self) -> None:
        c = self.place()
        name = f"v/{c.extent_id}"
        item = {"name": name, "doc": "", "type": TYPE, "nbytes": SIZE - 64, "shm_id": c.shm_id}
        item |= {"extent_offset": c.extent_offset, "extent_size": SIZE, "data_offset": c.data_offset}
        var = self.d.seal({**item, "extent_id": c.extent_id})
        self.live[name] = (var.var_id, c.shm_id, c.data_offset)

    def look_up(self) -> None:
        names = list(self.live) + list(self.held) + [n for n, _ in self.dead[-5:]]
        if not names:
            return
        name = names[int(self.rng.integers(len(names)))]
        known = self.live.get(name)
        by_name = self.d.variables.get(name)
        assert (None if by_name is None else _seen(by_name)) == known, name
        var_id = (known or self.held.get(name) or (dict(self.dead).get(name),))[0]
        by_id = self.d.by_id.get(var_id)
        assert (None if by_id is None else _seen(by_id)) == (known or self.held.get(name)), (name, var_id)
        if known is not None and self.rng.random() < 0.3:
            self.d.acquire(by_name, "reader")
            self.leases[name] += 1

    def release(self) -> None:
        leased = sorted(n for n, k in self.leases.items() if k)
        if not leased:
            return
        name = leased[int(self.rng.integers(len(leased)))]
        self.leases[name] -= 1
        var_id = (self.live.get(name) or self.held[name])[0]
        freed = self.d.release(var_id, "reader")
        assert bool(freed) == (not self.leases[name] and name in self.held), name
        if freed:
            self.dead.append((name, self.held.pop(name)[0]))

    def delete_dataset(self) -> None:
        if not self.datasets:
            return
        dataset_id = sorted(self.datasets)[int(self.rng.integers(len(self.datasets)))]
        variables = [v for n in self.datasets.pop(dataset_id) if (v := self.d.variables.get(n)) is not None]
        freed = self.d.delete_all(variables)
        assert len(freed) == sum(not self.leases[v.name] for v in variables)
        for var in variables:
            seen = self.live.pop(var.name)
            if self.leases[var.name]:
                self.held[var.name] = seen
            else:
                self.dead.append((var.name, seen[0]))

    def walk_block(self) -> None:
        shm_id = self.rng.choice(sorted(self.d.blocks))
        walked = {v.name: (v.var_id, c.shm_id, c.data_offset) for v, c in self.d.copies_in(shm_id)}
        expected = {n: s for n, s in (self.live | self.held).items() if s[1] == shm_id}
        assert walked == expected, shm_id

    def locate(self) -> None:
        if self.live:
            name = sorted(self.live)[int(self.rng.integers(len(self.live)))]
            var_id, shm_id, offset = self.live[name]
            assert self.d.nodes_of_chunk(name) == {self.d.blocks[shm_id].node}
            assert self.d.at_location(self.d.blocks[shm_id].node, shm_id, offset).name == name

    def lose_block(self) -> None:
        shm_id = self.rng.choice(sorted(self.d.blocks))
        self.d.drop_block(shm_id)
        for table in (self.live, self.held):
            for name in [n for n, s in table.items() if s[1] == shm_id]:
                self.dead.append((name, table.pop(name)[0]))
                self.leases.pop(name, None)  # its lease ends with its last copy
        self.new_block()


def _seen(var) -> tuple[int, str, int]:
    [c] = var.copies
    return var.var_id, c.shm_id, c.data_offset


@pytest.mark.parametrize("seed", range(6))
def test_chunks_in_columns_answer_as_the_model_through_random_steps(seed):
    model = Model(np.random.default_rng(seed))
    steps = [model.seal_dataset] * 3 + [model.seal_variable, model.delete_dataset, model.walk_block]
    steps += [model.look_up] * 6 + [model.release] * 2 + [model.locate] * 2 + [model.lose_block]
    for _ in range(600):
        steps[int(model.rng.integers(len(steps)))]()
        found = audit_directory(model.d)
        assert not found["problems"], found["problems"]
