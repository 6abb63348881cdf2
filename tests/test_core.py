"""The core fabric on a real LocalCluster of worker processes and real shared memory."""

from __future__ import annotations

import ctypes
import mmap
import pickle
import sys

import cloudpickle
import numpy as np
import pytest
from distributed import get_worker
from ndtypes import ndt

import datafabric
from datafabric import errors
from datafabric.shm import Segment
from tests.conftest import fabric_segments
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def workers(client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def insert_in_task(fabric, name, doc, tp, data):
    return fabric.insert(name, doc, tp, data)


def poke(shm_id: str, offset: int, value: float) -> None:
    """Write through a mapping of our own, not the fabric's: proves views share memory."""
    seg = Segment.attach(shm_id)
    np.frombuffer(seg.buf, np.float64, count=1, offset=offset)[0] = value
    seg.close()


def root_base(arr):
    """The object at the end of a view's base chain: what keeps its memory alive."""
    while isinstance(arr, np.ndarray):
        arr = arr.base
    return arr


def test_insert_in_task_on_a_read_zero_copy_on_b_and_in_client(client, fabric):
    a, b = workers(client)
    data = np.arange(800, dtype=np.float64).reshape(40, 20)
    locations = client.submit(
        insert_in_task, fabric, "temps", "test data", "40 * 20 * float64", data, workers=[a]
    ).result()
    [(node, shm_id, offset)] = locations
    assert node == "127.0.0.1" and offset % 64 == 0
    assert fabric.get_list() == ["temps"]
    assert fabric.get_locations("temps") == locations

    held = client.submit(fabric.get, "temps", workers=[b], pure=False)  # B keeps the view alive
    assert client.submit(lambda v: v.sum(), held, workers=[b]).result() == data.sum()
    assert client.submit(lambda v: (v.shape, str(v.dtype), v.flags.writeable), held, workers=[b]).result() == (
        (40, 20),
        "float64",
        False,
    )
    mine = fabric.get("temps")
    np.testing.assert_array_equal(mine, data)

    poke(shm_id, offset, -1.0)
    assert client.submit(lambda v: v[0, 0], held, workers=[b]).result() == -1.0
    assert mine[0, 0] == -1.0
    assert type(root_base(mine)).__name__ == "_Pin" and root_base(mine[1:3, ::2].T) is root_base(mine)
    with pytest.raises(ValueError):
        mine.flags.writeable = True


def test_delete_while_viewed_keeps_old_bytes_until_the_view_dies(client, fabric):
    a, b = workers(client)
    old = np.full(100_000, 7.0)
    [(_, shm_id, old_offset)] = client.submit(insert_in_task, fabric, "v", "", np.float64, old, workers=[a]).result()
    held = client.submit(fabric.get, "v", workers=[b], pure=False)
    held.result()

    fabric.delete("v")
    assert "v" not in fabric.get_list()
    with pytest.raises(errors.NameNotFoundError):
        fabric.get("v")
    [(_, _, new_offset)] = client.submit(
        insert_in_task, fabric, "w", "", np.float64, np.full(100_000, 9.0), workers=[a]
    ).result()
    assert new_offset != old_offset  # the held memory was not reused
    assert client.submit(lambda v: float(v.min()), held, workers=[b]).result() == 7.0

    del held  # the last view goes: the lease ends and the space comes back

    def reused() -> bool:  # same name length and size as "v": the same extent fits
        [(_, _, off)] = client.submit(
            insert_in_task, fabric, "u", "", np.float64, np.full(100_000, 1.0), workers=[a], pure=False
        ).result()
        fabric.delete("u")
        return off == old_offset

    wait_for(reused)


def test_second_get_in_a_process_costs_no_rpc(client, fabric):
    fabric.insert("small", "", np.int32, np.arange(10, dtype=np.int32))

    def count_rpcs(fabric):
        worker = get_worker()
        calls = []
        real = worker.scheduler.datafabric_acquire
        v1 = fabric.get("small")
        worker.scheduler.datafabric_acquire = lambda **kw: calls.append(kw) or real(**kw)
        try:
            v2 = fabric.get("small")
            v3 = fabric.get("small")[2:5]
        finally:
            del worker.scheduler.datafabric_acquire
        return len(calls), root_base(v1) is root_base(v2) is root_base(v3), v3.tolist()

    assert client.submit(count_rpcs, fabric, pure=False).result() == (0, True, [2, 3, 4])


def test_insert_forms_of_buffer(client, fabric, tmp_path):
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    fabric.insert("from/ndarray", "", "3 * 4 * int16", arr)
    fabric.insert("from/bytes", "", "3 * 4 * int16", arr.tobytes())
    fabric.insert("from/memoryview", "", ndt("3 * 4 * int16"), memoryview(arr))
    fabric.insert("from/strided", "", np.int16, np.asfortranarray(arr)[:, ::2])
    path = tmp_path / "raw.bin"
    path.write_bytes(arr.tobytes())
    with open(path, "rb") as f:
        fabric.insert("from/file", "", "3 * 4 * int16", f)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        fabric.insert("from/mmap", "", "3 * 4 * int16", m)
    with open(path, "rb") as f:
        fabric.insert("from/file-dtype", "", np.int16, f)

    for name in ("from/ndarray", "from/bytes", "from/memoryview", "from/file", "from/mmap"):
        np.testing.assert_array_equal(fabric.get(name), arr)
    np.testing.assert_array_equal(fabric.get("from/strided"), arr[:, ::2])
    np.testing.assert_array_equal(fabric.get("from/file-dtype"), arr.ravel())
    assert fabric.get_list(prefix="from/") == sorted(
        ["from/ndarray", "from/bytes", "from/memoryview", "from/strided", "from/file", "from/mmap", "from/file-dtype"]
    )


def test_forms_of_type_and_records(client, fabric):
    rec = np.zeros(3, dtype=np.dtype([("a", "i1"), ("b", "f4", (4,))], align=True))
    rec["a"] = [1, 2, 3]
    rec["b"] = np.arange(12).reshape(3, 4)
    fabric.insert("rec", "records", "3 * {a: int8, b: 4 * float32}", rec)
    got = fabric.get("rec")
    assert got.shape == (3,) and got.dtype.names == ("a", "b")
    np.testing.assert_array_equal(got["b"], rec["b"])
    point = np.zeros((), dtype=np.dtype([("x", "i4"), ("y", "f8")], align=True))
    point["y"] = 2.5
    fabric.insert("point", "", "{x: int32, y: float64}", point.tobytes())
    assert fabric.get("point")["y"] == 2.5
    fabric.insert("by-dtype", "", np.dtype("complex128"), np.ones((2, 3), complex))
    assert fabric.info("by-dtype") == {
        "name": "by-dtype",
        "doc": "",
        "type": "2 * 3 * complex128",
        "nbytes": 96,
        "locations": fabric.get_locations("by-dtype"),
    }
    assert fabric.info("rec")["type"] == str(ndt("3 * {a: int8, b: 4 * float32}"))


def test_get_ptr_gives_type_and_address_and_holds_memory(client, fabric):
    data = np.linspace(0, 1, 50)
    [(node, shm_id, offset)] = fabric.insert("lin", "", "50 * float64", data)
    with fabric.get_ptr(node, shm_id, offset) as ptr:
        tp, address = ptr
        assert str(tp) == "50 * float64" and isinstance(address, ctypes.c_void_p)
        values = (ctypes.c_double * 50).from_address(address.value)
        np.testing.assert_array_equal(np.ctypeslib.as_array(values), data)
        fabric.delete("lin")
        assert (ctypes.c_double * 50).from_address(address.value)[49] == 1.0  # still held
    assert ptr.closed


def test_errors_are_typed_and_leave_nothing_allocated(client, fabric):
    a, _ = workers(client)
    fabric.insert("exists", "", np.float64, np.ones(10))
    free_before = sum(b["free"] for b in fabric.status())

    with pytest.raises(errors.NameExistsError, match="write-once"):
        fabric.insert("exists", "", np.float64, np.zeros(10))
    with pytest.raises(errors.NameExistsError):
        client.submit(insert_in_task, fabric, "exists", "", np.float64, np.zeros(10), workers=[a]).result()
    np.testing.assert_array_equal(fabric.get("exists"), np.ones(10))
    with pytest.raises(KeyError):
        fabric.get("missing")
    with pytest.raises(errors.NameNotFoundError, match="get_list"):
        fabric.info("missing")
    with pytest.raises(errors.NameNotFoundError):
        fabric.delete("missing")
    with pytest.raises(errors.TypeMismatchError, match="80 bytes"):
        fabric.insert("bad", "", "11 * float64", np.ones(10))
    with pytest.raises(errors.TypeMismatchError, match="dtype"):
        fabric.insert("bad", "", np.int64, np.ones(10))
    with pytest.raises(errors.InvalidTypeError, match="abstract"):
        fabric.insert("bad", "", "N * float64", np.ones(10))
    with pytest.raises(errors.InvalidBufferError):
        fabric.insert("bad", "", "float64", 3.0)
    for bad in ["", "a\x00b", "tab\there", "x" * 256, 42]:
        with pytest.raises(errors.InvalidNameError):
            fabric.insert(bad, "", np.float64, np.ones(1))
    with pytest.raises(errors.OutOfSpaceError, match="127.0.0.1"):
        fabric.insert("huge", "", np.uint8, np.zeros(200 * 2**20, np.uint8))
    with pytest.raises(errors.OutOfSpaceError):
        client.submit(
            insert_in_task, fabric, "huge", "", np.uint8, np.zeros(200 * 2**20, np.uint8), workers=[a]
        ).result()
    [(node, shm_id, offset)] = fabric.get_locations("exists")
    with pytest.raises(errors.NotOnThisNodeError):
        client.submit(lambda f: f.get_ptr("10.255.0.1", shm_id, offset), fabric).result()
    with pytest.raises(errors.NotOnThisNodeError):
        fabric.get_ptr(node, shm_id, offset + 64)
    with pytest.raises(errors.InvalidArgumentError):
        fabric.allocate(-1)

    assert fabric.get_list() == ["exists"]
    assert sum(b["free"] for b in fabric.status()) == free_before
    assert all(b["reserved"] == 0 for b in fabric.status())
    for e in (errors.NameExistsError, errors.NameNotFoundError, errors.OutOfSpaceError, errors.NoFabricError):
        assert issubclass(e, errors.FabricError)


def test_allocate_spreads_over_workers_and_deallocate_refuses_live_blocks(client, fabric):
    blocks = fabric.allocate(32)
    assert len(blocks) == 2 and {node for node, _ in blocks} == {"127.0.0.1"}
    assert all(b[1] in fabric_segments() for b in blocks)
    node, shm_id = blocks[0]
    fabric.deallocate(node, shm_id)
    assert shm_id not in fabric_segments()
    with pytest.raises(errors.BlockNotFoundError):
        fabric.deallocate(node, shm_id)

    [(node, shm_id, _)] = fabric.insert("pinned", "", np.float64, np.ones(4))
    with pytest.raises(errors.BlockInUseError, match="pinned"):
        fabric.deallocate(node, shm_id)
    assert fabric.get("pinned").sum() == 4


def create_and_wait(fabric, go: str) -> list:
    """Hold a create() open, in this worker's own block, until the client says go."""
    from distributed import Event

    with fabric.create("pending", "", "1000 * float64") as out:
        out[:] = 7.0
        Event(go).wait(30)
    return [get_worker().address, out.sum()]


def test_deallocate_refuses_a_block_with_a_local_insert_in_flight(client, fabric):
    """A task's insert reserves in its worker's own block with no RPC, so only the owner
    knows of it: its refusal must reach the caller, and the insert completes."""
    from distributed import Event

    go = Event("go-pending")
    a = workers(client)[0]
    future = client.submit(create_and_wait, fabric, "go-pending", workers=[a], pure=False)
    wait_for(lambda: any(s["reserved"] for s in fabric.status()))
    [block] = [s for s in fabric.status() if s["reserved"]]
    assert block["worker"] == a
    with pytest.raises(errors.BlockInUseError, match="insert in progress"):
        fabric.deallocate(block["node"], block["shm_id"])
    assert block["shm_id"] in fabric_segments()
    go.set()
    assert future.result() == [a, 7000.0]
    np.testing.assert_array_equal(fabric.get("pending"), np.full(1000, 7.0))


def test_fabric_pickles_small_and_connect_finds_it(client, fabric):
    import datafabric

    assert len(pickle.dumps(fabric)) < 300
    again = datafabric.connect(client)
    assert again.fabric_id == fabric.fabric_id
    with pytest.raises(errors.FabricError, match="running"):
        datafabric.start(client, mb=1)


def test_shutdown_unlinks_every_block_and_later_calls_say_so(client):
    import datafabric

    fabric = datafabric.start(client, mb=16)
    ids = [shm for _, shm in fabric.allocate(8)]
    fabric.insert("x", "", np.float64, np.ones(3))
    view = fabric.get("x")
    fabric.shutdown()
    assert not set(ids) & set(fabric_segments())
    assert view.sum() == 3  # a view taken before shutdown keeps its pages
    with pytest.raises(errors.NoFabricError):
        fabric.get_list()
    with pytest.raises(errors.NoFabricError):
        datafabric.connect(client)


def test_a_stale_handle_cannot_shut_down_the_fabric_started_after_it(client):
    old = datafabric.start(client, mb=16)
    old.shutdown()
    new = datafabric.start(client, mb=16)
    try:
        old.shutdown()  # its fabric is over: nothing happens, to either
        new.insert("alive", "", np.float64, np.ones(3))
        assert new.get_list() == ["alive"]
    finally:
        new.shutdown()


def test_segments_are_private_to_the_user(client, fabric):
    import os
    import stat

    for name in fabric_segments():
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode)
        assert mode == 0o600, oct(mode)


