"""Properties of the type layer over generated dtypes and texts: every numpy layout a
datashape can say round-trips exactly, packed and aligned records are always stored, and
no text gives a layout that disagrees with ndtypes'."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from ndtypes import ndt

from datafabric.errors import InvalidTypeError
from datafabric.types import FabricType, from_datashape, from_dtype
from tests.test_types import SCALARS, aligned, ndt_offsets, numpy_offsets

UNITS = ["Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as"]
field_names = st.from_regex(r"x[a-z0-9_]{0,4}", fullmatch=True)
sub_shapes = st.lists(st.integers(0, 3), max_size=2).map(tuple)
orders = st.sampled_from("<>=")
numbers = st.builds(lambda name, order: np.dtype(name).newbyteorder(order), st.sampled_from(SCALARS), orders)
times = st.builds(
    lambda code, count, unit, order: np.dtype(f"{order}{code}8[{count}{unit}]"),
    st.sampled_from("Mm"),
    st.sampled_from(["", "1", "10", "250"]),
    st.sampled_from(UNITS),
    orders,
)
generic_times = st.sampled_from(["M8", ">M8", "m8", ">m8"]).map(np.dtype)
texts = st.sampled_from(["S1", "S7", "U1", "U3", "V1", "V5"]).map(np.dtype)
leaves = st.one_of(numbers, times, generic_times, texts)


def with_offsets(fields: list, gaps: list[int], tail: int) -> np.dtype:
    """Fields in order, with ``gaps`` extra bytes before each and ``tail`` after the last:
    explicit layouts, some of which a datashape can say and some not."""
    packed = np.dtype(fields)
    offsets, end = [], 0
    for name, gap in zip(packed.names, gaps, strict=True):
        offsets.append(end + gap)
        end += gap + packed.fields[name][0].itemsize
    return np.dtype(
        {
            "names": packed.names,
            "formats": [packed.fields[n][0] for n in packed.names],
            "offsets": offsets,
            "itemsize": end + tail,
        }
    )


def records(children: st.SearchStrategy) -> st.SearchStrategy:
    fields = st.lists(st.tuples(field_names, children, sub_shapes), min_size=1, max_size=4, unique_by=lambda f: f[0])
    fields = fields.map(lambda fs: [(n, d, s) if s else (n, d) for n, d, s in fs])
    return st.one_of(
        fields.map(np.dtype),  # numpy's default: packed
        fields.map(aligned),
        fields.flatmap(
            lambda fs: st.builds(
                with_offsets,
                st.just(fs),
                st.lists(st.integers(0, 9), min_size=len(fs), max_size=len(fs)),
                st.integers(0, 9),
            )
        ),
    )


dtypes = st.recursive(leaves, records, max_leaves=12)
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


def stored_or_unlaid(dtype: np.dtype, shape: tuple) -> FabricType | None:
    """The type, or None if numpy placed a field where no datashape record can."""
    try:
        return from_dtype(dtype, shape)
    except InvalidTypeError as exc:
        assert "which no datashape record can lay out" in str(exc)
        return None


@settings(deadline=None)  # a loaded machine must not fail a correct parse
@given(dtypes, shapes)
def test_round_trip(dtype, shape):
    ft = stored_or_unlaid(dtype, shape)
    if ft is None:
        return
    assert (ft.shape, ft.dtype, ft.dtype.descr) == (shape, dtype, dtype.descr)
    assert from_datashape(ft.datashape) == ft
    assert from_datashape(ft.datashape).dtype.descr == dtype.descr
    assert np.zeros(shape, dtype).nbytes == ft.nbytes == ndt(ft.datashape).datasize
    assert numpy_offsets(dtype) == ndt_offsets(ft.datashape)


@settings(deadline=None)  # a loaded machine must not fail a correct parse
@given(st.lists(st.tuples(field_names, leaves), min_size=1, max_size=5, unique_by=lambda f: f[0]))
def test_packed_and_aligned_records_are_always_stored(fields):
    for dtype in (np.dtype(fields), aligned(fields)):
        ft = from_dtype(dtype, (2,))
        assert (ft.dtype, ft.dtype.descr) == (dtype, dtype.descr)
        assert from_datashape(ft.datashape) == ft


@settings(deadline=None)  # a loaded machine must not fail a correct parse
@given(dtypes, st.lists(st.integers(0, 3), min_size=1, max_size=2).map(tuple), shapes)
def test_subarray_dims_fold_into_shape(dtype, sub, shape):
    ft = stored_or_unlaid(np.dtype((dtype, sub)), shape)
    if ft is None:
        return
    assert ft == from_dtype(dtype, shape + sub)
    array = np.zeros(shape, np.dtype((dtype, sub)))
    assert array.nbytes == ft.nbytes
    if array.dtype.itemsize:  # numpy keeps a zero-byte subarray as one opaque element
        assert array.shape == ft.shape


TOKENS = "3 0 * { } ( ) , : a b int8 float64 ? var N ! ... fixed_string fixed_bytes size = 'utf32' 'ascii' pack"
TOKENS = [*TOKENS.split(), "align", "|", "ref", "Foo", "string", ">", "<", "Datetime64_ns", "int64", "Timedelta64"]


@settings(deadline=None)  # a loaded machine must not fail a correct parse
@given(st.lists(st.sampled_from(TOKENS), max_size=12).map(" ".join))
def test_any_text_gives_a_consistent_layout_or_invalid_type_error(text):
    try:
        ft = from_datashape(text)
    except InvalidTypeError:
        return
    assert ft.nbytes == ndt(text).datasize == np.zeros(ft.shape, ft.dtype).nbytes
    assert from_datashape(ft.datashape) == ft
    assert numpy_offsets(ft.dtype) == ndt_offsets(text)
