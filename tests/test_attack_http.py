"""Adversarial tests of the HTTP API against datasets: ``DELETE data/NAME`` must do what
``fabric.delete`` does for every kind of name (a dataset goes; the fabric's own chunk
variables are refused), on a real cluster serving HTTP."""

from __future__ import annotations

import dask
import numpy as np

from datafabric.names import chunk_name
from tests.http_helpers import api
from tests.waiting import wait_for

pytest_plugins = ("tests.http_helpers",)  # the cluster and fabric fixtures with HTTP


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def test_http_delete_refuses_a_chunk_and_deletes_a_dataset(hfabric, port):
    before = used(hfabric)
    with hfabric.create_dataset("web/ds", (8, 8), np.int16, chunks=(4, 8), fillvalue=-1) as ds:
        ds[...] = np.arange(64, dtype=np.int16).reshape(8, 8)
    with dask.config.set({"datafabric.http.writable": True}):
        r = api(port, "DELETE", f"data/{chunk_name(ds.id, 1)}")
        assert r.status == 404 and r.json["error"] == "NameNotFoundError", r.body  # no entry has a chunk's name
        np.testing.assert_array_equal(hfabric.dataset("web/ds")[...], np.arange(64, dtype=np.int16).reshape(8, 8))
        r = api(port, "DELETE", "data/web/ds")
        assert r.status == 200 and r.json == {"deleted": "web/ds"}, r.body
        assert "web/ds" not in hfabric
        assert api(port, "DELETE", "data/web/ds").status == 404
    wait_for(lambda: used(hfabric) == before, "the dataset's chunks to be freed")


def test_http_names_list_a_dataset_once_and_never_its_chunks(hfabric, port):
    """``GET names`` lists what ``get_list`` lists: a sealed dataset as one entry, its
    ``.dfab/`` chunk variables nowhere, whatever the prefix."""
    hfabric.insert("listed/var", "", np.int8, np.zeros(3, np.int8))
    with hfabric.create_dataset("listed/ds", (10,), np.float32, chunks=(3,), fillvalue=0) as ds:
        ds[...] = 1.0
    page = api(port, "GET", "names").json
    assert [e["name"] for e in page["entries"]] == hfabric.get_list() == ["listed/ds", "listed/var"]
    assert page["total"] == 2 and page["entries"][0]["kind"] == "dataset" and page["entries"][0]["nbytes"] == 40
    assert api(port, "GET", "names", prefix=".dfab/").json == {"entries": [], "total": 0, "next": None}
    hfabric.delete_prefix("listed/")
    assert api(port, "GET", "names").json["total"] == 0
