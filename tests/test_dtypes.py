"""numpy's dtypes as variables on a real cluster: big-endian, datetime64/timedelta64 with
their units, packed, aligned and explicitly laid out records, nested, with sub-arrays.
Each must come back from ``get``, in the client and in tasks, with the same dtype
(``==`` and ``.descr``) and the same bytes, and its type string must sit whole in the
extent header that a restarted scheduler reads back."""

from __future__ import annotations

import hashlib
import sys

import cloudpickle
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import datafabric
from datafabric import layout
from datafabric.errors import InvalidTypeError
from datafabric.shm import Segment
from datafabric.types import MAX_TYPE_BYTES, from_dtype
from tests.conftest import simulated_nodes
from tests.test_nodes import NODES, node_workers
from tests.test_type_properties import dtypes, shapes

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PACKED = np.dtype([("a", "i1"), ("b", "f4", (4,))])  # numpy's default: 17 bytes
NESTED = np.dtype([("id", ">u8"), ("t", "M8[ms]"), ("pos", [("x", ">f4"), ("y", "<f4")], (2,)), ("ok", "?")])
EXPLICIT = np.dtype({"names": ["a", "b", "c"], "formats": ["i1", ">i4", "f8"], "offsets": [0, 2, 8], "itemsize": 32})
DTYPES = [
    np.dtype(">f8"),
    np.dtype(">i4"),
    np.dtype(">c16"),
    np.dtype(">f2"),
    np.dtype("M8[ns]"),
    np.dtype(">M8[D]"),
    np.dtype("m8[s]"),
    np.dtype("m8[25us]"),
    np.dtype("M8"),
    PACKED,
    np.dtype([("a", "i1"), ("b", "f4", (4,))], align=True),
    NESTED,
    np.dtype([("n", "i1"), ("inner", NESTED), ("tail", "i2")], align=True),
    EXPLICIT,
    np.dtype([("e", EXPLICIT, (3,)), ("u", "U3"), ("s", "S5"), ("v", "V3")]),
    np.dtype("?"),
    np.dtype("U7"),
    np.dtype("S4"),
    np.dtype("V6"),
]


