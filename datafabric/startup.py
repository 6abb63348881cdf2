"""A fabric's arrival on a cluster: ``start`` installs the YellowPages (or takes over a
preloaded one), ``connect`` finds the one running, and SIGTERM becomes an orderly exit
so that closing the cluster shuts the fabric down and /dev/shm is left clean."""

from __future__ import annotations

import signal
import threading
import uuid
from typing import Any

from datafabric.errors import FabricRunningError, NoFabricError
from datafabric.fabric import Fabric
from datafabric.protocol import SCHEDULER_PLUGIN


def start(client: Any, mb: float | None = None) -> Fabric:
    """Install the fabric on the cluster behind ``client`` and allocate ``mb`` megabytes
    spread evenly over its nodes.  Workers that join later get the worker plugin too.
    On a scheduler started with ``--preload datafabric.preload`` the fabric is there
    already, holding nothing: it is the one started, so it outlives scheduler crashes."""
    state = client.run_on_scheduler(_yellowpages_state)
    if state == "running":
        raise FabricRunningError(
            f"a fabric is running on {client.scheduler.address} already; "
            "use datafabric.connect(client), or shut it down first"
        )
    if state in ("stopped", "stopped-durable"):  # a fabric was shut down here: its YellowPages makes way
        client.unregister_scheduler_plugin(SCHEDULER_PLUGIN)
    if state != "idle":
        from yp.plugin import YellowPages

        client.register_plugin(YellowPages(None if state == "stopped-durable" else uuid.uuid4().hex))
    fabric = Fabric(client.scheduler.address, _fabric_id(client), client=client)
    _exit_on_sigterm()
    if mb:
        fabric.allocate(mb)
    return fabric


def _exit_on_sigterm() -> None:
    """SIGTERM (``kill PID``, a scheduler's or a container's stop) raises SystemExit in
    the main thread, as Ctrl-C raises KeyboardInterrupt: the script's ``with`` blocks and
    atexit handlers run, the cluster closes, and closing it shuts the fabric down.  By
    default SIGTERM ends the process on the spot and the fabric's blocks stay in
    /dev/shm.  A handler the program installed itself is left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def connect(client: Any) -> Fabric:
    """The fabric already running on the cluster behind ``client``."""
    fabric_id = _fabric_id(client)
    if fabric_id is None:
        raise NoFabricError(
            f"no fabric is running on {client.scheduler.address}; start one with datafabric.start(client, mb=...)"
        )
    return Fabric(client.scheduler.address, fabric_id, client=client)


def _fabric_id(client: Any) -> str | None:
    return client.run_on_scheduler(_running_fabric_id)


def _running_fabric_id(dask_scheduler: Any) -> str | None:
    """Runs on the scheduler: asks the plugin table, so a cluster with no fabric is
    answered quietly rather than by an unknown-handler warning."""
    yp = dask_scheduler.plugins.get(SCHEDULER_PLUGIN)
    return yp.fabric_id if yp is not None and yp.running else None


def _yellowpages_state(dask_scheduler: Any) -> str:
    """absent, idle (a preloaded fabric holding nothing yet), running, or stopped;
    stopped-durable if it was preloaded, so that its successor is durable too."""
    yp = dask_scheduler.plugins.get(SCHEDULER_PLUGIN)
    if yp is None:
        return "absent"
    if not yp.running:
        return "stopped-durable" if yp.durable else "stopped"
    empty = not yp.directory.blocks and not yp.directory.variables
    return "idle" if yp.durable and empty else "running"
