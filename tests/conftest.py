"""A real cluster of worker processes for the whole session, real shared memory, and a
check that nothing of the fabric is left in /dev/shm at the end."""

from __future__ import annotations

import os

import pytest
from distributed import Client, LocalCluster

import datafabric

SHM_DIR = "/dev/shm"


def fabric_segments() -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith("dfab_")) if os.path.isdir(SHM_DIR) else []


@pytest.fixture(scope="session", autouse=True)
def no_segments_left():
    before = set(fabric_segments())
    yield
    left = sorted(set(fabric_segments()) - before)
    assert not left, f"the test session left fabric segments in {SHM_DIR}: {left}"


@pytest.fixture(scope="session")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def client(cluster):
    with Client(cluster) as client:
        yield client


@pytest.fixture
def fabric(client):
    fabric = datafabric.start(client, mb=64)
    yield fabric
    fabric.shutdown()
