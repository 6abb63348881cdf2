"""A client command pointed at something that is not a scheduler: a Dask worker (the
first tcp:// that `start` prints is a worker's), the dashboard's HTTP port, a service
that is not Dask, a closed port.  Each is refused in one line naming what answered,
with a non-zero exit, within the timeout and a margin for starting Python."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from distributed import Client, LocalCluster

from tests.cli_helpers import assert_fails, env_for, free_address, run_many

TIMEOUT = 2.0
MARGIN = 6.0  # seconds for the command's own start: importing Dask on a loaded machine


@pytest.fixture(scope="module")
def cluster_addresses():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0")
    with cluster, Client(cluster) as client:
        [worker] = client.scheduler_info()["workers"]
        port = cluster.scheduler.http_server.port
        yield {"scheduler": cluster.scheduler_address, "worker": worker, "dashboard": f"tcp://127.0.0.1:{port}"}


@pytest.fixture
def garbage_server():
    """Sends bytes that read as an 8-byte frame count of exabytes, then waits."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.sendall(b"\xff" * 64)
            conns.append(conn)
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    server.close()


def test_wrong_addresses_are_refused_in_one_line_within_the_timeout(tmp_path, cluster_addresses, garbage_server):
    (tmp_path / "x.bin").write_bytes(b"\0" * 8)
    targets = {
        "worker": (cluster_addresses["worker"], "is a Dask worker, not a scheduler", cluster_addresses["scheduler"]),
        "dashboard": (cluster_addresses["dashboard"], "is an HTTP server", "not a Dask scheduler"),
        "garbage": (garbage_server, "something that is not Dask", "not a Dask scheduler"),
        "closed": (free_address(), "nothing listens there", "cannot reach the scheduler"),
    }
    commands = []
    for address, *_ in targets.values():
        commands.append(["ls", "--scheduler", address, "--timeout", str(TIMEOUT)])
        commands.append(
            ["put", "x", str(tmp_path / "x.bin"), "--type", "int64", "-s", address, "--timeout", str(TIMEOUT)]
        )
    results = []
    for command in commands:  # one at a time, so that each is timed on its own
        began = time.monotonic()
        [result] = run_many(env_for(tmp_path), command)
        results.append(result)
        assert time.monotonic() - began < TIMEOUT + MARGIN, command
    for i, (what, (address, *fragments)) in enumerate(targets.items()):
        for result in results[2 * i : 2 * i + 2]:
            assert "Traceback" not in result.stderr, (what, result.stderr)
            assert_fails(result, address, *fragments)
