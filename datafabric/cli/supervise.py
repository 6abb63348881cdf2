"""What a ``datafabric start`` does while it runs in the foreground: it waits for a signal,
for the fabric to be shut down from outside, or for its ``--run`` script to exit.

A signal never interrupts the command: it is recorded and the fabric and the cluster are
then shut down in order, and a ``--run`` script gets the signal passed on first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import distributed

from datafabric.protocol import SCHEDULER_PLUGIN

SCRIPT_GRACE = 30.0  # seconds a --run script has to exit after it is signalled


class Stop(threading.Event):
    """Set by a signal, which it keeps for passing on to a ``--run`` script."""

    signum: int = 0


@contextmanager
def signals_handled() -> Iterator[Stop]:
    """SIGINT and SIGTERM set the returned event instead of interrupting: the fabric and
    the cluster are then shut down in order."""
    stop = Stop()

    def handler(signum: int, frame: Any) -> None:
        stop.signum = signum
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def serve(cluster: distributed.LocalCluster, stop: Stop) -> str:
    """Wait for a signal, or for the fabric to be shut down from outside; say which."""
    while not stop.wait(0.5):
        yellowpages = cluster.scheduler.plugins.get(SCHEDULER_PLUGIN)
        if yellowpages is None or not yellowpages.running:
            return "the fabric was shut down; closing the cluster"
    return f"got {signal.Signals(stop.signum).name}; shutting the fabric down and closing the cluster"


def run_script(script: str, args: tuple[str, ...], address: str, stop: Stop) -> int:
    """Run the script, pass a signal we get on to it, and return its exit status."""
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": address}
    proc = subprocess.Popen([sys.executable, script, *args], env=env)
    while proc.poll() is None:
        if stop.wait(0.2):
            proc.send_signal(stop.signum)
            try:
                proc.wait(SCRIPT_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
