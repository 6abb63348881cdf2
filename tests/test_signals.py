"""Signals and the end of a fabric: a group signal to `datafabric start` (a terminal's
Ctrl-C, systemd's stop, `kill -TERM -PGID`), SIGTERM to a user's script that holds a
LocalCluster and a fabric, and what a script may still do after `shutdown()`.  Each runs
real processes and checks that nothing is left in /dev/shm and no process stays behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.cli_helpers import WAIT, end, launch, segments_of, wait_for


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_of_start_shuts_down_cleanly(tmp_path, sig):
    """Ctrl-C reaches the whole foreground process group, and so do systemd's stop,
    `timeout` and `kill -TERM -PGID`: the workers too, which must not die of it before
    the fabric is shut down."""
    start = launch(tmp_path, "--mb", "64", "--workers", "2", "--json", new_session=True)
    try:
        children = psutil.Process(start.proc.pid).children(recursive=True)
        fabric_id = json.loads(start.out)["fabric_id"]
        assert segments_of(fabric_id) != []
        os.killpg(start.proc.pid, sig)
        assert start.proc.wait(WAIT) == 0, start.err
        assert segments_of(fabric_id) == []
        _, alive = psutil.wait_procs(children, timeout=WAIT)
        assert alive == []
        assert f"got {sig.name}" in start.err and "Traceback" not in start.err
        assert "resource_tracker" not in start.err and "leaked" not in start.err
    finally:
        if start.proc.poll() is None:
            os.killpg(start.proc.pid, signal.SIGKILL)
        end(start.proc)


# A user's script: a LocalCluster and a fabric in `with` blocks, then it waits to be
# stopped.  It prints the fabric id when its blocks are there.
SCRIPT = """\
import sys, time
import numpy as np
from distributed import Client, LocalCluster
import datafabric

if __name__ == "__main__":  # the workers are spawned: they import this file
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        with Client(cluster) as client:
            fabric = datafabric.start(client, mb=16)
            fabric.insert("x", "", "4 * float64", np.arange(4.0))
            print(fabric.fabric_id, flush=True)
            time.sleep(3 * 60)
"""


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-script", "to-its-process-group"])
def test_sigterm_to_a_script_holding_a_fabric_shuts_it_down(tmp_path, to_group):
    """datafabric.start makes SIGTERM raise SystemExit, so the script's `with` blocks
    close the cluster, which shuts the fabric down first, as after Ctrl-C.  Sent to the
    process group (`timeout`, `kill -TERM -PGID`) it reaches the workers too, which leave
    it to the script (worker_plugin/signals.py): dying of it, they left the blocks."""
    (tmp_path / "job.py").write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, "job.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=to_group,
    )
    try:
        fabric_id = proc.stdout.readline().strip()
        assert fabric_id, proc.stderr.read()
        assert segments_of(fabric_id) != []
        children = psutil.Process(proc.pid).children(recursive=True)
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 128 + signal.SIGTERM, err
        wait_for(lambda: segments_of(fabric_id) == [], "the blocks to go")
        _, alive = psutil.wait_procs(children, timeout=WAIT)
        assert alive == []
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


AFTER_SHUTDOWN = """\
import numpy as np
from distributed import Client, LocalCluster
import datafabric

if __name__ == "__main__":  # the workers are spawned: they import this file
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        with Client(cluster) as client:
            fabric = datafabric.start(client, mb=8)
            with fabric.create("s", "", "1000 * float64") as out:  # out stays bound past the shutdown
                out[:] = 1.0
            fabric.shutdown()
            fabric.shutdown()  # a second one does nothing
            print("shut down twice", float(out.sum()), flush=True)
"""


def test_shutdown_twice_and_a_buffer_kept_past_it_are_quiet(tmp_path):
    (tmp_path / "job.py").write_text(AFTER_SHUTDOWN)
    done = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "shut down twice 1000.0\n"
    assert "BufferError" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def _stop_children_with_sigterm(fabric) -> dict:
    """Runs in a task: starts a program and forks a child, and stops each with SIGTERM."""
    program = subprocess.Popen(["sleep", "60"])
    program.terminate()
    ready, started = os.pipe()
    child = os.fork()
    if child == 0:  # Python's at-fork hooks have run by now
        os.write(started, b"!")
        time.sleep(60)
        os._exit(0)
    os.read(ready, 1)
    os.close(ready)
    os.close(started)
    os.kill(child, signal.SIGTERM)
    _, status = os.waitpid(child, 0)
    return {
        "worker": signal.getsignal(signal.SIGTERM).__name__,
        "program": program.wait(WAIT),
        "forked": os.waitstatus_to_exitcode(status),
    }


def test_a_task_can_still_stop_the_programs_it_starts_with_sigterm(client, fabric):
    """The worker defers the group's signals with a handler, never SIG_IGN: an ignored
    signal would be inherited by what its tasks start, which SIGTERM could then not stop."""
    stopped = client.submit(_stop_children_with_sigterm, fabric, pure=False).result(WAIT)
    assert stopped == {"worker": "_defer", "program": -signal.SIGTERM, "forked": -signal.SIGTERM}
