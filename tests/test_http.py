"""The HTTP/JSON API against a live fabric: every route, its refusals, pagination, slices
compared with numpy, the write switch, leases that lapse, streaming from another node, and
a client that hangs up mid-response."""

from __future__ import annotations

import io
import socket
import time

import dask
import numpy as np
import pytest

import datafabric
from tests.conftest import simulated_nodes
from tests.http_helpers import api, http_port, request
from tests.waiting import wait_for

pytest_plugins = ("tests.http_helpers",)  # the cluster and fabric fixtures with HTTP

MiB = 2**20


def yellowpages(hcluster):
    return hcluster.scheduler.plugins["datafabric-yellowpages"]


def writable(on: bool = True):
    return dask.config.set({"datafabric.http.writable": on})


def test_the_routes_need_no_new_port(hcluster, hfabric):
    page = hfabric.web_page()
    assert page == f"http://127.0.0.1:{http_port(hcluster)}/fabric/"
    r = request(http_port(hcluster), "GET", "/fabric/")
    assert r.status == 200 and b"datafabric" in r.body and r.headers["content-type"].startswith("text/html")


def test_names_paginate_over_ten_thousand(hfabric, port):
    items = [(f"many/{i:05d}", f"item {i}", np.int32, np.array([i], np.int32)) for i in range(10_000)]
    hfabric.insert_many(items)
    hfabric.insert("other", "", np.int8, np.zeros(3, np.int8))
    seen, after = [], None
    while True:
        page = api(port, "GET", "names", prefix="many/", limit=3000, after=after).json
        assert page["total"] == 10_000
        seen += [e["name"] for e in page["entries"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [name for name, *_ in items]
    first = api(port, "GET", "names", limit=2).json
    assert [e["name"] for e in first["entries"]] == ["many/00000", "many/00001"] and first["total"] == 10_001
    assert first["entries"][0] | {"nodes": None} == {
        "name": "many/00000",
        "kind": "variable",
        "doc": "item 0",
        "type": "1 * int32",
        "nbytes": 4,
        "nodes": None,
    }
    for bad in (0, 10_001, "x"):
        r = api(port, "GET", "names", limit=bad)
        assert r.status == 400 and r.json["error"] == "InvalidArgumentError"


def test_info_and_status(hfabric, port):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    hfabric.insert("run1/temps", "2 m air temperature", np.float32, a)
    info = api(port, "GET", "info/run1/temps").json
    assert info["shape"] == [3, 4] and info["dtype"] == "<f4" and info["nbytes"] == 48
    assert info["type"] == "3 * 4 * float32" and info["doc"] == "2 m air temperature"
    assert [(loc["node"], loc["shm_id"], loc["data_offset"]) for loc in info["locations"]] == [
        tuple(loc) for loc in hfabric.get_locations("run1/temps")
    ]
    status = api(port, "GET", "status").json
    assert status["names"] == 1 and sum(b["variables"] for b in status["blocks"]) == 1
    assert sum(n["capacity"] for n in status["nodes"].values()) == sum(b["capacity"] for b in hfabric.status())
    for route, code in [("info/nope", 404), ("info/" + "x" * 300, 400), ("data/nope", 404), ("lease/nope", 404)]:
        r = api(port, "POST" if route.startswith("lease") else "GET", route)
        assert r.status == code, (route, r.body)
        assert set(r.json) == {"error", "message"}
    not_utf8 = request(port, "GET", "/fabric/api/v1/info/%ff")  # refused by tornado itself, in JSON too
    assert not_utf8.status == 400 and not_utf8.json["error"] == "HTTPError"


@pytest.mark.parametrize(
    "dtype, shape, slices",
    [
        ("<f8", (40, 30), ["0:10,5", "::3,::-4", "-1", "5", "2:7", "-5:-1,1:29:7", ""]),
        ("<i2", (7, 6, 5), ["1,2", "::2,1,::-1", "-1,-1,-1", "3:5", ":,:,2"]),
        ("u1", (1000,), ["::7", "-10:", "999", "10:0:-3"]),
        ("<c8", (9, 9), ["::-1,::-1", "4"]),
    ],
)
def test_slices_read_what_numpy_reads(hfabric, port, dtype, shape, slices):
    a = (np.arange(np.prod(shape)) * 13 % 255).astype(dtype).reshape(shape)
    hfabric.insert("a", "", a.dtype, a)
    for text in slices:
        expected = a[tuple(_numpy_index(text))]
        raw = api(port, "GET", "data/a", slice=text)
        assert raw.status == 200, raw.body
        got = np.frombuffer(raw.body, dtype).reshape(
            [int(n) for n in raw.headers["x-datafabric-shape"].split(",") if n]
        )
        np.testing.assert_array_equal(got, expected)
        assert raw.headers["x-datafabric-dtype"] == np.dtype(dtype).str
        npy = np.load(io.BytesIO(api(port, "GET", "data/a", slice=text, format="npy").body))
        np.testing.assert_array_equal(npy, expected)
        assert npy.dtype == np.dtype(dtype)
    values = api(port, "GET", "data/a", slice=slices[0], format="json").json
    assert values["shape"] == list(a[tuple(_numpy_index(slices[0]))].shape)


def _numpy_index(text: str) -> list:
    def part(p: str):
        if ":" not in p:
            return int(p)
        return slice(*[int(x) if x else None for x in p.split(":")])

    return [part(p) for p in text.split(",")] if text else []


def test_bad_data_requests_change_nothing(hfabric, port):
    hfabric.insert("b", "", np.float64, np.zeros((4, 4)))
    for params in ({"slice": "9"}, {"slice": "1,2,3"}, {"slice": "a"}, {"format": "xml"}, {"slice": "::0"}):
        r = api(port, "GET", "data/b", **params)
        assert r.status == 400 and r.json["error"] == "InvalidArgumentError", params
    assert api(port, "GET", "data/b", format="png", slice="1").status == 400  # not 2-D
    assert not yellowpages_of(hfabric).directory.lookup("b").leases


def yellowpages_of(fabric):
    return fabric._ctx().client.cluster.scheduler.plugins["datafabric-yellowpages"]


def test_png_of_a_2d_slice(hfabric, port):
    a = np.arange(3 * 20 * 30, dtype=np.float64).reshape(3, 20, 30)
    hfabric.insert("cube", "", np.float64, a)
    r = api(port, "GET", "data/cube", format="png", slice="1")
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    assert r.body[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(r.body[16:20], "big") == 30


def test_writes_are_off_by_default(hfabric, port):
    hfabric.insert("keep", "", np.int8, np.ones(4, np.int8))
    with writable(False):
        r = api(port, "PUT", "data/new", b"\0" * 8, type="8 * int8")
        assert r.status == 403 and "datafabric.http.writable" in r.json["message"]
        assert api(port, "DELETE", "data/keep").status == 403
    assert hfabric.get_list() == ["keep"]


def test_put_and_delete_when_switched_on(hfabric, port):
    a = np.arange(100, dtype=np.float64).reshape(10, 10)
    with writable():
        r = api(port, "PUT", "data/up/a", a.tobytes(), type="10 * 10 * float64", doc="uploaded")
        assert r.status == 201, r.body
        np.testing.assert_array_equal(hfabric.get("up/a"), a)
        assert hfabric.info("up/a")["doc"] == "uploaded"
        assert api(port, "PUT", "data/up/a", a.tobytes(), type="10 * 10 * float64").status == 409
        assert api(port, "PUT", "data/up/b", a.tobytes(), type="3 * float64").status == 400  # size mismatch
        assert api(port, "PUT", "data/up/c", b"", type="T").status == 400  # abstract type
        assert api(port, "PUT", "data/up/d", b"1").status == 400  # no type
        big = _headers_only(port, "PUT", "/fabric/api/v1/data/up/big?type=1073741824%20*%20uint8", 2**30)
        assert big.startswith(b"HTTP/1.1 413"), big[:200]
        assert api(port, "DELETE", "data/up/a").json == {"deleted": "up/a"}
        assert api(port, "DELETE", "data/up/a").status == 404
    assert hfabric.get_list() == []
    assert sum(b["used"] for b in hfabric.status()) == 0  # nothing half-written kept


def _headers_only(port: int, method: str, path: str, length: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        return s.recv(65536)


def test_a_put_cut_short_leaves_nothing(hfabric, port):
    with writable(), socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"PUT /fabric/api/v1/data/cut?type=1048576%20*%20uint8 HTTP/1.1\r\nHost: x\r\n")
        s.sendall(b"Content-Length: 1048576\r\n\r\n" + b"\1" * 1000)
        wait_for(lambda: sum(b["used"] for b in hfabric.status()) > 0, "the reservation")
    wait_for(lambda: sum(b["used"] for b in hfabric.status()) == 0, "the reservation given back")
    assert hfabric.get_list() == []


def test_a_lapsed_lease_lets_a_delete_free_the_memory(hfabric, port):
    hfabric.insert("leased", "", np.uint8, np.full(MiB, 7, np.uint8))
    used = sum(b["used"] for b in hfabric.status())
    lease = api(port, "POST", "lease/leased", ttl=1.5)
    assert lease.status == 201
    body = lease.json
    assert body["type"] == "1048576 * uint8" and body["fabric_id"] == hfabric.fabric_id
    [loc] = body["locations"]
    assert {"node", "shm_id", "data_offset", "extent_offset", "extent_id"} <= set(loc)
    with writable():
        assert api(port, "DELETE", "data/leased").status == 200
    assert sum(b["used"] for b in hfabric.status()) == used  # held by the live lease
    wait_for(lambda: sum(b["used"] for b in hfabric.status()) == 0, "the memory freed once the lease lapsed", 30)
    assert api(port, "DELETE", f"lease/{body['lease']}").status == 404


def test_a_renewed_lease_keeps_the_memory_and_a_release_frees_it(hfabric, port):
    hfabric.insert("kept", "", np.uint8, np.full(MiB, 9, np.uint8))
    lease = api(port, "POST", "lease/kept", ttl=1).json["lease"]
    with writable():
        assert api(port, "DELETE", "data/kept").status == 200
    for _ in range(5):  # 2.5 s past its first expiry: time itself is what is tested here
        assert api(port, "POST", "lease/kept", ttl=1, lease=lease).status == 200
        time.sleep(0.5)
    assert sum(b["used"] for b in hfabric.status()) > 0
    assert api(port, "POST", "lease/other", ttl=1, lease=lease).status == 400  # a lease is on one name
    assert api(port, "DELETE", f"lease/{lease}").status == 200
    wait_for(lambda: sum(b["used"] for b in hfabric.status()) == 0, "the memory freed at release")
    for ttl in ("0", "-1", "nan", "1e9", "x"):
        assert api(port, "POST", "lease/kept", ttl=ttl).status == 400


def test_a_client_hanging_up_ends_the_lease(hfabric, hcluster, port):
    hfabric.insert("big", "", np.uint8, np.zeros(48 * MiB, np.uint8))
    var = yellowpages(hcluster).directory.lookup("big")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /fabric/api/v1/data/big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        wait_for(lambda: var.leases, "the response's lease")
    wait_for(lambda: not var.leases, "the lease released when the client hung up")


def test_no_fabric_is_a_404(hcluster, hclient):
    r = api(http_port(hcluster), "GET", "names")
    assert r.status == 404 and r.json["error"] == "NoFabricError"


def test_data_streams_from_the_owner_when_the_scheduler_cannot_map_it():
    """Two simulated nodes, and a scheduler that is on neither: every piece comes from the
    owning worker's ``read``, and reads the same bytes as numpy."""
    from yp.http.source import map_read_only

    with simulated_nodes(("node-a", "node-b"), dashboard_address="127.0.0.1:0") as (cluster, client):
        fabric = datafabric.start(client, mb=96)
        try:
            a = np.random.default_rng(1).random((2500, 1000))  # 20 MB: three pieces
            client.submit(
                lambda f: f.insert("far", "", np.float64, a) and None,
                fabric,
                workers=[w for w in client.scheduler_info()["workers"]][:1],
            ).result()
            port = cluster.scheduler.http_server.port
            [(node, shm_id, _)] = fabric.get_locations("far")
            with dask.config.set({"datafabric.node-id": "node-s"}):
                assert map_read_only(shm_id, node, fabric.fabric_id) is None
                raw = api(port, "GET", "data/far")
                part = api(port, "GET", "data/far", slice="::-7,3:900:11")
            assert map_read_only(shm_id, node, fabric.fabric_id) is not None  # the same machine otherwise
            np.testing.assert_array_equal(np.frombuffer(raw.body).reshape(a.shape), a)
            np.testing.assert_array_equal(np.frombuffer(part.body).reshape(a[::-7, 3:900:11].shape), a[::-7, 3:900:11])
            var = cluster.scheduler.plugins["datafabric-yellowpages"].directory.lookup("far")
            assert not var.leases
        finally:
            fabric.shutdown()
