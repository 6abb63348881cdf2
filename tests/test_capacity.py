"""Capacity: on 4 workers with ``mb=2048``, a variable of 1.5 GiB fits, inserted from the
client and from a task on a worker that does not own the node's large block; the largest
free piece ``status()`` reports is exactly what an insert can take; and the allocate an
``OutOfSpaceError`` advises makes room for the variable it refused."""

from __future__ import annotations

import re

import numpy as np
import pytest
from distributed import Client

import datafabric
from datafabric import errors, layout
from tests.conftest import local_cluster

GiB = 1 << 30
BIG = 3 * GiB // 2


@pytest.fixture(scope="module")
def client4():
    with local_cluster(n_workers=4) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def fabric4(client4):
    fabric = datafabric.start(client4, mb=2048)
    yield fabric
    fabric.shutdown()


@pytest.fixture(scope="module")
def big_array():
    return np.arange(BIG // 4, dtype=np.float32)


def large_block(fabric) -> dict:
    return max(fabric.status(), key=lambda r: r["largest_free"])


def insert_in_task(fabric, name: str) -> list:
    return fabric.insert(name, "1.5 GiB from a task", np.float32, np.arange(BIG // 4, dtype=np.float32))


def test_a_variable_of_three_quarters_of_the_fabric_inserts_from_the_client(fabric4, big_array):
    assert len(fabric4.status()) == 4  # still a block per worker, for inserts with no round trip
    large = large_block(fabric4)["shm_id"]
    [(_, shm_id, _)] = fabric4.insert("big/client", "1.5 GiB", np.float32, big_array)
    assert shm_id == large
    assert np.array_equal(fabric4.get("big/client"), big_array)
    fabric4.delete("big/client")
    assert sum(r["free"] for r in fabric4.status()) == sum(r["capacity"] for r in fabric4.status())


def test_a_variable_of_three_quarters_of_the_fabric_inserts_from_a_task_off_the_large_block(
    client4, fabric4, big_array
):
    owner = large_block(fabric4)["worker"]
    other = next(w for w in sorted(client4.scheduler_info()["workers"]) if w != owner)
    [(_, shm_id, _)] = client4.submit(insert_in_task, fabric4, "big/task", workers=[other], pure=False).result()
    assert shm_id == next(r["shm_id"] for r in fabric4.status() if r["worker"] == owner)
    assert np.array_equal(fabric4.get("big/task"), big_array)
    fabric4.delete("big/task")


def test_the_largest_free_piece_is_exactly_what_an_insert_can_take(fabric4):
    largest = large_block(fabric4)["largest_free"]
    fits = largest - layout.data_offset_for(layout.BLOCK_HEADER_SIZE, "edge", f"{largest} * uint8", "", largest)
    with pytest.raises(errors.OutOfSpaceError):
        fabric4.insert("edge", "", np.uint8, np.zeros(fits + 1, np.uint8))
    fabric4.insert("edge", "", np.uint8, np.zeros(fits, np.uint8))
    assert large_block(fabric4)["largest_free"] < largest // 4  # the others' blocks are left
    fabric4.delete("edge")
    assert large_block(fabric4)["largest_free"] == largest


def test_the_allocate_an_out_of_space_error_advises_makes_room(fabric4, big_array):
    fabric4.insert("big/first", "", np.float32, big_array)
    with pytest.raises(errors.OutOfSpaceError, match=r"fabric\.allocate\(\d+\)") as refused:
        fabric4.insert("big/second", "", np.float32, big_array)
    mb = int(re.search(r"fabric\.allocate\((\d+)\)", str(refused.value)).group(1))
    assert mb < 2 * 1536  # the memory the variable needs, not a multiple of it
    fabric4.allocate(mb)
    fabric4.insert("big/second", "", np.float32, big_array)
    assert np.array_equal(fabric4.get("big/second"), big_array)
    assert sum(r["size"] for r in fabric4.status()) <= (2048 + mb) * 2**20 + 8 * 4096  # what was named
