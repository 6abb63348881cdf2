"""The Dask-free parts of datasets: the chunk grid, selections split over chunks, and the
YellowPages' dataset table, with no cluster."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datafabric import errors
from datafabric.datasets.grid import chunk_shape, grid_shape, normalize_chunks, ravel, unravel
from datafabric.datasets.selection import Selection
from datafabric.names import chunk_name, is_chunk_name, validate_new_name
from yp.dataset_table import SEALED, DatasetRecord, DatasetTable
from yp.directory import Directory


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    data=st.data(),
)
def test_pieces_cover_the_selection_exactly_once(shape, data):
    shape = tuple(shape)
    chunks = tuple(data.draw(st.integers(1, n)) for n in shape)
    key = tuple(
        data.draw(
            st.integers(-n, n - 1)
            | st.builds(
                slice,
                st.none() | st.integers(-15, 15),
                st.none() | st.integers(-15, 15),
                st.none() | st.integers(-5, 5).filter(bool),
            )
        )
        for n in shape
    )
    a = np.arange(int(np.prod(shape))).reshape(shape)
    sel = Selection(key, shape)
    out = np.full(sel.shape, -1)
    grid = grid_shape(shape, chunks)
    for piece in sel.pieces(chunks):
        lo = [k * c for k, c in zip(piece.index, chunks, strict=True)]
        chunk = a[
            tuple(slice(lo_, lo_ + n) for lo_, n in zip(lo, chunk_shape(piece.index, shape, chunks), strict=True))
        ]
        assert (out[piece.out] == -1).all()  # no element twice
        out[piece.out] = chunk[piece.local]
        assert unravel(ravel(piece.index, grid), grid) == piece.index
    np.testing.assert_array_equal(sel.orient(out), a[key])


def test_chunks_are_normalized_or_refused():
    assert normalize_chunks(4, (10, 3), 8) == (4, 3)
    assert normalize_chunks((2, 100), (10, 3), 8) == (2, 3)
    for bad in [(1,), 0, (1, -1), "big", 1.5]:
        with pytest.raises(errors.InvalidArgumentError):
            normalize_chunks(bad, (10, 3), 8)


def test_chunk_names_are_the_fabrics_own():
    name = chunk_name(7, 3)
    assert is_chunk_name(name) and not is_chunk_name("run1/x")
    with pytest.raises(errors.InvalidNameError):
        validate_new_name(name)


def test_the_table_shares_the_directorys_names_and_lists_only_sealed_datasets():
    d = Directory()
    table = DatasetTable(d.datasets, d.variables)
    rec = DatasetRecord(1, "ds", (4, 4), "float64", (2, 2), bytes(8), "", {}, "client-1")
    table.add(rec)
    with pytest.raises(errors.NameExistsError):
        d.check_new_names(["ds"])  # an insert of the dataset's name is refused
    with pytest.raises(errors.NameExistsError):
        table.add(DatasetRecord(2, "ds", (1,), "int8", (1,), bytes(1), "", {}, "client-1"))
    assert table.names("") == [] and table.created_by("client-1") == [rec]
    with pytest.raises(errors.DatasetWritingError):
        table.readable("ds")
    rec.table, rec.state = np.array([5, -1, -1, 6]), SEALED
    assert table.names("d") == ["ds"] and table.created_by("client-1") == []
    assert np.unpackbits(np.frombuffer(rec.message()["written"], np.uint8), count=4).tolist() == [1, 0, 0, 1]
    with pytest.raises(errors.DatasetSealedError):
        table.writable("ds", 1)
    with pytest.raises(errors.NameNotFoundError):
        table.lookup("ds", 2)  # another dataset of that name
    table.remove(rec)
    assert "ds" not in d.datasets
