"""Views that Dask and pickle carry as references: a few hundred bytes travel, the bytes
stay in shared memory, and the receiver reads the same pages (``tests/wire.py`` counts
what Dask's TCP comms write in every process)."""

from __future__ import annotations

import pickle
import sys

import cloudpickle
import dask
import numpy as np
import pytest
from dask.sizeof import sizeof
from distributed import get_worker, wait

import datafabric
from datafabric.errors import ReferenceGoneError
from datafabric.references import REFERENCE_SIZE, FabricView, pin_of, reference_of
from tests import wire
from tests.waiting import wait_for
from tests.wire import bytes_written

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(wire)

MiB = 2**20
BIG = 200 * MiB
WIRE_LIMIT = 256 * 1024  # everything every process wrote while a 200 MiB view moved


@pytest.fixture(scope="module")
def rfabric(client):
    fabric = datafabric.start(client, mb=2 * 230)
    try:
        fabric.insert("big", "200 MiB", np.float64, np.arange(BIG // 8, dtype=np.float64).reshape(-1, 1024))
        records = np.zeros(24, np.dtype([("a", "i4"), ("b", "f8")], align=True))
        fabric.insert("rec", "records", "6 * 4 * {a: int32, b: float64}", records)
        yield fabric
    finally:
        fabric.shutdown()


def _slices(view: np.ndarray) -> list[np.ndarray]:
    return [view, view[::3, 5:100:2], view.T, view[::-1, ::-7], view.reshape(-1, 2048), view[7], view[3:9].ravel()]


def test_a_slice_travels_as_its_reference_and_comes_back_the_same_view(rfabric):
    view = rfabric.get("big")
    for s in _slices(view):
        blob = pickle.dumps(s)
        assert len(blob) < 1024, f"{s.shape} pickled to {len(blob)} bytes"
        back = pickle.loads(blob)
        assert type(back) is FabricView and pin_of(back) is not None
        assert (back.shape, back.strides, back.dtype) == (s.shape, s.strides, s.dtype)
        assert back.__array_interface__["data"] == s.__array_interface__["data"]  # the same pages
        assert not back.flags.writeable
    records = rfabric.get("rec")
    field = pickle.loads(pickle.dumps(records["b"][1:, ::2]))
    assert field.dtype == np.float64 and field.strides == records["b"][1:, ::2].strides


def test_what_is_not_fabric_memory_pickles_and_sizes_as_a_plain_array(rfabric):
    view = rfabric.get("big")
    assert sizeof(view) == sizeof(view[::2]) == REFERENCE_SIZE
    for private in (view[:4] + 1, view[:4].copy(), view[[1, 2]], np.sqrt(view[:2])):
        assert reference_of(private) is None
        assert sizeof(private) == private.nbytes
        back = pickle.loads(pickle.dumps(private))
        assert type(back) is np.ndarray and np.array_equal(back, private)
    assert type(view[:4] + 1) is np.ndarray
    assert type(view.sum()) is np.float64 and type(view.sum(axis=0)) is np.ndarray


def use(x):
    """In a task: is ``x`` fabric memory (zero-copy), and its checksum."""
    return {"type": type(x).__name__, "zero_copy": pin_of(x) is not None, "sum": float(x.sum())}


def produce(fabric):
    return fabric.get("big")[1:]


def test_a_200_mib_view_passed_returned_scattered_and_moved_costs_kilobytes_on_the_wire(client, rfabric):
    a, b = sorted(client.scheduler_info()["workers"])
    view = rfabric.get("big")
    expected = float(view.sum())
    tail = float(view[1:].sum())

    def measured(step):
        before = bytes_written(client)
        out = step()
        spent = bytes_written(client) - before
        assert spent < WIRE_LIMIT, f"{spent} bytes were written"
        return out

    passed = measured(lambda: client.submit(use, view, workers=[b], pure=False).result())
    assert passed == {"type": "FabricView", "zero_copy": True, "sum": expected}

    returned = measured(lambda: client.submit(produce, rfabric, workers=[a], pure=False).result())
    assert type(returned) is FabricView and pin_of(returned) is not None and float(returned.sum()) == tail

    scattered = measured(lambda: client.scatter(view, workers=[a]))
    assert client.submit(use, scattered, workers=[a]).result()["zero_copy"]

    on_a = client.submit(produce, rfabric, workers=[a], pure=False)
    on_a.result()
    moved = measured(lambda: client.submit(use, on_a, workers=[b]).result())  # a transfer from a to b
    assert moved == {"type": "FabricView", "zero_copy": True, "sum": tail}
    logged = client.run(lambda dask_worker: [e["who"] for e in dask_worker.transfer_incoming_log], workers=[b])
    assert a in logged[b]


def _leases(name: str, dask_scheduler=None) -> dict[str, int]:
    from datafabric.protocol import SCHEDULER_PLUGIN

    return dict(dask_scheduler.plugins[SCHEDULER_PLUGIN].directory.variables[name].leases)


def test_a_task_argument_is_carried_by_the_scheduler_as_a_reference_holding_no_lease(client, rfabric):
    """The scheduler only passes a task's arguments on, and Dask keeps its messages long
    after their tasks are forgotten: a view there would hold its lease as long.  So the
    scheduler, here in the client's own process and able to map the blocks, keeps the
    reference; the worker reads the client's pages, also once the name is deleted while
    the client's view lives, and the memory returns as soon as that view is dropped."""
    _, b = sorted(client.scheduler_info()["workers"])
    before = rfabric.status()
    rfabric.insert("arg", "an argument", np.float64, np.arange(4096, dtype=np.float64))
    view = rfabric.get("arg")
    leases = client.run_on_scheduler(_leases, "arg")
    assert list(leases.values()) == [1]  # the client's own view's
    task = client.submit(use, view, workers=[b], pure=False)
    assert task.result() == {"type": "FabricView", "zero_copy": True, "sum": float(np.arange(4096).sum())}
    del task  # the worker lets its task's argument go once the task is forgotten
    wait_for(lambda: client.run_on_scheduler(_leases, "arg") == leases, "the client's lease alone")
    rfabric.delete("arg")
    assert client.submit(use, view[1:], workers=[b], pure=False).result()["sum"] == float(np.arange(1, 4096).sum())
    del view
    wait_for(lambda: rfabric.status() == before, "the deleted argument's memory back")


def test_a_persisted_fabric_backed_dask_array(client, rfabric):
    import dask.array as da

    rows = 200 * MiB // 8 // 1024
    chunk = rows // 8
    parts = [dask.delayed(lambda f, i: f.get("big")[i * chunk : (i + 1) * chunk])(rfabric, i) for i in range(8)]
    array = da.concatenate([da.from_delayed(p, (chunk, 1024), np.float64) for p in parts]).persist()
    managed = client.run(lambda dask_worker: dask_worker.data.fast.total_weight)
    assert sum(managed.values()) <= 8 * REFERENCE_SIZE  # Dask holds references, not 200 MiB
    assert float(array.sum().compute()) == float(rfabric.get("big")[: 8 * chunk].sum())
    kinds = client.run(lambda dask_worker: {type(v).__name__ for v in dask_worker.data.values()})
    assert set().union(*kinds.values()) <= {"FabricView"}
    del array


def spill_everything(dask_worker):
    """Every result held in memory goes to disk, as Dask's spilling would write it."""
    for _ in range(len(dask_worker.data.fast)):
        assert dask_worker.data.evict() >= 0, "a result could not be spilled"
    return dask_worker.data.spilled_total.disk


def test_a_spilled_view_writes_its_reference_and_reads_back_zero_copy(client, rfabric):
    a = sorted(client.scheduler_info()["workers"])[0]
    held = client.submit(lambda f: f.get("big")[2:], rfabric, workers=[a], pure=False)
    held.result()
    before = client.run(lambda dask_worker: dask_worker.data.spilled_total.disk, workers=[a])[a]
    on_disk = client.run(spill_everything, workers=[a])[a] - before
    assert 0 < on_disk < 4096  # the reference, for a 200 MiB view
    assert client.submit(use, held, workers=[a]).result()["zero_copy"]


def test_a_reference_to_a_variable_deleted_while_spilled(client, rfabric):
    a = sorted(client.scheduler_info()["workers"])[0]
    rfabric.insert("gone", "", np.float64, np.ones(1000))
    held = client.submit(lambda f: f.get("gone")[10:], rfabric, workers=[a], pure=False)
    held.result()
    kept = client.submit(lambda f: f.get("gone")[10:], rfabric, workers=[a], pure=False)
    kept.result()
    view = rfabric.get("gone")  # the client's view keeps the memory after the delete...
    client.run(spill_everything, workers=[a])
    used = sum(row["used"] for row in rfabric.status())
    rfabric.delete("gone")
    assert client.submit(use, kept, workers=[a]).result() == {"type": "FabricView", "zero_copy": True, "sum": 990.0}
    del view, kept  # ...until it goes: the spilled reference holds nothing, so the memory is freed
    wait_for(lambda: sum(row["used"] for row in rfabric.status()) < used, "the deleted variable's memory to be freed")
    with pytest.raises(ReferenceGoneError, match="deleted"):
        client.submit(use, held, workers=[a]).result()


def test_memory_says_which_pages_are_the_fabrics(client, rfabric):
    a, b = sorted(client.scheduler_info()["workers"])
    touching = client.submit(touched, rfabric, workers=[b], pure=False)
    assert touching.result() > 0
    rows = {row["worker"]: row for row in rfabric.memory()}
    assert set(rows) == {a, b}
    assert all(row["fabric_mapped"] >= BIG for row in rows.values())  # each maps its own block, pre-faulted
    # a block that no other process touched is private to its owner: in its USS, not in its own memory
    assert max(row["uss"] - row["private"] for row in rows.values()) >= BIG
    assert rows[b]["fabric_mapped"] >= 64 * MiB  # the slice b's task read, and keeps
    for row in rows.values():
        assert 0 < row["private"] < row["rss"] and row["fabric_pss"] <= row["fabric_mapped"]
    client.run(lambda dask_worker: delattr(dask_worker, "fabric_test_keep"), workers=[b])


def touched(fabric):
    view = fabric.get("big")[: 64 * MiB // 8 // 1024]
    view.sum()
    get_worker().fabric_test_keep = view  # keeps its pages mapped for the check
    return view.nbytes


def filled(fabric, name):
    view = fabric.get(name)
    return view[1:-1]


def checks(view, value):
    """In a task on the other worker: every byte of the slice is what was written."""
    return bool((view == value).all()) and pin_of(view) is not None


def test_references_moved_while_their_variables_are_deleted_and_blocks_compacted(client, rfabric):
    """The sender's result holds a lease until the receiver has its own: a delete and a
    compaction racing every transfer never free or move the bytes under a reader."""
    a, b = sorted(client.scheduler_info()["workers"])
    results = []
    for i in range(24):
        name = f"churn/{i}"
        rfabric.insert(name, "", np.float64, np.full(128 * 1024, float(i)))
        produced = client.submit(filled, rfabric, name, workers=[a], pure=False)
        wait([produced])  # a holds the view as its result
        checked = client.submit(checks, produced, float(i), workers=[b], pure=False)
        rfabric.delete(name)  # while its reference is on its way to b
        if i % 4 == 0:
            rfabric.defragment()
        results.append(checked)
        del produced
    assert client.gather(results) == [True] * 24
