"""A cluster whose scheduler serves HTTP on a free loopback port, and a plain HTTP client
for the fabric's API (the standard library's, as any language would use)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import pytest
from distributed import Client

import datafabric
from tests.conftest import local_cluster

API = "/fabric/api/v1/"


def http_cluster(**options: Any):
    return local_cluster(**{"dashboard_address": "127.0.0.1:0", **options})


def http_port(cluster: Any) -> int:
    return cluster.scheduler.http_server.port


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | None = None, **params: Any) -> Answer:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path + (f"?{query}" if query else ""), body=body)
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def api(port: int, method: str, route: str, body: bytes | None = None, **params: Any) -> Answer:
    return request(port, method, API + urllib.parse.quote(route), body, **params)


@pytest.fixture(scope="module")
def hcluster():
    with http_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def hclient(hcluster):
    with Client(hcluster) as client:
        yield client


@pytest.fixture
def hfabric(hclient):
    fabric = datafabric.start(hclient, mb=128)
    yield fabric
    fabric.shutdown()


@pytest.fixture
def port(hcluster, hfabric):
    return http_port(hcluster)
