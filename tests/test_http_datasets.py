"""Datasets over the HTTP API: one entry in the listing (chunks never), their info with
the written chunks and where they live, selections assembled from chunks compared with
numpy (shapes, chunkings, steps, negative indices, unwritten chunks), run by run, and
delete, PUT over a dataset, leases refused, a dataset deleted while a response reads it."""

from __future__ import annotations

import io
import socket

import dask
import numpy as np
import pytest

from tests.http_helpers import API, api
from tests.waiting import wait_for
from yp.http import entries

pytest_plugins = ("tests.http_helpers",)


def yellowpages(hcluster):
    return hcluster.scheduler.plugins["datafabric-yellowpages"]


def writable(on: bool = True):
    return dask.config.set({"datafabric.http.writable": on})


def npy(answer) -> np.ndarray:
    assert answer.status == 200, answer.body[:300]
    return np.load(io.BytesIO(answer.body))


def expected(full: np.ndarray, key: tuple) -> np.ndarray:
    return np.array(full[key])  # 0-d for a single element, as the answer is


def slice_text(key: tuple) -> str:
    def part(k):
        if isinstance(k, int):
            return str(k)
        return ":".join("" if v is None else str(v) for v in (k.start, k.stop, k.step))

    return ",".join(part(k) for k in key)


def test_the_listing_shows_datasets_as_one_entry_and_never_chunks(hfabric, port):
    hfabric.insert("a/var", "a variable", np.int32, np.arange(4, dtype=np.int32))
    hfabric.create_dataset("a/ds", data=np.arange(60.0).reshape(6, 10), chunks=(2, 4), doc="a dataset")
    hfabric.insert("a/zz", "", np.int8, np.zeros(2, np.int8))
    hfabric.create_dataset("b/other", data=np.ones(5, np.int16), chunks=2)
    page = api(port, "GET", "names", prefix="a/").json
    assert [e["name"] for e in page["entries"]] == ["a/ds", "a/var", "a/zz"] and page["total"] == 3
    assert page["entries"][0] == {
        "name": "a/ds",
        "kind": "dataset",
        "doc": "a dataset",
        "type": "6 * 10 * float64",
        "shape": [6, 10],
        "dtype": "<f8",
        "chunks": [2, 4],
        "nbytes": 480,
    }
    assert page["entries"][1]["kind"] == "variable"
    everything = api(port, "GET", "names").json
    assert [e["name"] for e in everything["entries"]] == ["a/ds", "a/var", "a/zz", "b/other"]
    assert everything["total"] == 4 and everything["next"] is None
    assert api(port, "GET", "names", prefix=".dfab/").json == {"entries": [], "total": 0, "next": None}
    seen, after = [], None
    while True:  # pages of one: the merge of variables and datasets pages too
        p = api(port, "GET", "names", limit=1, after=after).json
        seen += [e["name"] for e in p["entries"]]
        after = p["next"]
        if after is None:
            break
    assert seen == ["a/ds", "a/var", "a/zz", "b/other"]
    assert api(port, "GET", "names", limit=1, after="a/var").json["next"] == "a/zz"


def test_info_of_a_dataset_says_which_chunks_are_written_and_where(hcluster, hfabric, port):
    with hfabric.create_dataset("info/ds", shape=(5, 7), dtype=np.float32, chunks=(2, 3), fillvalue=-1) as ds:
        ds[0:2, 0:3] = 1.0
        ds[4, 6] = 2.0
    info = api(port, "GET", "info/info/ds").json
    assert info | {"written": None} == {
        "name": "info/ds",
        "kind": "dataset",
        "doc": "",
        "type": "5 * 7 * float32",
        "shape": [5, 7],
        "dtype": "<f4",
        "chunks": [2, 3],
        "nbytes": 140,
        "attrs": {},
        "grid": [3, 3],
        "nchunks": 9,
        "fillvalue": -1.0,
        "written": None,
        "locations": [],
    }
    assert [(w["flat"], w["index"]) for w in info["written"]] == [(0, [0, 0]), (8, [2, 2])]
    nodes = {b.node for b in yellowpages(hcluster).directory.blocks.values()}
    assert all(len(w["nodes"]) == 1 and w["nodes"][0] in nodes for w in info["written"])


