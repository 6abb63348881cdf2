"""Caterva2's slice syntax and the piecewise reads of ``GET data/``, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datafabric.errors import InvalidArgumentError
from yp.http.slices import parse_slice, select


def read(array: np.ndarray, text: str | None, chunk: int) -> np.ndarray:
    index = parse_slice(text, array.ndim)
    sel = select(array.shape, array.dtype, index, chunk)
    raw = array.tobytes()
    out = b"".join(bytes(p.take(memoryview(raw)[p.start : p.start + p.nbytes], array.dtype)) for p in sel.pieces)
    assert len(out) == sel.nbytes
    assert all(p.nbytes <= max(chunk, array.itemsize * int(np.prod(array.shape[1:]))) for p in sel.pieces)
    return np.frombuffer(out, array.dtype).reshape(sel.shape)


@pytest.mark.parametrize(
    "text, index",
    [
        ("0:10,5", (slice(0, 10), 5)),
        ("5", (5,)),
        ("-1", (-1,)),
        ("::2", (slice(None, None, 2),)),
        ("::-1,1:3", (slice(None, None, -1), slice(1, 3))),
        ("-3:,:-1:2", (slice(-3, None), slice(None, -1, 2))),
        ("", ()),
        (None, ()),
    ],
)
def test_parse(text, index):
    assert parse_slice(text, 2) == index


@pytest.mark.parametrize("text", ["a", "1.5", "1:2:3:4", "::0", "1,2,3", "(1)", "1e3", "__import__('os')", "٣"])
def test_bad_slices_are_refused(text):
    with pytest.raises(InvalidArgumentError, match="bad slice"):
        parse_slice(text, 2)


def test_out_of_bounds_is_refused():
    with pytest.raises(InvalidArgumentError, match="out of bounds"):
        select((4, 5), np.dtype("f8"), parse_slice("4", 2), 64)


def test_contiguous_selections_are_ranges_in_chunks():
    a = np.arange(1000, dtype=np.int64).reshape(10, 100)
    sel = select(a.shape, a.dtype, parse_slice("2:5", 2), 1000)
    assert [(p.start, p.nbytes, p.shape) for p in sel.pieces] == [(1600, 1000, ()), (2600, 1000, ()), (3600, 400, ())]


part = st.one_of(
    st.integers(-12, 11).map(str),
    st.tuples(
        st.one_of(st.none(), st.integers(-14, 14)),
        st.one_of(st.none(), st.integers(-14, 14)),
        st.one_of(st.none(), st.integers(-4, 4).filter(lambda s: s != 0)),
    ).map(lambda t: ":".join("" if v is None else str(v) for v in t)),
)


@settings(max_examples=400, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    parts=st.lists(part, min_size=0, max_size=3),
    chunk=st.sampled_from([8, 24, 100, 4096]),
    dtype=st.sampled_from(["<f8", "<i2", "u1", "<c8"]),
)
def test_pieces_read_what_numpy_selects(shape, parts, chunk, dtype):
    a = (np.arange(np.prod(shape)) * 7 % 251).astype(dtype).reshape(shape)
    parts = parts[: len(shape)]
    text = ",".join(parts)
    try:
        expected = a[tuple(parse_slice(text, a.ndim))]
    except IndexError:
        with pytest.raises(InvalidArgumentError):
            read(a, text, chunk)
        return
    np.testing.assert_array_equal(read(a, text, chunk), expected)
