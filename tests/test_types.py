"""Every spelling of a type must reach one exact numpy layout, or be refused with advice."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ndtypes import ndt

import datafabric.types as types_module
from datafabric.errors import InvalidTypeError
from datafabric.types import FabricType, from_datashape, from_dtype, parse_type

SCALARS = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
SCALARS += ["float16", "float32", "float64", "complex64", "complex128"]


def aligned(fields: list) -> np.dtype:
    return np.dtype(fields, align=True)


def ndt_offsets(text: str) -> list[int]:
    """Field offsets as ndtypes computes them, in the order ast_repr lists them."""
    return [int(m) for m in re.findall(r"offset=(\d+)", ndt(text).ast_repr())]


def numpy_offsets(dtype: np.dtype) -> list[int]:
    """numpy's field offsets in ast_repr's order: a field's inner offsets, then its own."""
    while dtype.subdtype is not None:
        dtype = dtype.subdtype[0]
    offsets = []
    for name in dtype.names or ():
        field, offset = dtype.fields[name][:2]
        offsets += numpy_offsets(field)
        offsets.append(offset)
    return offsets


EXAMPLES = [
    ("40 * 20 * float64", "40 * 20 * float64", (40, 20), np.dtype("float64")),
    ("{x: int32, y: float64}", "{x : int32, y : float64}", (), aligned([("x", "i4"), ("y", "f8")])),
    (
        "3 * {a: int8, b: 4 * float32}",
        "3 * {a : int8, b : 4 * float32}",
        (3,),
        aligned([("a", "i1"), ("b", "f4", (4,))]),
    ),
    ("(int32, float64)", "(int32, float64)", (), aligned([("f0", "i4"), ("f1", "f8")])),
    ("(int32,)", "(int32)", (), aligned([("f0", "i4")])),
    ("2 * (int8, 3 * int64)", "2 * (int8, 3 * int64)", (2,), aligned([("f0", "i1"), ("f1", "i8", (3,))])),
    (
        "{a: {b: int8, c: float64}, d: 2 * 3 * int16}",
        "{a : {b : int8, c : float64}, d : 2 * 3 * int16}",
        (),
        aligned([("a", aligned([("b", "i1"), ("c", "f8")])), ("d", "i2", (2, 3))]),
    ),
    (
        "{a: 3 * 2 * {b: int8, c: (int16, float32)}}",
        "{a : 3 * 2 * {b : int8, c : (int16, float32)}}",
        (),
        aligned([("a", aligned([("b", "i1"), ("c", aligned([("f0", "i2"), ("f1", "f4")]))]), (3, 2))]),
    ),
    (
        "{a: int8, b: int64, c: int8}",
        "{a : int8, b : int64, c : int8}",
        (),
        aligned([("a", "i1"), ("b", "i8"), ("c", "i1")]),
    ),
    ("{a: 0 * float64, b: int8}", "{a : 0 * float64, b : int8}", (), aligned([("a", "f8", (0,)), ("b", "i1")])),
    ("{a: {}, b: int8}", "{a : {}, b : int8}", (), aligned([("a", aligned([])), ("b", "i1")])),
    ("{}", "{}", (), aligned([])),
    ("3 * 0 * int8", "3 * 0 * int8", (3, 0), np.dtype("int8")),
    ("!10 * float64", "10 * float64", (10,), np.dtype("float64")),
    ("intptr", "int64", (), np.dtype("int64")),
    ("fixed_string(10)", "fixed_string(10)", (), np.dtype("S10")),
    ("fixed_string(10, 'utf8')", "fixed_string(10)", (), np.dtype("S10")),
    ("2 * fixed_string(10, 'ascii')", "2 * fixed_string(10, 'ascii')", (2,), np.dtype("S10")),
    ("fixed_string(3, 'utf32')", "fixed_string(3, 'utf32')", (), np.dtype("U3")),
    ("fixed_bytes(size=16)", "fixed_bytes(size=16)", (), np.dtype("V16")),
    ("2 * fixed_bytes(size=3, align=1)", "2 * fixed_bytes(size=3)", (2,), np.dtype("V3")),
    (
        "{s: fixed_string(3, 'utf32'), t: int8, v: fixed_bytes(size=5), w: int16}",
        "{s : fixed_string(3, 'utf32'), t : int8, v : fixed_bytes(size=5), w : int16}",
        (),
        aligned([("s", "U3"), ("t", "i1"), ("v", "V5"), ("w", "i2")]),
    ),
]


