"""Ray and Vineyard, the fabric's peers: whether each can run here, and a session that
starts its daemons for the run, on loopback only and sized for this machine, and shuts
them down in ``finally``.  Both are optional (``pip install -e .[bench]``); a peer that is
missing or fails is reported, and the fabric and Dask are measured all the same.

Any process a session started that is still alive after its shutdown is ended by pid and
reported as a stray, so a run leaves no daemon behind.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from benchmarks.cluster import GiB
from benchmarks.timing import read

PEERS = ("ray", "vineyard")
RAY_STORE_BYTES = 4 * GiB
VINEYARD_SIZE = "4Gi"

# Ray advertises (and binds to) the machine's outward address unless it is told that it
# is no cluster; then its node address, and every server it starts, is loopback.  Ray
# reads these when it is imported, and its daemons inherit them.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def _import(name: str) -> Any:
    """vineyard 0.24 imports ``pkg_resources`` and warns about it on every import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def choose(requested: list[str] | None) -> dict[str, str]:
    """For every peer: ``"to run"``, or why not."""
    status = {}
    for name in PEERS:
        if requested is not None and name not in requested:
            status[name] = "not requested"
            continue
        try:
            _import(name)
            status[name] = "to run"
        except Exception as exc:
            status[name] = f"not run: cannot import {name} ({type(exc).__name__}: {exc})"
    return status


def _children() -> set[psutil.Process]:
    return set(psutil.Process().children(recursive=True))


def _end(started: set[psutil.Process], strays: list[str]) -> None:
    """Wait for what a session started to exit after its shutdown; end the rest by pid."""
    _, alive = psutil.wait_procs(started, timeout=10)
    for p in alive:
        try:
            strays.append(f"{p.name()} (pid {p.pid})")
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextmanager
def ray_session(strays: list[str]) -> Iterator[Any]:
    ray = _import("ray")
    tmp = tempfile.mkdtemp(prefix="bench-ray-")  # its sockets, logs and spill files
    before = _children()
    try:
        ray.init(
            num_cpus=2,
            object_store_memory=RAY_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=tmp,
            # pre-faulted like the fabric's blocks, so puts are timed in the steady state,
            # not while the store's pages are first touched
            _system_config={"preallocate_plasma_memory": True},
        )
        yield ray
    finally:
        started = _children() - before  # before shutdown: its workers are the raylet's children
        ray.shutdown()
        _end(started, strays)
        shutil.rmtree(tmp, ignore_errors=True)


class RayHolder:
    """Made a Ray actor (``ray.remote(num_cpus=0)``): a reader process of Ray's own, as
    worker B is for the fabric and Vineyard."""

    def pid(self) -> int:
        return os.getpid()

    def read(self, refs: list, calls: int, sum_calls: int) -> dict:
        import ray

        return read(lambda: ray.get(refs[0]), calls, sum_calls)

    def hold(self, refs: list) -> None:
        import ray

        self.held = ray.get(refs[0])
        self.held.sum()


@contextmanager
def vineyard_session(strays: list[str]) -> Iterator[tuple[Any, str]]:
    """A ``vineyardd`` with local metadata (no etcd), no RPC port (an IPC socket only, in
    a temporary folder) and a memory limit; yields a connected client and the socket."""
    vineyard = _import("vineyard")
    vineyardd = _import("vineyard.deploy.utils").find_vineyardd_path()
    tmp = tempfile.mkdtemp(prefix="bench-vineyard-")
    socket = os.path.join(tmp, "vineyard.sock")
    command = [
        vineyardd,
        "--deployment=local",
        "--meta=local",
        "--norpc",
        f"--size={VINEYARD_SIZE}",
        f"--log_dir={tmp}",
    ]
    log_path = os.path.join(tmp, "vineyardd.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*command, f"--socket={socket}"], stdout=log, stderr=subprocess.STDOUT)
    daemon = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, errors="replace") as log:
                    tail = log.read()[-500:]
                raise RuntimeError(f"vineyardd did not start (exit code {proc.poll()}): {tail}")
            time.sleep(0.1)
        client = vineyard.connect(socket)
        try:
            yield client, socket
        finally:
            client.close()
    finally:
        started = {daemon, *daemon.children(recursive=True)} if daemon.is_running() else set()
        proc.terminate()
        _end(started, strays)
        shutil.rmtree(tmp, ignore_errors=True)


_vineyard_clients: dict[str, Any] = {}


def vineyard_read(socket: str, object_id: int, calls: int, sum_calls: int) -> dict:
    """In a task: ``timing.read`` of one Vineyard object, through this process's client."""
    vineyard = _import("vineyard")
    client = _vineyard_clients.get(socket)
    if client is None:
        client = _vineyard_clients[socket] = vineyard.connect(socket)
    oid = vineyard.ObjectID(object_id)
    return read(lambda: client.get(oid), calls, sum_calls)


def vineyard_disconnect() -> None:
    while _vineyard_clients:
        _vineyard_clients.popitem()[1].close()
