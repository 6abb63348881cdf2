"""Chunked datasets on the session's cluster: slicing against numpy, writers in tasks at
once (disjoint and overlapping), to_dask / from_dask, h5py's File habits, bad input, and
a writer process killed before the seal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import cloudpickle
import dask.array as da
import numpy as np
import pytest
from distributed import get_worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datafabric import errors
from datafabric.datasets.grid import auto_chunks
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def arrays_and_chunks(draw):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    return shape, chunks


@st.composite
def selections(draw, shape):
    key = []
    for n in shape:
        kind = draw(st.sampled_from(["int", "slice", "all"]))
        if kind == "int":
            key.append(draw(st.integers(-n, n - 1)))
        elif kind == "slice":
            bound = st.none() | st.integers(-n - 2, n + 2)
            step = draw(st.none() | st.integers(-4, 4).filter(bool))
            key.append(slice(draw(bound), draw(bound), step))
        else:
            key.append(slice(None))
    if draw(st.booleans()) and len(key) > 1:
        key = [Ellipsis, *key[1:]] if draw(st.booleans()) else [*key[:-1], Ellipsis]
    return tuple(key)


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


@SETTINGS
@given(data=st.data())
def test_reads_match_numpy(fabric, data):
    shape, chunks = data.draw(arrays_and_chunks())
    a = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    ds = fabric.create_dataset("h/read", data=a, chunks=chunks)
    try:
        for _ in range(5):
            key = data.draw(selections(shape))
            np.testing.assert_array_equal(ds[key], a[key])
            short = key[: data.draw(st.integers(0, len(key)))]  # the dimensions not given are whole
            try:  # cut after an Ellipsis, the ints that follow it index the last axes instead
                expected = a[short]
            except IndexError:
                with pytest.raises(IndexError):
                    ds[short]
            else:
                np.testing.assert_array_equal(ds[short], expected)
            np.testing.assert_array_equal(ds[key[0]], a[key[0]])  # one item, not in a tuple
        np.testing.assert_array_equal(ds[()], a[()])
    finally:
        fabric.delete("h/read")


@SETTINGS
@given(data=st.data())
def test_partial_writes_merge_like_numpy(fabric, data):
    shape, chunks = data.draw(arrays_and_chunks())
    expected = np.full(shape, -1.5)
    ds = fabric.create_dataset("h/write", shape, np.float64, chunks=chunks, fillvalue=-1.5)
    try:
        for i in range(3):
            key = data.draw(selections(shape))
            value = np.arange(expected[key].size, dtype=np.float64).reshape(expected[key].shape) + 100 * i
            ds[key] = value
            expected[key] = value
        ds.seal()
        np.testing.assert_array_equal(ds[...], expected)
    finally:
        fabric.delete("h/write")


def test_a_read_inside_one_chunk_is_a_zero_copy_view_and_unwritten_chunks_take_no_memory(fabric):
    before = used(fabric)
    with fabric.create_dataset("sparse", (100, 100), np.float32, chunks=(50, 50), fillvalue=2.0) as ds:
        ds[10:20, 60:70] = 1.0
    assert used(fabric) - before < 50 * 50 * 4 + 2 * 4096  # one chunk's memory, and its header
    view = ds[12:18, 61:65]
    assert not view.flags.owndata and not view.flags.writeable
    np.testing.assert_array_equal(view, 1.0)
    np.testing.assert_array_equal(ds[0:50, 0:50], 2.0)  # a chunk never written: the fill value
    assert ds.chunk((0, 0)).strides == (0, 0)
    assert ds.chunk((0, 1)).base is not None and ds.chunk_name(1) is not None and ds.chunk_name(0) is None
    whole = ds[...]
    assert whole.flags.owndata and whole.sum() == 2.0 * (100 * 100 - 100) + 100
    np.testing.assert_array_equal(ds.to_dask().compute(), whole)  # the chunks never written: the fill value
    assert ds.to_dask()[:50, :50].sum().compute() == 2.0 * 50 * 50
    del view  # its lease holds the chunk's memory
    fabric.delete("sparse")
    wait_for(lambda: used(fabric) == before, "the dataset's chunk to be freed")


def write_rows(ds, start, stop, value):
    ds[start:stop] = value
    return get_worker().address


def test_disjoint_writers_in_tasks_at_once(client, fabric):
    before = used(fabric)
    ds = fabric.create_dataset("many", (64, 300), np.int64, chunks=(10, 128))
    futures = [client.submit(write_rows, ds, i, i + 4, i, pure=False) for i in range(0, 64, 4)]
    assert len(set(client.gather(futures))) == 2  # both workers wrote
    ds.seal()
    expected = np.repeat(np.arange(0, 64, 4), 4)[:, None] * np.ones(300, np.int64)
    np.testing.assert_array_equal(ds[...], expected)
    assert client.submit(lambda d: int(d[...].sum()), ds).result() == expected.sum()
    fabric.delete("many")
    wait_for(lambda: used(fabric) == before, "the chunks to be freed")


def test_overlapping_writers_leave_one_writers_value_per_element(client, fabric):
    ds = fabric.create_dataset("overlap", (40, 1000), np.float64, chunks=(16, 256))
    futures = [client.submit(write_rows, ds, i, 40 - i, float(i + 1), pure=False) for i in range(8)]
    client.gather(futures)
    ds.seal()
    got = ds[...]
    for i in range(8):  # the rows only writers 0..i touched hold one of their values
        rows = got[i]
        assert set(np.unique(rows)) <= {float(k + 1) for k in range(i + 1)}
    assert set(np.unique(got)) <= {float(k + 1) for k in range(8)}
    fabric.delete("overlap")


def test_to_dask_and_from_dask_round_trip(client, fabric):
    a = np.random.default_rng(0).random((200, 150))
    ds = fabric.create_dataset("rt/a", data=a, chunks=(64, 64))
    x = ds.to_dask()
    assert x.chunks == da.from_array(a, chunks=(64, 64)).chunks
    np.testing.assert_allclose(x.sum().compute(), a.sum())
    np.testing.assert_array_equal(x[10:100:3, 5].compute(), a[10:100:3, 5])
    y = fabric.from_dask("rt/b", (x + 1).T, doc="transposed", attrs={"unit": "K"})
    assert y.sealed and y.chunks == (64, 64) and y.attrs == {"unit": "K"} and y.doc == "transposed"
    np.testing.assert_array_equal(y[...], (a + 1).T)
    irregular = da.from_array(a, chunks=((50, 150), (100, 50)))
    z = fabric.from_dask("rt/c", irregular)
    assert z.chunks == (150, 100)
    np.testing.assert_array_equal(z[...], a)
    empty = fabric.create_dataset("rt/empty", (0, 4), np.int16, chunks=(2, 4)).seal()  # no chunk at all
    assert empty.to_dask().chunks == da.zeros((0, 4), chunks=(2, 4)).chunks
    assert empty.to_dask().compute().shape == (0, 4)
    for name in ("rt/a", "rt/b", "rt/c", "rt/empty"):
        fabric.delete(name)


def test_the_fabric_has_h5py_file_habits(fabric):
    fabric.insert("habits/var", "", np.float64, np.ones(3))
    fabric.create_dataset("habits/ds", data=np.arange(6).reshape(2, 3), doc="six")
    with fabric.create_dataset("habits/unsealed", (4,), np.int8):
        assert "habits/unsealed" not in fabric and "habits/unsealed" not in list(fabric)
    assert "habits/ds" in fabric and "habits/var" in fabric and "nothing" not in fabric
    assert sorted(fabric) == ["habits/ds", "habits/unsealed", "habits/var"] and len(fabric) == 3
    assert fabric.datasets("habits/") == ["habits/ds", "habits/unsealed"]
    ds = fabric["habits/ds"]
    assert ds.shape == (2, 3) and ds.ndim == 2 and ds.size == 6 and len(ds) == 2 and ds.nbytes == 48
    np.testing.assert_array_equal(fabric["habits/var"], np.ones(3))
    info = fabric.info("habits/ds")
    assert info["type"] == "2 * 3 * int64" and info["doc"] == "six" and info["dataset"]["written"] == 1
    for name in list(fabric):
        del fabric[name]
    assert len(fabric) == 0


def test_bad_input_is_refused_clearly(fabric):
    ds = fabric.create_dataset("bad", (5, 5), np.int32, chunks=2)
    with pytest.raises(errors.DatasetWritingError, match="still being written"):
        ds[0]
    with pytest.raises(errors.InvalidSelectionError, match="out of range"):
        ds[5, 0] = 1
    with pytest.raises(errors.InvalidSelectionError):
        ds[[1, 2]] = 1
    with pytest.raises(errors.InvalidArgumentError, match="do not fit"):
        ds[0:2] = np.ones(3)
    with pytest.raises(errors.NameExistsError):
        fabric.create_dataset("bad", (1,), np.int8)
    with pytest.raises(errors.NameExistsError):
        fabric.insert("bad", "", np.int8, np.ones(1, np.int8))
    with pytest.raises(errors.InvalidNameError, match="the fabric's own"):
        fabric.insert(".dfab/1/0", "", np.int8, np.ones(1, np.int8))
    with pytest.raises(errors.InvalidArgumentError):
        fabric.create_dataset("bad2", (5,), np.int8, chunks=(0,))
    with pytest.raises(errors.InvalidArgumentError):
        fabric.create_dataset("bad2", (5,), np.int8, fillvalue=300)
    with pytest.raises(errors.InvalidArgumentError, match="attrs"):
        fabric.create_dataset("bad2", (5,), np.int8, attrs={"when": object()})
    with pytest.raises(errors.InvalidTypeError):
        fabric.create_dataset("bad2", (5,), np.dtype((np.int8, 3)))
    assert "bad2" not in fabric
    ds.seal()
    with pytest.raises(errors.DatasetSealedError, match="read-only"):
        ds[0, 0] = 1
    with pytest.raises(errors.InvalidSelectionError):
        ds[0, 0, 0]
    fabric.delete("bad")
    with pytest.raises(errors.NameNotFoundError):
        fabric.dataset("bad")


def test_auto_chunks_hold_about_16_mib():
    chunks = auto_chunks((4096, 4096, 64), 8)
    assert 8 * 2**20 < np.prod(chunks) * 8 <= 16 * 2**20


WRITER = """
import sys, time, numpy as np
from distributed import Client
import datafabric
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
ds = fabric.create_dataset("killed", (1000, 1000), np.float64, chunks=(250, 1000))
ds[0:600] = 1.0
print("written", flush=True)
time.sleep(600)
"""


def test_a_writer_killed_before_the_seal_leaves_nothing(client, fabric, tmp_path):
    before = used(fabric)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    proc = subprocess.Popen([sys.executable, str(script), client.scheduler.address], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        assert used(fabric) > before  # three chunks' homes
        assert "killed" not in fabric  # never visible unsealed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: used(fabric) == before, "the killed writer's chunks to be freed", timeout=90)
        with pytest.raises(errors.NameNotFoundError):
            fabric.dataset("killed")
    finally:
        proc.kill()
        proc.wait()


def write_until_sealed(ds, seed):
    """Writes random row blocks with its own value until the dataset refuses: then
    says how many writes landed."""
    rng = np.random.default_rng(seed)
    landed = 0
    while True:
        start = int(rng.integers(0, ds.shape[0] - 8))
        try:
            ds[start : start + 8] = float(seed)
        except errors.DatasetSealedError:
            return landed
        landed += 1


def test_no_write_lands_after_the_seal_while_writers_churn(client, fabric):
    """Writers in tasks keep writing while the client seals: the seal waits for the
    writes in flight and refuses the rest, so what a reader sees right after the seal
    never changes afterwards."""
    ds = fabric.create_dataset("churn", (96, 2000), np.float64, chunks=(16, 700), fillvalue=-1)
    futures = [client.submit(write_until_sealed, ds, seed, pure=False) for seed in range(1, 7)]
    wait_for(lambda: any(f.status != "pending" for f in futures) or ds_has_homes(fabric), "writers to start")
    ds.seal()
    first = ds[...].copy()
    landed = client.gather(futures)
    assert sum(landed) > 0
    again = ds[...]
    np.testing.assert_array_equal(again, first)
    assert set(np.unique(first)) <= {-1.0, *map(float, range(1, 7))}
    fabric.delete("churn")


def ds_has_homes(fabric) -> bool:
    return any(b["used"] for b in fabric.status())


def write_and_keep_a_ticket(ds):
    """Writes rows 0-3, then takes a write ticket it never ends: a writer stopped in the
    middle of a write."""
    ds[0:4] = 5.0
    ctx = ds._fabric._ctx()
    ctx.call("dataset_begin_write", name=ds.name, dataset_id=ds.id, flats=[0], node=ctx.node, holder=ctx.holder)


def test_a_seal_waits_for_a_write_in_flight_and_a_killed_writers_ticket_ends_with_it(client, fabric):
    a = sorted(client.scheduler_info()["workers"])[0]
    ds = fabric.create_dataset("ticket", (16, 16), np.float64, chunks=(8, 16), fillvalue=-1)
    client.submit(write_and_keep_a_ticket, ds, workers=[a], pure=False).result()
    sealing = threading.Thread(target=ds.seal)
    sealing.start()
    sealing.join(1.0)
    assert sealing.is_alive() and "ticket" not in fabric  # waiting for the write in flight
    os.kill(client.run(os.getpid, workers=[a])[a], signal.SIGKILL)
    sealing.join(60)
    assert not sealing.is_alive() and "ticket" in fabric
    wait_for(lambda: all(s["worker"] is not None for s in fabric.status()), "the dead writer's block to be adopted")
    expected = np.full((16, 16), -1.0)
    expected[0:4] = 5.0
    np.testing.assert_array_equal(fabric.dataset("ticket")[...], expected)
    fabric.delete("ticket")
    client.wait_for_workers(2)  # the nanny restarted the worker for the next tests
