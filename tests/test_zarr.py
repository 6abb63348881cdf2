"""zarr v3 over the fabric (``datafabric.zarr.FabricStore``) on the session's cluster:
zarr, dask and xarray read datasets exactly; ``zarr.create_array`` and ``to_zarr`` from
workers write them; a chunk is written once (racing writers, one wins whole); a chunk
buffer zarr holds keeps its memory after a delete; bad input refused, nothing changed."""

from __future__ import annotations

import json
import pickle
import sys

import cloudpickle
import dask.array as da
import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
xr = pytest.importorskip("xarray")

from zarr.core.buffer.cpu import Buffer  # noqa: E402

from datafabric import errors  # noqa: E402
from datafabric.zarr import FabricStore  # noqa: E402
from tests.test_examples import run_example  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def sparse_dataset(fabric, name, dtype=np.float64, attrs=None):
    """37 x 23 in 10 x 8 chunks (edge chunks clipped), chunk (0, 0) never written."""
    data = (np.arange(37 * 23) % 251).reshape(37, 23).astype(dtype)
    data[:10, :8] = 5
    with fabric.create_dataset(name, (37, 23), dtype, chunks=(10, 8), fillvalue=5, attrs=attrs) as ds:
        ds[:, 8:] = data[:, 8:]
        ds[10:, :8] = data[10:, :8]
    return ds, data


def test_zarr_dask_and_xarray_read_a_dataset_exactly(fabric):
    attrs = {"_ARRAY_DIMENSIONS": ["y", "x"], "units": "K"}
    ds, data = sparse_dataset(fabric, "run/temp", attrs=attrs)
    fabric.create_dataset("run/sub/flag", data=np.array([True, False, True]))
    store = FabricStore(fabric, prefix="run")
    z = zarr.open_array(store=store, path="temp", mode="r")
    assert z.shape == (37, 23) and z.chunks == (10, 8) and z.dtype == np.float64 and z.fill_value == 5
    np.testing.assert_array_equal(z[:], data)
    np.testing.assert_array_equal(z[33:, 20:], data[33:, 20:])  # an edge chunk, padded by the store
    assert dict(z.attrs) == {"units": "K"} and z.metadata.dimension_names == ("y", "x")
    assert store.get_sync("temp/c/0/0") is None and store.exists_sync("temp/c/0/1")  # never written: absent
    np.testing.assert_array_equal(da.from_zarr(store, component="temp").compute(), data)
    dset = xr.open_zarr(store)  # the group's zarr.json lists its datasets (consolidated)
    assert set(dset.data_vars) == {"temp"} and dset["temp"].dims == ("y", "x")
    assert dset["temp"].attrs == {"units": "K"}
    np.testing.assert_array_equal(dset["temp"].values, data)
    sub = xr.open_zarr(store, group="sub")
    assert sub["flag"].dims == ("flag_dim_0",) and sub["flag"].values.tolist() == [True, False, True]
    assert sorted(zarr.open_group(store=store, mode="r").keys()) == ["sub", "temp"]
    assert "temp/c/3/2" in set(zarr.core.sync.sync(_collect(store.list_prefix("temp/"))))
    fabric.delete("run/temp")
    fabric.delete("run/sub/flag")


async def _collect(iterator):
    return [key async for key in iterator]


@pytest.mark.parametrize("dtype", [">i4", "datetime64[s]", [("a", "<i4"), ("b", "<f8")], "complex64", "u1"])
def test_types_map_to_zarr_data_types(fabric, dtype):
    dtype = np.dtype(dtype)
    data = np.frombuffer(np.random.default_rng(1).bytes(7 * 5 * dtype.itemsize), dtype).reshape(7, 5)
    fabric.create_dataset("typed", data=data, chunks=(4, 4))  # edge chunks padded: random bytes, NaNs, NaTs
    z = zarr.open_array(store=FabricStore(fabric), path="typed", mode="r")
    assert z[:].tobytes() == data.astype(z.dtype).tobytes()  # bytes: NaN != NaN
    fabric.delete("typed")


