"""A sealed dataset's chunks in columns (``yp/chunk_columns.py``), driven on the directory
with no cluster: each look-up a protocol makes materialises exactly the chunks it names,
in one step, with the same records an ordinary seal would have made; look-ups that only
ask where a chunk is, or that concern leases and replicas, build nothing; a chunk once
materialised and gone never comes back from its columns."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from datafabric.errors import BlockNotFoundError
from datafabric.names import CHUNK_PREFIX, chunk_name
from yp.directory import Directory
from yp.local_leases import LocalLeases
from yp.moves import BlockMoves
from yp.records import Block, Copy

DATASET = 7
TYPE = "4 * float64"


def _type_of(flat: int) -> str:
    return TYPE


def _sealed(flats=(0, 2, 3, 5), blocks=("a", "b")) -> tuple[Directory, object]:
    """Chunks of ``flats``, alternately in ``blocks`` (one node each), sealed in columns."""
    d = Directory()
    for i, shm_id in enumerate(blocks):
        d.add_block(Block(shm_id, f"node{i}", f"worker{i}", 2**20, 2**20))
    homes = {f: Copy(blocks[k % len(blocks)], 4096 * f, 4096, 4096 * f + 64, 1000 + f) for k, f in enumerate(flats)}
    return d, d.seal_chunks(DATASET, "node0", _type_of, homes)


def _materialised(d: Directory) -> set[str]:
    return {n for n in dict.keys(d.variables)}


def test_a_seal_takes_consecutive_ids_counts_the_memory_and_builds_no_variable():
    d, columns = _sealed()
    assert columns.left == 4 and _materialised(d) == set() and dict.__len__(d.by_id) == 0
    assert d.blocks["a"].used == d.blocks["b"].used == 2 * 4096
    assert all(chunk_name(DATASET, f) in d.variables for f in (0, 2, 3, 5))  # present, still not built
    assert chunk_name(DATASET, 1) not in d.variables and f"{CHUNK_PREFIX}{DATASET}/02" not in d.variables
    assert columns.first_id + 3 in d.by_id and columns.first_id + 4 not in d.by_id
    assert _materialised(d) == set()
    assert next(d._ids) == columns.first_id + 4  # the next id is past the dataset's


def test_a_lookup_by_name_or_id_materialises_that_chunk_once_with_the_seals_records():
    d, columns = _sealed()
    var = d.lookup(chunk_name(DATASET, 3))
    assert (var.var_id, var.doc, var.type, var.nbytes) == (columns.first_id + 2, "node0", TYPE, 32)
    assert [(c.shm_id, c.extent_offset, c.extent_size, c.data_offset, c.extent_id) for c in var.copies] == [
        ("a", 4096 * 3, 4096, 4096 * 3 + 64, 1003)
    ]
    assert d.by_id.get(var.var_id) is var and d.variables[var.name] is var  # the one record from now on
    assert d.by_id[columns.first_id] is d.variables.get(chunk_name(DATASET, 0))
    assert columns.left == 2 and _materialised(d) == {chunk_name(DATASET, 0), chunk_name(DATASET, 3)}
    assert d.names(CHUNK_PREFIX) == sorted(_materialised(d))


def test_a_block_walk_materialises_that_blocks_chunks_only():
    d, _ = _sealed()
    assert sorted(v.name for v, _ in d.copies_in("b")) == [chunk_name(DATASET, 2), chunk_name(DATASET, 5)]
    assert _materialised(d) == {chunk_name(DATASET, 2), chunk_name(DATASET, 5)}
    assert sorted(d.live_ids("a")) == [1000, 1003]  # an adoption sees the others (and builds them)
    assert d.at_location("node0", "a", 4096 * 3 + 64, 1003).name == chunk_name(DATASET, 3)


def test_a_read_by_location_finds_a_chunk_in_columns():
    d, _ = _sealed()
    assert d.at_location("node1", "b", 4096 * 5 + 64).name == chunk_name(DATASET, 5)
    assert _materialised(d) == {chunk_name(DATASET, 5)}


def test_where_a_chunk_is_and_local_reads_build_nothing():
    d, columns = _sealed()
    assert d.nodes_of_chunk(chunk_name(DATASET, 2)) == {"node1"}
    assert d.nodes_of_chunk(var_id=columns.first_id) == {"node0"}
    assert d.nodes_of_chunk(chunk_name(DATASET, 1)) == set()
    d.used([columns.first_id + 1])
    assert d.drop_holder("someone") == [] and d.evictable("node0") == []
    assert _materialised(d) == set()


def test_a_chunks_local_lease_publication_becomes_its_own():
    d, columns = _sealed()
    told = frozenset({"worker0"})
    columns.told[columns.shm_ids.index("a")] = told
    var = d.lookup(chunk_name(DATASET, 0))
    other = d.lookup(chunk_name(DATASET, 2))  # block b: nobody told
    assert d.published == {var.var_id: told} and other.var_id not in d.published


def test_a_chunk_materialised_and_deleted_never_comes_back_from_the_columns():
    d, columns = _sealed()
    var = d.lookup(chunk_name(DATASET, 2))
    freed = d.delete(var)
    assert [c.extent_id for c in freed] == [1002] and d.blocks["b"].used == 4096
    assert chunk_name(DATASET, 2) not in d.variables and d.by_id.get(var.var_id) is None
    with pytest.raises(KeyError):
        d.by_id[var.var_id]
    everything = [d.lookup(chunk_name(DATASET, f)) for f in (0, 3, 5)]
    assert d.delete_all(everything) and not d.columns.by_dataset  # the last one gone: the columns go
    assert d.blocks["a"].used == d.blocks["b"].used == 0


def test_orphaned_blocks_name_their_chunks_in_columns():
    d, _ = _sealed()
    assert d.orphan_blocks("worker1") == [chunk_name(DATASET, 2), chunk_name(DATASET, 5)]
    assert _materialised(d) == set()


def test_a_seal_into_a_block_that_is_gone_records_nothing():
    d = Directory()
    d.add_block(Block("a", "node0", "worker0", 2**20, 2**20))
    homes = {0: Copy("a", 0, 4096, 64, 1), 1: Copy("gone", 0, 4096, 64, 2)}
    with pytest.raises(BlockNotFoundError):
        d.seal_chunks(DATASET, "node0", _type_of, homes)
    assert d.blocks["a"].used == 0 and not d.columns.by_dataset and chunk_name(DATASET, 0) not in d.variables


class _Owners:
    """What ``LocalLeases`` sends, kept; every worker connected."""

    def __init__(self, workers: list[str]) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.scheduler = SimpleNamespace(stream_comms=dict.fromkeys(workers))

    def send(self, worker: str, msg: dict) -> None:
        self.sent.append((worker, msg))


def _leases(d: Directory, workers: dict[str, list[str]]) -> tuple[LocalLeases, _Owners]:
    everyone = [w for ws in workers.values() for w in ws]
    members = SimpleNamespace(live=lambda: workers, node_of={w: n for n, ws in workers.items() for w in ws})
    owners = _Owners(everyone)
    return LocalLeases(d, BlockMoves(), owners, members), owners


def test_chunks_in_columns_are_published_a_block_at_a_time_and_recalled_from_a_closing_worker():
    d, columns = _sealed()
    local, owners = _leases(d, {"node0": ["w0", "w1"], "node1": ["w2"]})
    local.publish_columns(columns)
    told = {w: sorted(e["name"] for e in msg["entries"]) for w, msg in owners.sent}
    on_a, on_b = [chunk_name(DATASET, f) for f in (0, 3)], [chunk_name(DATASET, f) for f in (2, 5)]
    assert told == {"w0": on_a, "w1": on_a, "w2": on_b} and _materialised(d) == set()
    owners.sent.clear()
    local.publish_node("node0")  # nobody new: nothing sent
    assert owners.sent == []

    async def close_w1() -> None:
        closing = asyncio.ensure_future(local.recall_worker("w1"))
        await asyncio.sleep(0)
        ((worker, msg),) = owners.sent
        assert worker == "w1" and sorted(msg["var_ids"]) == [columns.first_id, columns.first_id + 2]
        assert columns.told[columns.shm_ids.index("a")] == {"w0"}  # untold before its answer
        local.recalled(msg["token"], [(columns.first_id + 2, 1)], worker="w1")  # it holds chunk 3's view
        await closing

    asyncio.run(close_w1())
    var = d.by_id.known(columns.first_id + 2)
    assert var is not None and dict(var.leases) == {"w1": 1} and d.published[var.var_id] == {"w0"}
    assert _materialised(d) == {chunk_name(DATASET, 3)}  # the one it held, now leased here
    local.forget("w2")
    assert columns.told[columns.shm_ids.index("b")] == frozenset()
    assert d.lookup(chunk_name(DATASET, 5)).var_id not in d.published
