"""`put` of HDF5, zarr and .npy files as datasets and `get` of datasets and variables to
them, through the real `datafabric` executable against an embedded start: exact round
trips (values, dtype, chunks, fill value, attributes), and the refusals, which leave no
dataset, no file and no memory behind."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

import datafabric
from tests.cli_helpers import DATAFABRIC, WAIT, assert_fails, ok, ok_many, run, run_many
from tests.waiting import wait_for

h5py = pytest.importorskip("h5py")
zarr = pytest.importorskip("zarr")

TEMPS = (np.arange(23 * 17) - 100).astype(">i4").reshape(23, 17)  # big-endian; edge chunks clipped
REC = np.dtype([("id", ">u8"), ("pos", "<f4", (3,)), ("ok", "?")])
RECORDS = np.array([(i, (i / 2, -i, 1e9 + i), i % 3 == 0) for i in range(40)], REC).reshape(8, 5)
FLAT = np.array([(i, i / 2, i % 3 == 0) for i in range(40)], [("id", ">u8"), ("x", "<f4"), ("ok", "?")]).reshape(8, 5)
TIMES = np.array(["2024-02-29T12:00", "NaT", "1969-12-31T23:59"], "M8[m]")
ATTRS = {"units": "K", "scale": 0.5, "count": 3, "flags": [1, 2, 3], "names": ["a", "bc"], "valid": True}
WIDE = np.linspace(-1, 1, 300 * 70).reshape(300, 70)  # float64, 164 KiB


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("files")
    with h5py.File(d / "fields.h5", "w") as f:
        t = f.create_dataset("run1/fields/t", data=TEMPS, chunks=(5, 4), fillvalue=-7)
        t.attrs.update(ATTRS)
        t.attrs["grid"] = np.ones((2, 2))  # 2-d: not kept
        f.create_dataset("records", data=RECORDS)  # contiguous, a record dtype
        f.create_dataset("labels", data=["x", "yz"], dtype=h5py.string_dtype())  # variable-length
    with h5py.File(d / "wide.h5", "w") as f:
        f.create_dataset("wide", data=WIDE)  # contiguous, the file's only dataset
    v3 = zarr.create_array(str(d / "v3.zarr"), shape=(20, 13), chunks=(7, 5), dtype="f4", fill_value=1.5)
    v3[:14] = np.arange(14 * 13, dtype="f4").reshape(14, 13)  # the last chunk row is never written
    v3.attrs.update(ATTRS)
    v2 = zarr.create_array(str(d / "v2.zarr"), shape=FLAT.shape, chunks=(3, 2), dtype=FLAT.dtype, zarr_format=2)
    v2[...] = FLAT
    np.save(d / "big.npy", (TEMPS / 3).astype(">f8"))
    np.save(d / "times.npy", TIMES)
    (d / "fake.h5").write_text("not hdf5")
    return d


def h5_contents(path: Path, inner: str) -> tuple:
    with h5py.File(path, "r") as f:
        ds = f[inner]
        return ds[...], ds.dtype, ds.chunks, ds.fillvalue, {k: _plain(v) for k, v in ds.attrs.items()}


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def info(env, name: str) -> dict:
    return json.loads(ok(env, "info", name, "--json"))


def test_h5_round_trips_with_its_group_path_chunks_fill_and_attributes(embedded, files, tmp_path):
    out = ok(embedded.env, "put", "h5/t", f"{files / 'fields.h5'}:/run1/fields/t", "--doc", "kelvin")
    assert "put h5/t: dataset (23, 17) >i4, chunks (5, 4)" in out and "6 attrs" in out
    assert "attrs not kept" in out and "grid (a 2-d array)" in out
    details = info(embedded.env, "h5/t")
    assert details["shape"] == [23, 17] and details["dtype"] == ">i4" and details["doc"] == "kelvin"
    assert details["dataset"]["chunks"] == [5, 4] and details["dataset"]["written"] == 25
    assert details["dataset"]["attrs"] == ATTRS and details["dataset"]["fillvalue"] == -7
    table, row, corner = ok_many(
        embedded.env, ["info", "h5/t"], ["show", "h5/t[0, :10]", "--json"], ["show", "h5/t[-2:, 15:]"]
    )
    assert "fill value" in table and 'units: "K"' in table
    assert json.loads(row)["data"] == TEMPS[0, :10].tolist()
    with np.printoptions(linewidth=80):
        assert corner == f"{TEMPS[-2:, 15:]}\n"

    h5_out, inner_out, zarr_out, npy_out = (tmp_path / n for n in ("t.h5", "inner.h5", "t.zarr", "t.npy"))
    ok_many(
        embedded.env,
        ["get", "h5/t", "-o", str(h5_out)],
        ["get", "h5/t", "-o", f"{inner_out}:/a/b"],
        ["get", "h5/t", "-o", str(zarr_out)],
        ["get", "h5/t", "-o", str(npy_out)],
    )
    with_doc = ATTRS | {"datafabric:doc": "kelvin"}  # the doc travels as an attribute
    for path, inner in ((h5_out, "/h5/t"), (inner_out, "/a/b")):
        data, dtype, chunks, fill, attrs = h5_contents(path, inner)
        np.testing.assert_array_equal(data, TEMPS)
        assert (dtype, chunks, fill, attrs) == (TEMPS.dtype, (5, 4), -7, with_doc)
    z = zarr.open_array(str(zarr_out), mode="r")  # v2: v3 would not keep the byte order
    meta = (z.metadata.zarr_format, z.dtype, z.chunks, z.fill_value, z.attrs.asdict())
    assert meta == (2, ">i4", (5, 4), -7, with_doc)
    np.testing.assert_array_equal(z[...], TEMPS)
    back = np.load(npy_out)
    assert back.dtype == TEMPS.dtype and back.tobytes() == TEMPS.tobytes()

    ok_many(  # and back in from the exports: the doc again a doc, not an attribute
        embedded.env, ["put", "h5/t-again", str(zarr_out)], ["put", "h5/t-h5", f"{h5_out}:/h5/t"]
    )
    for again in ("h5/t-again", "h5/t-h5"):
        back = info(embedded.env, again)
        assert back["dataset"] == details["dataset"] and back["doc"] == "kelvin"
    ok(embedded.env, "put", "h5/t-doc", str(zarr_out), "--doc", "given")  # a doc given wins over the file's
    given = info(embedded.env, "h5/t-doc")
    assert given["doc"] == "given" and given["dataset"]["attrs"] == ATTRS
    shown = json.loads(ok(embedded.env, "show", "h5/t-again", "--json"))
    assert shown["data"] == TEMPS.tolist() and shown["dtype"] == ">i4"


def test_contiguous_h5_takes_auto_chunks_or_the_given_ones_and_records_round_trip(embedded, files, tmp_path):
    auto, given, records = ok_many(
        embedded.env,
        ["put", "wide/auto", str(files / "wide.h5")],  # the file's one dataset: no inner path needed
        ["put", "wide/given", str(files / "wide.h5"), "--chunks", "64,32"],
        ["put", "wide/records", f"{files / 'fields.h5'}:records"],
    )
    assert "chunks (300, 70)" in auto and "chunks (64, 32)" in given and "chunks (8, 5)" in records
    assert info(embedded.env, "wide/given")["dataset"]["written"] == 5 * 3
    ok_many(
        embedded.env,
        ["get", "wide/given", "-o", str(tmp_path / "given.h5")],
        ["get", "wide/records", "-o", str(tmp_path / "records.h5")],
        ["get", "wide/records", "-o", str(tmp_path / "records.npy")],
    )
    data, dtype, chunks, _, _ = h5_contents(tmp_path / "given.h5", "/wide/given")
    assert (data.tobytes(), dtype, chunks) == (WIDE.tobytes(), WIDE.dtype, (64, 32))
    data, dtype, _, _, _ = h5_contents(tmp_path / "records.h5", "/wide/records")
    assert dtype == REC and data.tobytes() == RECORDS.tobytes()
    back = np.load(tmp_path / "records.npy")
    assert back.dtype == REC and back.tobytes() == RECORDS.tobytes()
    # What a format cannot hold exactly is refused, not converted: nothing is written.
    ok(embedded.env, "put", "wide/times", str(files / "times.npy"), "--chunks", "auto")
    no_subarray, no_datetime = run_many(
        embedded.env,
        ["get", "wide/records", "-o", str(tmp_path / "records.zarr")],
        ["get", "wide/times", "-o", str(tmp_path / "times.h5")],
    )
    assert_fails(no_subarray, "zarr cannot keep the dtype", "export it to a .h5 or .npy file")
    assert_fails(no_datetime, "HDF5 cannot hold the dtype datetime64[m]", "export it to a .npy or .zarr file")
    assert sorted(os.listdir(tmp_path)) == ["given.h5", "records.h5", "records.npy"]


def test_zarr_v3_and_v2_round_trip_and_unwritten_chunks_stay_unwritten(embedded, files, tmp_path):
    v3, v2 = ok_many(embedded.env, ["put", "z/v3", str(files / "v3.zarr")], ["put", "z/v2", str(files / "v2.zarr")])
    assert "chunks (7, 5)" in v3 and "6 attrs" in v3 and "chunks (3, 2)" in v2
    details = info(embedded.env, "z/v3")["dataset"]
    assert details["fillvalue"] == 1.5 and details["attrs"] == ATTRS
    ok_many(
        embedded.env,
        ["get", "z/v3", "-o", str(tmp_path / "v3.zarr")],
        ["get", "z/v2", "-o", str(tmp_path / "v2.zarr")],
        ["get", "z/v3", "-o", str(tmp_path / "v3.h5")],
    )
    source, back = zarr.open_array(str(files / "v3.zarr"), mode="r"), zarr.open_array(str(tmp_path / "v3.zarr"))
    assert (back.metadata.zarr_format, back.dtype, back.chunks, back.fill_value) == (3, np.float32, (7, 5), 1.5)
    assert back.attrs.asdict() == ATTRS
    np.testing.assert_array_equal(back[...], source[...])
    records = zarr.open_array(str(tmp_path / "v2.zarr"), mode="r")
    assert (
        records.metadata.zarr_format == 2 and records.dtype == FLAT.dtype and records[...].tobytes() == FLAT.tobytes()
    )
    data, _, chunks, fill, attrs = h5_contents(tmp_path / "v3.h5", "/z/v3")
    np.testing.assert_array_equal(data, source[...])
    assert (chunks, fill, attrs) == ((7, 5), 1.5, ATTRS)

    # A dataset written in part from Python: its unwritten chunks are left out of the files too.
    with Client(embedded.address, timeout=WAIT) as client:
        fabric = datafabric.connect(client)
        with fabric.create_dataset("z/sparse", (40, 30), "i2", chunks=(10, 10), fillvalue=-1) as ds:
            ds[8:18, 3:7] = 5  # two chunks of twelve
        expected = np.full((40, 30), -1, "i2")
        expected[8:18, 3:7] = 5
    ok_many(
        embedded.env,
        ["get", "z/sparse", "-o", str(tmp_path / "sparse.h5")],
        ["get", "z/sparse", "-o", str(tmp_path / "sparse.zarr")],
        ["get", "z/sparse", "-o", str(tmp_path / "sparse.npy")],
        ["get", "z/sparse", "-o", str(tmp_path / "sparse.bin")],
    )
    with h5py.File(tmp_path / "sparse.h5", "r") as f:
        assert f["z/sparse"].id.get_num_chunks() == 2
        np.testing.assert_array_equal(f["z/sparse"][...], expected)
    z = zarr.open_array(str(tmp_path / "sparse.zarr"), mode="r")
    assert z.nchunks_initialized == 2
    np.testing.assert_array_equal(z[...], expected)
    np.testing.assert_array_equal(np.load(tmp_path / "sparse.npy"), expected)
    assert (tmp_path / "sparse.bin").read_bytes() == expected.tobytes()


def test_npy_with_chunks_is_a_dataset_and_without_them_a_variable(embedded, files, tmp_path):
    source = files / "big.npy"
    chunked, plain = ok_many(
        embedded.env,
        ["put", "npy/chunked", str(source), "--chunks", "8,8"],
        ["put", "npy/plain", str(source)],
    )
    assert "dataset (23, 17) >f8, chunks (8, 8)" in chunked and plain.startswith("put npy/plain: 3.1 KiB on ")
    assert info(embedded.env, "npy/chunked")["dataset"]["written"] == 3 * 3
    assert "dataset" not in info(embedded.env, "npy/plain")
    ok_many(
        embedded.env,
        ["get", "npy/chunked", "-o", str(tmp_path / "chunked.npy")],
        ["get", "npy/plain", "-o", str(tmp_path / "plain.h5")],
        ["get", "npy/plain", "-o", str(tmp_path / "plain.zarr")],
    )
    assert (tmp_path / "chunked.npy").read_bytes() == source.read_bytes()
    expected = np.load(source)
    data, dtype, _, _, _ = h5_contents(tmp_path / "plain.h5", "/npy/plain")
    assert dtype == expected.dtype and data.tobytes() == expected.tobytes()
    z = zarr.open_array(str(tmp_path / "plain.zarr"), mode="r")
    assert z.dtype == expected.dtype and z[...].tobytes() == expected.tobytes()


def test_bad_input_is_refused_and_creates_nothing(embedded, files, tmp_path):
    fields = files / "fields.h5"
    ok_many(embedded.env, ["put", "taken", str(files / "wide.h5")], ["put", "refused/small", str(files / "big.npy")])
    results = run_many(
        embedded.env,
        ["put", "bad/missing", str(tmp_path / "nope.h5")],
        ["put", "bad/inner", f"{fields}:/run1/fields/nope"],
        ["put", "bad/group", f"{fields}:/run1"],
        ["put", "bad/several", str(fields)],
        ["put", "bad/vlen", f"{fields}:/labels"],
        ["put", "bad/fake", str(files / "fake.h5")],
        ["put", "bad/dir", str(tmp_path)],
        ["put", "taken", str(files / "wide.h5")],
    )
    expected = [
        "nope.h5: no such file or directory",
        "nothing is at /run1/fields/nope, not a dataset; its datasets: /labels, /records, /run1/fields/t",
        "/run1 is a group, not a dataset",
        "holds 3 datasets (/labels, /records, /run1/fields/t): name one, as",
        "holds variable-length values (object)",
        "is not an HDF5 file h5py can open",
        "is a directory",
        "'taken' exists already",
    ]
    for result, fragment in zip(results, expected, strict=True):
        assert_fails(result, fragment)
    usage = run_many(
        embedded.env,
        ["put", "bad/chunks", str(files / "wide.h5"), "--chunks", "0,4"],
        ["put", "bad/type", str(files / "wide.h5"), "--type", "10 * int32"],
        ["put", "bad/raw", str(files / "fake.h5") + ".bin", "--chunks", "4"],
    )
    assert_fails(usage[0], "every chunk length must be at least 1", status=2)
    assert_fails(usage[1], "carries its own type: --type is for raw files", status=2)
    assert_fails(usage[2], "--chunks makes a dataset of a .h5, .zarr or .npy file", status=2)
    listed = [row["name"] for row in json.loads(ok(embedded.env, "ls", "bad/", "--json"))]
    assert listed == []

    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.h5").write_bytes(b"old")
    exists, nothing, root = run_many(
        embedded.env,
        ["get", "taken", "-o", str(out / "kept.h5")],
        ["get", "bad/missing", "-o", str(out / "missing.h5")],
        ["get", "taken", "-o", f"{out / 'root.h5'}:/"],
    )
    assert_fails(exists, "kept.h5 exists already: pass --force to replace it")
    assert_fails(nothing, "no variable named 'bad/missing'")
    assert_fails(root, "cannot create / in")
    assert sorted(os.listdir(out)) == ["kept.h5"] and (out / "kept.h5").read_bytes() == b"old"
    ok(embedded.env, "get", "taken", "-o", str(out / "kept.h5"), "--force")
    assert h5_contents(out / "kept.h5", "/taken")[0].tobytes() == WIDE.tobytes()
    ok(embedded.env, "get", "taken", "-o", str(out / "t.zarr"))
    assert_fails(run(embedded.env, "get", "refused/small", "-o", str(out / "t.zarr")), "t.zarr exists already")
    ok(embedded.env, "get", "refused/small", "-o", str(out / "t.zarr"), "--force")  # a directory replaced
    assert zarr.open_array(str(out / "t.zarr"), mode="r").shape == (23, 17)
    assert sorted(os.listdir(out)) == ["kept.h5", "t.zarr"]  # no temporary left


def test_an_import_that_runs_out_of_space_leaves_no_dataset_and_no_memory(embedded, tmp_path):
    big = tmp_path / "big.h5"
    with h5py.File(big, "w") as f:  # 96 MiB in 4 MiB chunks, in a 64 MiB fabric
        f.create_dataset("x", data=np.ones((96, 2**20), "u1"), chunks=(4, 2**20))
    used = _used(embedded.env)
    assert_fails(run(embedded.env, "put", "huge", str(big)), "free in one piece")
    assert "huge" not in [row["name"] for row in json.loads(ok(embedded.env, "ls", "--json"))]
    wait_for(lambda: _used(embedded.env) == used, "the aborted import's chunks to be freed")


def _used(env) -> int:
    return sum(row["used"] for row in json.loads(ok(env, "status", "--json"))["blocks"])


def test_a_put_killed_mid_import_leaves_no_dataset_and_no_memory(embedded, tmp_path):
    many = tmp_path / "many.h5"
    with h5py.File(many, "w") as f:  # 32 MiB in 1,024 chunks: long enough to be killed halfway
        f.create_dataset("x", data=np.arange(2**22, dtype="f8").reshape(2048, 2048), chunks=(64, 64))
    with Client(embedded.address, timeout=WAIT) as client:
        fabric = datafabric.connect(client)
        used = sum(row["used"] for row in fabric.status())
        proc = subprocess.Popen([DATAFABRIC, "put", "killed", str(many)], env=embedded.env)
        try:
            wait_for(lambda: sum(row["used"] for row in fabric.status()) > used + 2**22, "4 MiB of chunks imported")
        finally:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(WAIT) == -signal.SIGKILL  # killed before the import ended
        wait_for(lambda: sum(row["used"] for row in fabric.status()) == used, "the killed import's chunks to be freed")
        assert "killed" not in fabric.get_list() and "killed" not in fabric.datasets()


def test_the_readme_file_commands_run_as_written(embedded, tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("### Files in and out", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]
    assert len(commands) == 10 and all(c[0] == "datafabric" for c in commands)
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f.create_dataset("fields/t", data=TEMPS, chunks=(8, 8))
    zarr.create_array(str(tmp_path / "dir.zarr"), shape=(10, 10), chunks=(5, 5), dtype="u2")[...] = 3
    np.save(tmp_path / "big.npy", WIDE)
    np.save(tmp_path / "small.npy", TEMPS[:3])
    for command in commands:
        result = run(embedded.env, *command[1:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
    assert h5_contents(tmp_path / "out.h5", "/run1/t")[0].tobytes() == TEMPS.tobytes()
    assert zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...].tobytes() == TEMPS.tobytes()
    assert np.load(tmp_path / "out.npy").tobytes() == TEMPS.tobytes()