@pytest.mark.parametrize(
    ("shape", "chunks", "keys"),
    [
        ((37,), (5,), [(), (slice(3, 30, 4),), (slice(None, None, -3),), (-1,), (slice(-10, -2),)]),
        (
            (13, 17),
            (4, 5),
            [
                (),
                (slice(2, 11), slice(3, 16, 2)),
                (slice(None, None, -2), slice(None, None, -5)),
                (-3,),
                (slice(None), -1),
                (5, 7),
                (slice(12, 0, -7), slice(1, 2)),
                (slice(5, 5),),
            ],
        ),
        ((6, 5, 9), (4, 2, 4), [(), (1,), (slice(None), 3), (slice(1, 6, 2), slice(None, None, -1), slice(8, 0, -3))]),
    ],
)
def test_selections_equal_numpys_with_unwritten_chunks_as_the_fill_value(hfabric, port, shape, chunks, keys):
    full = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) * 3 - 7
    with hfabric.create_dataset("sel/ds", shape=shape, dtype=np.int64, chunks=chunks, fillvalue=99) as ds:
        written = tuple(slice(0, max(1, n // 2)) for n in shape)  # about one corner: the rest is never written
        ds[written] = full[written]
    truth = np.full(shape, 99, np.int64)
    truth[written] = full[written]
    for key in keys:
        text = slice_text(key)
        got = npy(api(port, "GET", "data/sel/ds", format="npy", slice=text))
        want = expected(truth, key)
        assert got.shape == want.shape and np.array_equal(got, want), text
        raw = api(port, "GET", "data/sel/ds", slice=text)
        assert raw.body == want.tobytes() and raw.headers["x-datafabric-shape"] == ",".join(map(str, want.shape))
        if want.size <= entries_json_limit():
            assert api(port, "GET", "data/sel/ds", format="json", slice=text).json["values"] == want.tolist()


def entries_json_limit() -> int:
    from yp.http.routes import MAX_JSON_VALUES

    return MAX_JSON_VALUES


def test_a_large_selection_is_read_in_runs_that_each_fit_a_piece(hcluster, hfabric, port, monkeypatch):
    data = np.random.default_rng(1).random((300, 211))
    hfabric.create_dataset("big/ds", data=data, chunks=(64, 50))
    monkeypatch.setattr(entries, "PIECE", 4096)  # a row of 211 float64 is 1688 bytes: two rows a run
    yp = yellowpages(hcluster)
    chosen = entries.opened_dataset(yp.directory.datasets["big/ds"], "::-1,3:")
    runs = chosen.runs()
    assert len(runs) == 150 and all(r.shape[0] <= 2 for r, _ in runs)
    got = npy(api(port, "GET", "data/big/ds", format="npy", slice="::-1,3:"))
    assert np.array_equal(got, data[::-1, 3:])
    assert np.array_equal(npy(api(port, "GET", "data/big/ds", format="npy")), data)


def test_records_and_an_image_of_a_dataset(hfabric, port):
    y, x = np.mgrid[0:40, 0:60]
    hfabric.create_dataset("img/ds", data=(x + y).astype(np.float32), chunks=(16, 16))
    png = api(port, "GET", "data/img/ds", format="png")
    assert png.status == 200 and png.headers["content-type"] == "image/png" and png.body.startswith(b"\x89PNG")
    width, height = int.from_bytes(png.body[16:20], "big"), int.from_bytes(png.body[20:24], "big")
    assert (width, height) == (60, 40)
    rec = np.zeros(7, dtype=[("a", "<i4"), ("b", "<f8")])
    rec["a"], rec["b"] = np.arange(7), np.arange(7) / 2
    hfabric.create_dataset("img/rec", data=rec, chunks=3)
    assert np.array_equal(npy(api(port, "GET", "data/img/rec", format="npy", slice="1::2")), rec[1::2])


def test_refusals_of_datasets(hcluster, hfabric, port):
    ds = hfabric.create_dataset("ref/ds", data=np.arange(10), chunks=4)
    assert api(port, "GET", "data/ref/ds", slice="10").status == 400
    assert api(port, "GET", "data/ref/ds", slice="0,0").status == 400
    assert api(port, "GET", "data/ref/ds", format="png").status == 400  # 1-D
    r = api(port, "POST", "lease/ref/ds")
    assert r.status == 400 and "leases are per variable" in r.json["message"]
    with writable():
        assert api(port, "PUT", "data/ref/ds", b"\0" * 8, type="1 * int64").status == 409
    chunk = yellowpages(hcluster).directory.names(".dfab/")[0]
    for method, route in (("GET", "data/"), ("GET", "info/"), ("POST", "lease/")):
        assert api(port, method, route + chunk).status == 404
    with hfabric.create_dataset("ref/open", shape=(4,), dtype=np.int8, chunks=2):
        assert api(port, "GET", "data/ref/open").status == 409
        assert api(port, "GET", "info/ref/open").status == 409
    assert api(port, "DELETE", "data/ref/ds").status == 403  # the write switch is off
    with writable():
        assert api(port, "DELETE", "data/ref/ds").json == {"deleted": "ref/ds"}
    assert api(port, "GET", "info/ref/ds").status == 404
    assert "ref/ds" not in hfabric.datasets()
    wait_for(lambda: not yellowpages(hcluster).directory.names(f".dfab/{ds.id}/"), what="its chunks and record freed")


def test_a_dataset_deleted_mid_response_is_read_whole_then_freed(hcluster, hfabric, port):
    data = np.arange(32 * 2**20 // 8, dtype=np.float64).reshape(4096, 1024)  # more than the sockets' buffers
    hfabric.create_dataset("mid/ds", data=data, chunks=(256, 1024))
    yp = yellowpages(hcluster)
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(f"GET {API}data/mid/ds HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        wait_for(lambda: any(v.leases for v in yp.directory.variables.values()), what="the chunks leased")
        with writable():
            assert api(port, "DELETE", "data/mid/ds").status == 200
        assert api(port, "GET", "info/mid/ds").status == 404
        body = first.split(b"\r\n\r\n", 1)[1]
        while len(body) < data.nbytes:
            more = sock.recv(1 << 20)
            assert more, "the response ended early"
            body += more
    finally:
        sock.close()
    assert np.array_equal(np.frombuffer(body, np.float64).reshape(data.shape), data)
    wait_for(lambda: not yp.directory.by_id or not yp.directory.names(".dfab/"), what="the chunks freed")
    wait_for(lambda: not any(v.leases for v in yp.directory.by_id.values()), what="the leases ended")
