"""Every spelling of a type must reach one exact numpy layout, or be refused with advice."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
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
    (">float64", ">float64", (), np.dtype(">f8")),
    ("2 * <int32", "2 * <int32", (2,), np.dtype("<i4")),
    ("=int16", "<int16", (), np.dtype("i2")),
    (
        "{a: >int32, b: 2 * >complex128}",
        "{a : >int32, b : 2 * >complex128}",
        (),
        aligned([("a", ">i4"), ("b", ">c16", (2,))]),
    ),
    ("3 * Datetime64_ns(int64)", "3 * Datetime64_ns(int64)", (3,), np.dtype("M8[ns]")),
    ("Timedelta64_10s(>int64)", "Timedelta64_10s(>int64)", (), np.dtype(">m8[10s]")),
    ("Datetime64_M(int64)", "Datetime64_M(int64)", (), np.dtype("M8[M]")),
    ("Datetime64(int64)", "Datetime64(int64)", (), np.dtype("M8")),
    (
        "{t: Datetime64_us(int64), x: int8}",
        "{t : Datetime64_us(int64), x : int8}",
        (),
        aligned([("t", "M8[us]"), ("x", "i1")]),
    ),
    (
        "{a : int8, b : 4 * float32, pack=1}",
        "{a : int8, b : 4 * float32, pack=1}",
        (),
        np.dtype([("a", "i1"), ("b", "f4", (4,))]),
    ),
    ("(int8, int64, pack=1)", "{f0 : int8, f1 : int64, pack=1}", (), np.dtype([("f0", "i1"), ("f1", "i8")])),
    ("{a: int8, b: int16 |pack=1|}", "{a : int8, b : int16, pack=1}", (), np.dtype([("a", "i1"), ("b", "i2")])),
    (
        "{a: {b: int8, c: int64, pack=1}, d: int16}",
        "{a : {b : int8, c : int64, pack=1}, d : int16}",
        (),
        aligned([("a", np.dtype([("b", "i1"), ("c", "i8")])), ("d", "i2")]),
    ),
    (
        "{a: int8, b: int8 |align=2|, c: int32}",
        "{a : int8, b : int8 |pack=2|, c : int32 |pack=2|}",
        (),
        np.dtype({"names": ["a", "b", "c"], "formats": ["i1", "i1", "i4"], "offsets": [0, 2, 4], "itemsize": 8}),
    ),
    ("{a: int8, b: int64, align=16}", "{a : int8, b : int64}", (), aligned([("a", "i1"), ("b", "i8")])),
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
    assert ndt_offsets(ft.datashape) == ndt_offsets(text)
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
    ("Datetime64_ns(int32)", "no fixed numpy layout \\(Datetime64_ns holds an int64, not int32\\)"),
    ("Datetime64_0ns(int64)", "no fixed numpy layout \\(unexpected 'Datetime64_0ns'\\)"),
    ("Datetime64_ns(Datetime64_ns(int64))", "holds an int64, not datetime64\\[ns\\]"),
    ("Datetime64_parsec(int64)", "unexpected 'Datetime64_parsec'"),
    ("Timedelta64_ns({a: int64})", "holds an int64"),
    # layouts numpy cannot view
    ("!2 * 3 * float64", "sets Fortran order or steps; drop them"),
    ("fixed(shape=10, step=2) * float64", "sets Fortran order or steps"),
    ("2 * {a: !2 * 3 * int8}", "sets Fortran order or steps"),
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


UNLAID = "which no datashape record can lay out.*numpy.lib.recfunctions.repack_fields\\(arr\\)"
REFUSED_DTYPES = [
    (">U3", "numpy dtype >U3 is big-endian UTF-32.*convert with arr.astype\\('<U3'\\)"),
    ([("a", "i1"), ("b", ">U2")], "big-endian UTF-32.*arr.astype\\('<U2'\\)"),
    (object, "no fixed-layout datashape.*convert the data first"),
    (np.longdouble, "no fixed-layout datashape"),
    (aligned([("a", "i1"), ("b", "O")]), "no fixed-layout datashape"),
    ({"names": ["a", "b"], "formats": ["i1", "i1"], "offsets": [1, 0]}, "field 'a' at offset 1, .*" + UNLAID),
    ({"names": ["b"], "formats": ["i4"], "offsets": [2], "itemsize": 6}, "field 'b' at offset 2, " + ".*" + UNLAID),
    ({"names": ["a", "b"], "formats": ["i1", "i4"], "offsets": [0, 3]}, "field 'b' at offset 3, where the fields"),
    ({"names": ["a", "b"], "formats": ["i4", "i1"], "offsets": [0, 2]}, "field 'b' at offset 2, where the fields"),
    ({"names": ["a", "b"], "formats": ["i1", "i4"], "offsets": [0, 4], "itemsize": 12}, "4 bytes after its last"),
    (np.zeros(1, [("a", "i1"), ("b", "f8"), ("c", "i2")])[["a", "c"]].dtype, UNLAID),
    ([(("a title", "a"), "i4")], "field titles.*drop them"),
    ([("a b", "i4")], "cannot be written in a datashape; rename them to ASCII identifiers"),
    ([("é", "i4")], "rename them to ASCII identifiers"),
    ([("int8", "i4")], "ndtypes rejects.*rename fields that are datashape type names"),
    ("S0", "numpy has no fixed_string\\(0, 'ascii'\\)"),
    ("U0", "numpy has no fixed_string\\(0, 'utf32'\\)"),
]


REFUSED_CODES = {"g": "arr.astype\\('float64'\\)", "G": "arr.astype\\('complex128'\\)", "O": "arr.astype\\('U20'\\)"}


@pytest.mark.parametrize("code", np.typecodes["All"])
@pytest.mark.parametrize("order", "<>")
def test_every_numpy_type_code_is_stored_or_refused_with_what_to_use(code, order):
    """numpy's whole range: all but float128, complex256, object and big-endian UTF-32."""
    dtype = np.dtype(code + "3" if code in "SUV" else code).newbyteorder(order)
    if code in REFUSED_CODES:
        with pytest.raises(InvalidTypeError, match="no fixed-layout datashape.*convert the data first, e.g. "):
            from_dtype(dtype, (2,))
        with pytest.raises(InvalidTypeError, match=REFUSED_CODES[code]):
            from_dtype(dtype, (2,))
    elif code == "U" and order == ">":
        with pytest.raises(InvalidTypeError, match="big-endian UTF-32.*arr.astype\\('<U3'\\)"):
            from_dtype(dtype, (2,))
    else:
        ft = from_dtype(dtype, (2,))
        assert (ft.dtype, ft.dtype.descr, ft.shape) == (dtype, dtype.descr, (2,))
        assert from_datashape(ft.datashape) == ft