@pytest.mark.parametrize(("text", "canonical", "shape", "dtype"), EXAMPLES)
def test_example_types(text, canonical, shape, dtype):
    ft = from_datashape(text)
    assert ft == FabricType(canonical, shape, dtype)
    assert ft.nbytes == ndt(text).datasize == np.zeros(shape, dtype).nbytes
    assert numpy_offsets(ft.dtype) == ndt_offsets(text)
    assert ft.ndt == ndt(text)
    assert parse_type(text) == parse_type(ndt(text)) == from_datashape(canonical) == ft


@pytest.mark.parametrize("name", SCALARS)
def test_scalars(name):
    assert from_datashape(name) == FabricType(name, (), np.dtype(name))
    ft = from_datashape(f"5 * 2 * {name}")
    assert (ft.shape, ft.dtype, ft.nbytes) == ((5, 2), np.dtype(name), 10 * np.dtype(name).itemsize)
    assert from_dtype(np.dtype(name), (5, 2)) == ft


def test_fabric_type_is_frozen_hashable_and_picklable():
    ft = from_datashape("3 * {a : int8, b : 4 * float32}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ft.shape = (4,)
    assert hash(ft) == hash(from_datashape(ft.datashape))
    assert pickle.loads(pickle.dumps(ft)) == ft


@pytest.mark.parametrize(
    ("dtype", "shape", "datashape", "result_shape"),
    [
        (np.float64, (2, 3), "2 * 3 * float64", (2, 3)),
        ("<f8", [np.int64(4)], "4 * float64", (4,)),
        (np.dtype(("f4", (4,))), (3,), "3 * 4 * float32", (3, 4)),
        (np.dtype((np.dtype(("i2", (2,))), (3,))), (), "3 * 2 * int16", (3, 2)),
        ("S5", (2,), "2 * fixed_string(5, 'ascii')", (2,)),
        ("U5", (), "fixed_string(5, 'utf32')", ()),
        ("V7", (1,), "1 * fixed_bytes(size=7)", (1,)),
        ([("x", "f8"), ("y", "i8")], (), "{x : float64, y : int64}", ()),  # unaligned, but laid out alike
        (aligned([("a", "i1"), ("b", "f4", (2, 2))]), (6,), "6 * {a : int8, b : 2 * 2 * float32}", (6,)),
    ],
)
def test_from_dtype(dtype, shape, datashape, result_shape):
    ft = from_dtype(dtype, shape)
    assert (ft.datashape, ft.shape) == (datashape, result_shape)
    assert ft == from_datashape(datashape) == parse_type(dtype, shape=shape)
    assert all(type(d) is int for d in ft.shape)


@pytest.mark.parametrize(
    ("text", "datashape"),
    [
        ("<i4", "3 * int32"),
        ("S5", "3 * fixed_string(5, 'ascii')"),
        ("U2", "3 * fixed_string(2, 'utf32')"),
        ("int", "3 * int64"),
    ],
)
def test_parse_type_reads_numpy_only_strings_as_dtypes(text, datashape):
    assert parse_type(text, shape=(3,)) == from_datashape(datashape)


@pytest.mark.parametrize("text", ["float64", "bool", "int8"])
def test_parse_type_reads_strings_ndtypes_knows_as_datashapes(text):
    assert parse_type(text, shape=(3,)) == from_datashape(text)  # the shape is ignored


SCALAR_DTYPES = [np.dtype(n) for n in SCALARS] + [np.dtype(s) for s in ("S1", "S7", "U1", "U3", "V1", "V5")]
field_names = st.from_regex(r"x[a-z0-9_]{0,4}", fullmatch=True)
sub_shapes = st.lists(st.integers(0, 3), max_size=2).map(tuple)


def records(children: st.SearchStrategy) -> st.SearchStrategy:
    fields = st.lists(st.tuples(field_names, children, sub_shapes), min_size=1, max_size=4, unique_by=lambda f: f[0])
    return fields.map(lambda fs: aligned([(n, d, s) if s else (n, d) for n, d, s in fs]))


dtypes = st.recursive(st.sampled_from(SCALAR_DTYPES), records, max_leaves=12)
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@given(dtypes, shapes)
def test_round_trip(dtype, shape):
    ft = from_dtype(dtype, shape)
    assert (ft.shape, ft.dtype) == (shape, dtype)
    assert from_datashape(ft.datashape) == ft
    assert np.zeros(shape, dtype).nbytes == ft.nbytes == ndt(ft.datashape).datasize
    assert numpy_offsets(dtype) == ndt_offsets(ft.datashape)


@given(dtypes, st.lists(st.integers(0, 3), min_size=1, max_size=2).map(tuple), shapes)
def test_subarray_dims_fold_into_shape(dtype, sub, shape):
    ft = from_dtype(np.dtype((dtype, sub)), shape)
    assert ft == from_dtype(dtype, shape + sub)
    array = np.zeros(shape, np.dtype((dtype, sub)))
    assert array.nbytes == ft.nbytes
    if array.dtype.itemsize:  # numpy keeps a zero-byte subarray as one opaque element
        assert array.shape == ft.shape


TOKENS = "3 0 * { } ( ) , : a b int8 float64 ? var N ! ... fixed_string fixed_bytes size = 'utf32' 'ascii' pack"
TOKENS = [*TOKENS.split(), "align", "|", "ref", "Foo", "string"]


@given(st.lists(st.sampled_from(TOKENS), max_size=12).map(" ".join))
def test_any_text_gives_a_consistent_layout_or_invalid_type_error(text):
    try:
        ft = from_datashape(text)
    except InvalidTypeError:
        return
    assert ft.nbytes == ndt(text).datasize == np.zeros(ft.shape, ft.dtype).nbytes
    assert from_datashape(ft.datashape) == ft
    assert numpy_offsets(ft.dtype) == ndt_offsets(text)


UNPARSEABLE = [
    ("", "cannot parse type '': .*syntax error.*write a datashape such as"),
    ("3 *", "cannot parse type '3 \\*'"),
    ("{a: int8", "cannot parse type"),
    ("float128", "cannot parse type 'float128': missing typedef"),
    ("{'a b': int32}", "cannot parse type"),
    ("{a: var * int8}", "cannot parse type .*var dimensions"),
    ("99999999999 * 99999999999 * int64", "cannot parse type .*too large"),
]

REFUSED_TYPES = [
    # abstract
    ("N * float64", "abstract; give every dimension a fixed size"),
    ("Any", "abstract"),
    ("T", "abstract"),
    ("var * float64", "abstract"),
    ("10 * Any", "abstract"),
    ("{a : float64, ...}", "abstract"),
    # no numpy layout
    ("?float64", "no fixed numpy layout \\(unexpected '\\?'\\); supported are fixed dimensions"),
    ("{x: 3 * 2 * ?int8}", "no fixed numpy layout"),
    ("string", "no fixed numpy layout \\(unexpected 'string'\\)"),
    ("bytes", "no fixed numpy layout"),
    ("ref(int32)", "no fixed numpy layout"),
    ("categorical(1, 2)", "no fixed numpy layout"),
    ("Foo(int32)", "no fixed numpy layout"),
    ("complex32", "no fixed numpy layout"),
    ("char('ascii')", "no fixed numpy layout"),
    ("fixed_string(4, 'utf16')", "no fixed numpy layout \\(numpy has no fixed_string\\(4, 'utf16'\\)\\)"),
    ("fixed_string(4, 'ucs2')", "no fixed numpy layout"),
    ("fixed_string(0)", "numpy has no fixed_string\\(0, 'utf8'\\)"),
    ("fixed_bytes(size=16, align=8)", "no fixed numpy layout \\(unexpected ','\\)"),
    ("{a: int8, a: int8}", "repeats a field name.*make them distinct"),
    # layouts the canonical string cannot record
    ("{a: int8, b: int64, pack=1}", "canonical string '{a : int8, b : int64}' loses; drop them"),
    ("{a: int8, b: int64, align=16}", "canonical string .* loses"),
    ("{a: int8, b: int8 |align=2|, c: int32}", "canonical string .* loses"),
    ("!2 * 3 * float64", "Fortran order.*loses"),
    ("fixed(shape=10, step=2) * float64", "steps.*loses"),
]


@pytest.mark.parametrize(("text", "message"), UNPARSEABLE + REFUSED_TYPES)
def test_refused_types(text, message):
    with pytest.raises(InvalidTypeError, match=message):
        from_datashape(text)
    if types_module._as_dtype(text) is None:  # else parse_type reads it as a numpy dtype
        with pytest.raises(InvalidTypeError, match=message):
            parse_type(text)


@pytest.mark.parametrize(("text", "message"), REFUSED_TYPES)
def test_refused_ndt_objects(text, message):
    with pytest.raises(InvalidTypeError, match=message):
        parse_type(ndt(text))


REFUSED_DTYPES = [
    (">f8", "native byte order.*arr.astype\\(arr.dtype.newbyteorder\\('='\\)\\)"),
    ([("a", "<i2"), ("b", ">i4")], "native byte order"),
    (">U3", "native byte order"),
    (object, "no fixed-layout datashape.*convert the data first"),
    ("M8[ns]", "no fixed-layout datashape.*arr.view\\('int64'\\)"),
    ("m8[s]", "no fixed-layout datashape"),
    (np.longdouble, "no fixed-layout datashape"),
    (aligned([("a", "i1"), ("b", "O")]), "no fixed-layout datashape"),
    ([("a", "i1"), ("b", "f8")], "laid out differently.*np.dtype\\(..., align=True\\)"),
    ({"names": ["a"], "formats": ["i4"], "itemsize": 8}, "laid out differently"),
    ({"names": ["a", "b"], "formats": ["i1", "i1"], "offsets": [1, 0]}, "laid out differently"),
    ([(("a title", "a"), "i4")], "field titles.*drop them"),
    ([("a b", "i4")], "cannot be written in a datashape; rename them to ASCII identifiers"),
    ([("é", "i4")], "rename them to ASCII identifiers"),
    ([("int8", "i4")], "ndtypes rejects.*rename fields that are datashape type names"),
    ("S0", "numpy has no fixed_string\\(0, 'ascii'\\)"),
    ("U0", "numpy has no fixed_string\\(0, 'utf32'\\)"),
]


@pytest.mark.parametrize(("dtype", "message"), REFUSED_DTYPES)
def test_refused_dtypes(dtype, message):
    with pytest.raises(InvalidTypeError, match=message):
        from_dtype(dtype, (2,))
    with pytest.raises(InvalidTypeError, match=message):
        parse_type(dtype, shape=(2,))


@pytest.mark.parametrize("obj", [42, None, object(), [1, 2], 1.5, {"x": 1}, np.zeros(3)])
def test_refused_objects(obj):
    with pytest.raises(InvalidTypeError, match="is not a type; give an ndt, a datashape such as"):
        parse_type(obj, shape=(1,))
    with pytest.raises(InvalidTypeError, match="is not a type"):
        from_dtype(obj, (1,))


@pytest.mark.parametrize("tp", [np.float64, np.dtype("i4"), "<f8", "S5", "float128"])
def test_dtype_needs_a_shape(tp):
    with pytest.raises(InvalidTypeError, match="carries no shape; pass shape=buffer.shape or a datashape"):
        parse_type(tp)


@pytest.mark.parametrize("shape", [(-1,), (2, -3), None, 3, "ab", (1.5,)])
def test_refused_shapes(shape):
    with pytest.raises(InvalidTypeError, match="must be a tuple of non-negative ints"):
        from_dtype("f8", shape)
    if shape is not None:  # parse_type takes None as "no shape given"
        with pytest.raises(InvalidTypeError, match="must be a tuple of non-negative ints"):
            parse_type(np.float64, shape=shape)


def test_refusals_are_type_errors_that_pickle():
    with pytest.raises(TypeError) as info:
        from_datashape("N * float64")
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is InvalidTypeError and str(again) == str(info.value)


def test_layout_disagreement_never_passes(monkeypatch):
    monkeypatch.setattr(types_module._Parser, "parse", lambda self: ((3,), np.dtype("f8")))
    from_datashape.cache_clear()  # parse afresh, with the broken parser
    with pytest.raises(InvalidTypeError, match="internal error: .* not the 16 bytes ndtypes computes"):
        from_datashape("2 * float64")