def sample(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Arbitrary bytes in that dtype, padding included: the fabric must keep every byte."""
    count = int(np.prod(shape))
    if dtype.itemsize == 0:  # np.frombuffer cannot count zero-byte items
        return np.empty(shape, dtype)
    return np.frombuffer(np.random.default_rng(seed).bytes(count * dtype.itemsize), dtype).reshape(shape)


def same(view: np.ndarray, data: np.ndarray) -> bool:
    return (view.shape, view.dtype, view.dtype.descr, view.tobytes()) == (
        data.shape,
        data.dtype,
        data.dtype.descr,
        data.tobytes(),
    )


def described(fabric, name, cache=True):
    """What a task sees, in plain values: pickle turns a non-native array (not a dtype)
    into a native one, so the test ships no arrays between processes."""
    view = fabric.get(name, cache=cache)
    return view.dtype, view.dtype.descr, view.shape, hashlib.sha256(view.tobytes()).hexdigest()


def insert_in_task(fabric, name, dtype, shape):
    return fabric.insert(name, "from a task", dtype, sample(dtype, shape))


def header_type(location) -> str:
    """The type string in the extent header of that copy, read from the block itself."""
    _, shm_id, offset = location
    segment = Segment.attach(shm_id)
    try:
        [extent] = [e for e in layout.walk(segment.buf) if e.data_offset == offset]
        return extent.type
    finally:
        segment.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_as_variables(client, fabric, dtype):
    a, b = sorted(client.scheduler_info()["workers"])
    data = sample(dtype, (5, 3))
    canonical = from_dtype(dtype, (5, 3)).datashape
    digest = hashlib.sha256(data.tobytes()).hexdigest()

    [location] = fabric.insert("client", "", dtype, data)  # a numpy dtype, shape from the array
    assert same(fabric.get("client"), data)
    assert fabric.info("client")["type"] == canonical == header_type(location)

    fabric.insert("datashape", "", canonical, data)  # the stored string, as a user could type it
    assert same(fabric.get("datashape"), data)

    client.submit(insert_in_task, fabric, "task", dtype, (5, 3), workers=[a]).result()
    for name in ("client", "task"):
        assert client.submit(described, fabric, name, workers=[b], pure=False).result() == (
            dtype,
            dtype.descr,
            (5, 3),
            digest,
        )
    assert same(fabric.get("task"), data)

    with fabric.create("created", "", canonical) as out:
        assert (out.dtype, out.dtype.descr, out.shape) == (dtype, dtype.descr, (5, 3))
        out.reshape(-1).view(np.uint8)[:] = data.reshape(-1).view(np.uint8)  # padding bytes too
    assert same(fabric.get("created"), data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=dtypes, shape=shapes)
def test_generated_dtypes_round_trip_or_are_refused_before_anything_is_stored(fabric, dtype, shape):
    data = sample(dtype, shape)
    name = f"v{len(fabric.get_list())}"
    try:
        fabric.insert(name, "", dtype, data)
    except InvalidTypeError as exc:
        assert "which no datashape record can lay out" in str(exc)
        assert name not in fabric.get_list()
        return
    assert same(fabric.get(name), data)


def wide_record(fields: int) -> np.dtype:
    return np.dtype([(f"field_with_a_long_name_{i:05}", ">f8") for i in range(fields)])


def test_a_long_type_string_sits_whole_in_the_header(fabric):
    dtype = wide_record(1500)
    text = from_dtype(dtype, (2,)).datashape
    assert 40_000 < len(text) <= MAX_TYPE_BYTES
    data = sample(dtype, (2,))
    [location] = fabric.insert("wide", "", dtype, data)
    assert header_type(location) == text == fabric.info("wide")["type"]
    assert same(fabric.get("wide"), data)


def test_a_type_string_too_long_is_refused_before_anything_is_stored(fabric):
    dtype = wide_record(2500)
    with pytest.raises(InvalidTypeError, match=f"over the {MAX_TYPE_BYTES} a type may take; use fewer or shorter"):
        fabric.insert("too-wide", "", dtype, sample(dtype, (2,)))
    text = "2 * {" + ", ".join(f"field_with_a_long_name_{i:05} : >float64" for i in range(2500)) + "}"
    with pytest.raises(InvalidTypeError, match="over the"):
        fabric.create("too-wide", "", text)
    assert fabric.get_list() == []
    assert all(row["used"] == 0 for row in fabric.status())


@pytest.fixture(scope="module")
def nodes_client():
    """One worker on each of two simulated nodes, as in tests/test_nodes.py."""
    with simulated_nodes(NODES) as (_, client):
        yield client


@pytest.fixture
def two_node_fabric(nodes_client):
    fabric = datafabric.start(nodes_client, mb=2 * 32)
    yield fabric
    fabric.shutdown()


def test_records_cross_nodes_with_their_dtype(nodes_client, two_node_fabric):
    """The bytes travel on Dask's comms as bytes; the dtype is rebuilt on node B from the
    stored string, as a replica (cache=True) and as a private copy."""
    fabric, per_node = two_node_fabric, node_workers(nodes_client)
    a, b = per_node["node-a"][0], per_node["node-b"][0]
    for k, dtype in enumerate([NESTED, EXPLICIT, np.dtype(">M8[us]")]):
        name = f"crossing/{k}"
        nodes_client.submit(insert_in_task, fabric, name, dtype, (40, 3), workers=[a]).result()
        expected = (dtype, dtype.descr, (40, 3), hashlib.sha256(sample(dtype, (40, 3)).tobytes()).hexdigest())
        private = nodes_client.submit(described, fabric, name, False, workers=[b], pure=False).result()
        replica = nodes_client.submit(described, fabric, name, True, workers=[b], pure=False).result()
        assert private == replica == expected
        assert len(fabric.get_locations(name)) == 2