def test_a_type_zarr_cannot_hold_is_refused_clearly(fabric):
    fabric.create_dataset("bigrec", data=np.zeros(3, [("a", ">i4")]))
    with pytest.raises(errors.InvalidTypeError, match="big-endian fields"):
        FabricStore(fabric).get_sync("bigrec/zarr.json")
    assert "bigrec" not in zarr.open_group(store=FabricStore(fabric), mode="r")  # not a member zarr could open
    fabric.delete("bigrec")


def test_create_array_with_chunk_aligned_writes_creates_a_dataset(fabric):
    values = np.arange(25 * 10, dtype=np.int32).reshape(25, 10)
    values[10:20] = 7  # the fill value: zarr deletes such a chunk instead of writing it
    with FabricStore(fabric) as store:
        z = zarr.create_array(
            store=store, name="made/w", shape=(25, 10), chunks=(10, 10), dtype="i4", fill_value=7,
            compressors=None, attributes={"k": 1}, dimension_names=["a", "b"],
        )  # fmt: skip
        z[0:10] = values[0:10]
        z[10:20] = values[10:20]
        z[20:25] = values[20:25]  # the edge chunk: zarr pads it, the store clips it
        assert "made/w" not in fabric.datasets()  # not visible before the seal
        with pytest.raises(errors.DatasetWritingError, match="chunk-aligned"):
            z[0:2]  # noqa: B018  (a read of a dataset still being written)
    ds = fabric.dataset("made/w")
    assert ds.sealed and ds.chunks == (10, 10) and ds.dtype == np.int32
    assert ds.attrs["k"] == 1 and list(ds.attrs["_ARRAY_DIMENSIONS"]) == ["a", "b"]  # lists travel as tuples
    np.testing.assert_array_equal(ds[...], values)
    back = zarr.open_array(store=FabricStore(fabric), path="made/w", mode="r")
    np.testing.assert_array_equal(back[:], values)
    assert back.metadata.dimension_names == ("a", "b") and dict(back.attrs) == {"k": 1}
    fabric.delete("made/w")


def test_an_overwrite_of_a_written_chunk_is_refused_and_changes_nothing(fabric):
    with FabricStore(fabric) as store:
        z = zarr.create_array(store=store, name="once", shape=(20,), chunks=(10,), dtype="f8", compressors=None)
        z[0:10] = 1.0
        with pytest.raises(errors.ChunkWrittenError, match="written already"):
            z[0:10] = 2.0
        with pytest.raises(errors.DatasetWritingError):
            z[12:15] = 3.0  # part of a chunk: zarr reads it first, which waits for the seal
        z[10:20] = 4.0
        with pytest.raises(errors.ChunkWrittenError):
            z[10:20] = 0.0  # all fill values: zarr deletes the chunk, which writes it
    np.testing.assert_array_equal(fabric.dataset("once")[...], [1.0] * 10 + [4.0] * 10)
    with pytest.raises(errors.DatasetSealedError):
        FabricStore(fabric).set_sync("once/c/0", Buffer.from_bytes(bytes(80)))
    with pytest.raises(errors.DatasetSealedError, match="read-only"):
        zarr.create_array(store=FabricStore(fabric), name="once", shape=(20,), dtype="f8", compressors=None,
                          overwrite=True)  # fmt: skip
    np.testing.assert_array_equal(fabric.dataset("once")[...], [1.0] * 10 + [4.0] * 10)
    fabric.delete("once")


def write_chunk_zero(fabric, value):
    store = FabricStore(fabric)
    buf = Buffer.from_array_like(np.full(4096, value, np.float64).view(np.uint8))
    try:
        store.set_sync("race/c/0", buf)
    except errors.ChunkWrittenError:
        return None
    return value


def test_racing_writers_of_one_chunk_exactly_one_writes_it_whole(client, fabric):
    for attempt in range(3):
        with FabricStore(fabric) as store:
            zarr.create_array(store=store, name="race", shape=(4096,), chunks=(4096,), dtype="f8", compressors=None)
            futures = [client.submit(write_chunk_zero, fabric, float(v), pure=False) for v in range(1, 9)]
            winners = [w for w in client.gather(futures) if w is not None]
        assert len(winners) == 1, f"attempt {attempt}: {winners} all wrote chunk 0"
        np.testing.assert_array_equal(fabric.dataset("race")[...], winners[0])  # one writer's bytes, whole
        fabric.delete("race")


