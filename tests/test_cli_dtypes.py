"""`put`, `info`, `show` and `get` of .npy files whose dtypes are big-endian, datetime64,
timedelta64 and packed, aligned and explicitly laid out records, through the real
`datafabric` executable against an embedded start: the file comes back byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datafabric.types import from_dtype
from tests.cli_helpers import ok, ok_many, run_many
from tests.test_dtypes import EXPLICIT, NESTED, PACKED, sample

TIMES = np.array(["2024-02-29T12:00:00.123456789", "NaT", "1969-12-31T23:59:59"], ">M8[ns]")
ARRAYS = {
    "be_f8": np.arange(12, dtype=">f8").reshape(3, 4) / 8,
    "be_i4": np.arange(-5, 5, dtype=">i4"),
    "times": TIMES,
    "spans": np.array([1, -90, 3600], "m8[s]"),
    "packed": sample(PACKED, (4,), seed=1),
    "aligned": sample(np.dtype([("a", "i1"), ("b", "f4", (4,))], align=True), (4,), seed=2),
    "nested": sample(NESTED, (2, 2), seed=3),
    "explicit": sample(EXPLICIT, (3,), seed=4),
}
RECORDS = np.array([(1, "2024-01-01T00:00", [(1.5, 2.5), (3.5, 4.5)], True)] * 2, NESTED)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("files")
    for name, arr in ARRAYS.items():
        np.save(d / f"{name}.npy", arr)
    np.save(d / "records.npy", RECORDS)
    return d


def test_put_info_get_keep_the_dtype_and_every_byte(embedded, files, tmp_path):
    ok_many(embedded.env, *(["put", name, str(files / f"{name}.npy")] for name in ARRAYS))
    described = ok_many(embedded.env, *(["info", name, "--json"] for name in ARRAYS))
    for arr, text in zip(ARRAYS.values(), described, strict=True):
        details = json.loads(text)
        assert details["type"] == from_dtype(arr.dtype, arr.shape).datashape
        assert (details["shape"], details["dtype"]) == (list(arr.shape), str(arr.dtype))
    assert json.loads(described[2])["type"] == "3 * Datetime64_ns(>int64)"
    assert json.loads(described[4])["type"] == "4 * {a : int8, b : 4 * float32, pack=1}"
    assert "Datetime64_ns(>int64)" in ok(embedded.env, "info", "times")

    procs = run_many(embedded.env, *(["get", name, "-o", str(tmp_path / f"{name}.npy")] for name in ARRAYS))
    assert [p.returncode for p in procs] == [0] * len(ARRAYS), [p.stderr for p in procs]
    for name, arr in ARRAYS.items():
        assert (tmp_path / f"{name}.npy").read_bytes() == (files / f"{name}.npy").read_bytes(), name
        back = np.load(tmp_path / f"{name}.npy")
        assert (back.dtype, back.dtype.descr, back.tobytes()) == (arr.dtype, arr.dtype.descr, arr.tobytes())


def test_show_prints_datetimes_and_records(embedded, files):
    ok(embedded.env, "put", "shown/times", str(files / "times.npy"))
    ok(embedded.env, "put", "shown/be", str(files / "be_f8.npy"))
    ok(embedded.env, "put", "shown/spans", str(files / "spans.npy"))
    ok(embedded.env, "put", "shown/records", str(files / "records.npy"))
    text, as_json, spans, be, nested = ok_many(
        embedded.env,
        ["show", "shown/times"],
        ["show", "shown/times[:2]", "--json"],
        ["show", "shown/spans", "--json"],
        ["show", "shown/be[1]", "--json"],
        ["show", "shown/records[1]", "--json"],
    )
    assert text == f"{TIMES}\n"
    assert json.loads(spans)["data"] == ["1 seconds", "-90 seconds", "3600 seconds"]
    assert json.loads(nested)["data"] == [1, "2024-01-01 00:00:00", [[1.5, 2.5], [3.5, 4.5]], True]
    shown = json.loads(as_json)
    assert shown["data"] == ["2024-02-29T12:00:00.123456789", "NaT"] and shown["dtype"] == ">M8[ns]"
    assert json.loads(be)["data"] == ARRAYS["be_f8"][1].tolist()