def test_resource_tracker_does_not_unlink_blocks_of_exiting_readers(client, fabric):
    """A reader process that maps a block and exits must not take the block with it."""
    import subprocess

    [(node, shm_id, offset)] = fabric.insert("survivor", "", np.float64, np.arange(5.0))
    code = (
        "from datafabric.shm import Segment; import numpy as np; "
        f"s = Segment.attach({shm_id!r}); print(np.frombuffer(s.buf, np.float64, 5, {offset}).sum()); s.close()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10.0" and "resource_tracker" not in out.stderr
    assert shm_id in fabric_segments()
    np.testing.assert_array_equal(fabric.get("survivor"), np.arange(5.0))


def test_insert_many_seals_a_batch_with_one_rpc_all_or_nothing(client, fabric):
    a, _ = workers(client)

    def batch(fabric, names):
        worker = get_worker()
        calls = []
        real = worker.scheduler.datafabric_seal
        worker.scheduler.datafabric_seal = lambda **kw: calls.append(kw) or real(**kw)
        try:
            items = [(n, "", np.int64, np.full(128, i)) for i, n in enumerate(names)]
            return len(fabric.insert_many(items)), len(calls)
        finally:
            del worker.scheduler.datafabric_seal

    assert client.submit(batch, fabric, [f"b/{i}" for i in range(100)], workers=[a]).result() == (100, 1)
    assert len(fabric.get_list(prefix="b/")) == 100 and fabric.get("b/7")[0] == 7
    free = sum(b["free"] for b in fabric.status())
    with pytest.raises(errors.NameExistsError, match="b/3"):
        client.submit(batch, fabric, ["c/1", "b/3", "c/2"], workers=[a]).result()
    with pytest.raises(errors.NameExistsError):
        fabric.insert_many([("c/1", "", np.int8, b"x"), ("c/1", "", np.int8, b"y")])
    assert fabric.get_list(prefix="c/") == []
    assert sum(b["free"] for b in fabric.status()) == free