def test_a_chunk_buffer_zarr_holds_keeps_its_bytes_after_a_delete_and_frees_after(fabric):
    before = used(fabric)
    data = np.arange(40 * 512, dtype=np.float64).reshape(40, 512)
    fabric.create_dataset("leased", data=data, chunks=(10, 512))  # 4 chunks of 40 KiB
    full = used(fabric)
    buf = FabricStore(fabric).get_sync("leased/c/2/0")
    assert not buf.as_numpy_array().flags.owndata  # zero-copy: a view of the chunk's view
    fabric.delete("leased")
    assert "leased" not in fabric.datasets()
    wait_for(lambda: used(fabric) < full - 2 * data.nbytes // 4, "the three chunks nobody holds to be freed")
    assert used(fabric) > before  # the held chunk's memory stays
    np.testing.assert_array_equal(buf.as_numpy_array().view(np.float64).reshape(10, 512), data[20:30])
    del buf
    wait_for(lambda: used(fabric) == before, "the held chunk to be freed")


def test_to_zarr_from_workers_then_close_seals(client, fabric):
    arr = da.random.default_rng(3).random((60, 50), chunks=(20, 25))
    expected = arr.compute()
    store = FabricStore(fabric, prefix="out/")
    assert len(pickle.dumps(store)) < 1000  # tasks get the fabric and prefix, not the store's caches
    arr.to_zarr(store, component="r", compressors=None)
    store.close()
    np.testing.assert_array_equal(fabric.dataset("out/r")[...], expected)
    fabric.delete("out/r")


def test_bad_input_is_refused_clearly_and_nothing_is_left(fabric):
    store = FabricStore(fabric)
    with pytest.raises(errors.InvalidArgumentError, match="compressors=None"):
        zarr.create_array(store=store, name="bad", shape=(10,), dtype="f8")  # zarr's default: zstd
    with pytest.raises(errors.InvalidArgumentError, match="filters=None"):
        zarr.create_array(store=store, name="bad", shape=(10,), dtype="i4", compressors=None,
                          filters=[zarr.codecs.TransposeCodec(order=(0,))])  # fmt: skip
    with pytest.raises(errors.InvalidArgumentError, match="shards=None"):
        zarr.create_array(store=store, name="bad", shape=(10,), chunks=(5,), shards=(10,), dtype="i4",
                          compressors=None)  # fmt: skip
    with pytest.raises(errors.InvalidArgumentError, match="chunk_key_encoding"):
        zarr.create_array(store=store, name="bad", shape=(10,), dtype="i4", compressors=None,
                          chunk_key_encoding={"name": "v2"})  # fmt: skip
    with pytest.raises(errors.InvalidArgumentError, match="no attributes"):
        zarr.create_group(store=store, path="grp", attributes={"a": 1})
    with pytest.raises(errors.NameNotFoundError):
        fabric.dataset("bad")  # nothing was created, not even unsealed
    with store:
        zarr.create_array(store=store, name="kept", shape=(10,), chunks=(5,), dtype="i4", compressors=None)
        doc = json.loads(store.get_sync("kept/zarr.json").to_bytes())
        store.set_sync("kept/zarr.json", Buffer.from_bytes(json.dumps(doc).encode()))  # the same: a no-op
        doc["shape"] = [12]
        with pytest.raises(errors.InvalidArgumentError, match="shape"):
            store.set_sync("kept/zarr.json", Buffer.from_bytes(json.dumps(doc).encode()))
    assert fabric.dataset("kept").shape == (10,) and fabric.dataset("kept").sealed
    with pytest.raises(RuntimeError), FabricStore(fabric) as failing:
        zarr.create_array(store=failing, name="aborted", shape=(10,), dtype="i4", compressors=None)
        raise RuntimeError("the writer failed")
    with pytest.raises(errors.NameNotFoundError):
        fabric.dataset("aborted")  # an exception in the with block aborts what the store created
    fabric.delete("kept")


def test_the_readme_example_runs_as_written():
    out = run_example("zarr_xarray.py", 300)
    assert "dims {'station': 4, 'day': 365} units K" in out.stdout
    assert "station means [280.0, 281.0, 282.0, 283.0]" in out.stdout
    assert "sealed True variables ['anomaly', 'day', 'temperature']" in out.stdout
    assert "exact True" in out.stdout
    assert "Traceback" not in out.stderr