def test_variable_width_strings_are_refused_with_what_to_use():
    with pytest.raises(InvalidTypeError, match="variable-width string.*arr.astype\\('U20'\\)"):
        from_dtype(np.dtypes.StringDType(), (2,))


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


README_SPELLINGS = [
    (np.dtype(">f8"), ">float64"),
    (np.dtype("M8[ns]"), "Datetime64_ns(int64)"),
    (np.dtype(">m8[10s]"), "Timedelta64_10s(>int64)"),
    (np.dtype("M8"), "Datetime64(int64)"),
    (np.dtype("U5"), "fixed_string(5, 'utf32')"),
    (np.dtype([("a", "i1"), ("b", "f4", (4,))]), "{a : int8, b : 4 * float32, pack=1}"),
    (aligned([("a", "i1"), ("b", "f4", (4,))]), "{a : int8, b : 4 * float32}"),
    (
        np.dtype({"names": ["a", "b"], "formats": ["i1", "i4"], "offsets": [0, 2], "itemsize": 8}),
        "{a : int8, b : int32 \\|pack=2\\|, align=4}",
    ),
    (
        np.dtype([("n", "i1"), ("t", "M8[ms]"), ("pos", [("x", ">f4"), ("y", "f4")], (2,))]),
        "{n : int8, t : Datetime64_ms(int64), pos : 2 * {x : >float32, y : float32}, pack=1}",
    ),
]


@pytest.mark.parametrize(("dtype", "shown"), README_SPELLINGS)
def test_the_readme_shows_the_stored_type_strings(dtype, shown):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"`{shown}`" in readme  # as the README's table writes it (| escaped)
    assert from_dtype(dtype, ()).datashape == shown.replace("\\|", "|")


def test_a_layout_fact_missing_is_an_internal_error_never_a_guess(monkeypatch):
    monkeypatch.setattr(types_module, "_FACT", re.compile(r"\b(datasize|step)=(\d+)"))  # no field offsets
    from_datashape.cache_clear()
    with pytest.raises(
        InvalidTypeError, match="internal error: .*where the parser expects its offset\\); please report"
    ):
        from_datashape("{a : int8, b : int64, pack=1}")
    from_datashape.cache_clear()
