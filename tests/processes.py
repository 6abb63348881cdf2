"""A fabric cluster of separate processes, run as a deployment runs it: ``dask scheduler
--preload datafabric.preload`` and one ``dask worker`` (with its nanny) per simulated
node, each in its own process group, so that the scheduler can be crashed and started
again on the same port.  The restart tests and the restart benchmark share it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessCluster:
    """``scheduler_log`` receives the scheduler's output (the fabric's own lines at INFO),
    rewritten at each start."""

    def __init__(self, nodes: tuple[str, ...], scheduler_log: str | None = None) -> None:
        self.nodes = nodes
        self.scheduler_log = scheduler_log
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.closing: list[subprocess.Popen] = []  # workers of a scheduler that was killed

    def start(self, nodes: tuple[str, ...] | None = None) -> None:
        """The scheduler and a worker for each of ``nodes`` (all of them by default)."""
        self.start_scheduler()
        self.start_workers(nodes)

    def start_scheduler(self) -> None:
        scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port)]
        scheduler += ["--dashboard-address", ":0", "--preload", "datafabric.preload"]
        self.scheduler = _spawn(scheduler, {"DASK_LOGGING__DATAFABRIC": "info"}, self.scheduler_log)

    def start_workers(self, nodes: tuple[str, ...] | None = None) -> None:
        self.workers = []
        for node in self.nodes if nodes is None else nodes:
            self.start_worker(node)

    def start_worker(self, node: str) -> None:
        """One more worker, of ``node`` (a node coming back after the others)."""
        worker = ["distributed.cli.dask_worker", self.address, "--host", "127.0.0.1", "--nthreads", "1"]
        worker += ["--no-dashboard", "--death-timeout", "60"]
        self.workers.append(_spawn(worker, {"DASK_DATAFABRIC__NODE_ID": node}))

    def crash_scheduler(self) -> None:
        """SIGKILL the scheduler and wait for its workers: they close, as Dask workers do
        without a scheduler."""
        for worker in self.lose_scheduler():
            worker.wait(60)

    def lose_scheduler(self) -> list[subprocess.Popen]:
        """SIGKILL the scheduler, and return its workers without waiting for them: their
        close waits for the tasks they run.  ``stop`` ends any still running."""
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait()
        closing, self.workers = self.workers, []
        self.closing += closing
        return closing

    def stop(self) -> None:
        procs = [p for p in (*self.closing, *self.workers, self.scheduler) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _spawn(args: list[str], env: dict, log: str | None = None) -> subprocess.Popen:
    with open(log or os.devnull, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
