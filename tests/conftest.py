"""A real cluster of worker processes for the whole session, real shared memory, and a
check that nothing of the fabric is left in /dev/shm at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dask
import pytest
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

import datafabric

SHM_DIR = "/dev/shm"

# A LocalCluster closes a worker's nanny for good when, ``lost-worker-timeout`` (15 s) after
# that worker was removed, no worker of its name is in the cluster's view.  Tests that kill
# the same worker twice within 15 s hit that window mid-restart and lose the nanny (the
# cluster then has one worker and every later test of the session fails).  Restarts here
# are the nanny's own, so the timeout is set beyond any session.
dask.config.set({"distributed.deploy.lost-worker-timeout": "1 day"})


def fabric_segments() -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith("dfab_")) if os.path.isdir(SHM_DIR) else []


def mapped_segments() -> set[str]:
    """Segments some live process maps: those of another test session running beside this
    one on the same machine, never a leak of this one (whose processes have ended)."""
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                mapped.update(line.rsplit("/", 1)[-1].strip() for line in maps if f"{SHM_DIR}/dfab_" in line)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return mapped


@pytest.fixture(scope="session", autouse=True)
def no_segments_left():
    before = set(fabric_segments())
    yield
    left = sorted(set(fabric_segments()) - before - mapped_segments())
    assert not left, f"the test session left fabric segments in {SHM_DIR}: {left}"


def local_cluster(
    n_workers: int = 2, threads_per_worker: int = 1, dashboard_address: str | None = None, **options
) -> LocalCluster:
    """Worker processes on loopback, no bokeh dashboard: the session's cluster, and the own
    cluster of a test that changes the cluster itself (limits, TLS, restarts).  The
    scheduler's HTTP server runs even so (on port 8787, or any free one if that is taken):
    ``dashboard_address="127.0.0.1:0"`` puts it on a free loopback port of the test's own."""
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=dashboard_address,
        host="127.0.0.1",
        **options,
    )


@contextmanager
def simulated_nodes(
    nodes: Sequence[str], per_node: int = 1, nthreads: int = 1, dashboard_address: str | None = None
) -> Iterator[tuple[SpecCluster, Client]]:
    """Several machines on one: ``per_node`` nanny-run worker processes for each node id in
    ``nodes`` (``datafabric.node-id`` set in each worker's environment), on loopback."""
    options = {"nthreads": nthreads, "host": "127.0.0.1"}
    workers = {
        f"{node}-{i}": {"cls": Nanny, "options": {**options, "env": {"DASK_DATAFABRIC__NODE_ID": node}}}
        for node in nodes
        for i in range(per_node)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address, "host": "127.0.0.1"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(len(workers))
        yield cluster, client


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """``datafabric start`` with its own embedded cluster, for a module of CLI tests."""
    from tests.cli_helpers import end, launch  # it uses this module's segment listing

    start = launch(tmp_path_factory.mktemp("embedded"), "--mb", "64", "--workers", "2", "--json")
    yield start
    end(start.proc)


@pytest.fixture(scope="session")
def cluster():
    with local_cluster(threads_per_worker=2) as cluster:
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
