"""The `datafabric` command, run as the real executable in subprocesses against real
clusters: one embedded `start` shared by the client-command tests, a cluster of separate
`dask scheduler` and `dask worker` processes for `start --scheduler`, and short-lived
embedded starts for `--run` and `stop`.  Every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from distributed import Client

import datafabric
from datafabric.errors import FabricError
from tests.cli_helpers import (
    DASK,
    DATAFABRIC,
    WAIT,
    assert_fails,
    end,
    env_for,
    free_address,
    launch,
    ok,
    ok_many,
    run,
    run_many,
    segments_of,
    wait_for,
)
from yp.plugin import durable_fabric_id

TEMPS = np.arange(800, dtype=np.float64).reshape(40, 20)
RAW_ITEMS = 3 * 2**20  # 12 MiB of uint32: more than one chunk of `put` and `get`

# What `start --run` runs: it finds the fabric through DASK_SCHEDULER_ADDRESS and exits
# with the status given as its first argument.
JOB = """\
import sys
import numpy as np
from distributed import Client
import datafabric

with Client() as client:
    fabric = datafabric.connect(client)
    fabric.insert("x", "from the script", "3 * int64", np.arange(3))
    print("script read", fabric.get("x").tolist(), "from fabric", fabric.fabric_id)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("files")
    np.save(d / "temps.npy", TEMPS)
    np.arange(RAW_ITEMS, dtype=np.uint32)[::-1].tofile(d / "raw.bin")
    (d / "small.bin").write_bytes(np.arange(10, dtype=np.int32).tobytes())
    return d


# -- the client commands against the embedded start ----------------------------------------


def test_put_raw_and_npy_then_ls_and_info(embedded, files):
    put = ok_many(
        embedded.env,
        ["put", "temps", str(files / "temps.npy"), "--doc", "kelvin"],
        ["put", "raw", str(files / "raw.bin"), "--type", f"{RAW_ITEMS} * uint32"],
        ["put", "run1/small", str(files / "small.bin"), "--type", "10 * int32"],
    )
    assert put[0] == "put temps: 6.2 KiB on 127.0.0.1\n"
    table, listing, run1, details, described = ok_many(
        embedded.env,
        ["ls"],
        ["ls", "--json"],
        ["ls", "run1/", "--json"],
        ["info", "temps", "--json"],
        ["info", "temps"],
    )
    for fragment in ("temps", "40 * 20 * float64", "6.2 KiB", "raw", "12.0 MiB", "run1/small", "127.0.0.1"):
        assert fragment in table
    listed = {row["name"]: row for row in json.loads(listing)}
    assert set(listed) == {"temps", "raw", "run1/small"}
    assert listed["raw"]["type"] == f"{RAW_ITEMS} * uint32" and listed["raw"]["nbytes"] == RAW_ITEMS * 4
    assert [row["name"] for row in json.loads(run1)] == ["run1/small"]

    details = json.loads(details)
    assert details["doc"] == "kelvin" and details["nbytes"] == TEMPS.nbytes
    assert details["shape"] == [40, 20] and details["dtype"] == "float64"
    [[node, shm_id, offset]] = details["locations"]
    assert node == "127.0.0.1" and shm_id.startswith("dfab_") and offset % 64 == 0
    assert shm_id in described and "kelvin" in described and "shape (40, 20), dtype float64" in described


def test_show_prints_slices_with_numpy(embedded):
    row, column, whole, as_json = ok_many(
        embedded.env,
        ["show", "temps[0, :10]"],
        ["show", "temps[..., -1]"],
        ["show", "run1/small"],
        ["show", "temps[-1, 2:12:3]", "--json"],
    )
    with np.printoptions(linewidth=80):  # the commands' terminal width: COLUMNS
        assert row == f"{TEMPS[0, :10]}\n" and column == f"{TEMPS[..., -1]}\n"
        assert whole == f"{np.arange(10, dtype=np.int32)}\n"
    shown = json.loads(as_json)
    assert shown["data"] == TEMPS[-1, 2:12:3].tolist() and shown["shape"] == [4] and shown["dtype"] == "float64"


def test_get_writes_npy_and_raw_bytes(embedded, files, tmp_path):
    procs = run_many(
        embedded.env,
        ["get", "temps", "-o", str(tmp_path / "temps.npy")],
        ["get", "raw", "-o", str(tmp_path / "raw.bin")],
    )
    assert [p.returncode for p in procs] == [0, 0]
    assert procs[0].stdout == f"wrote temps (6.2 KiB) to {tmp_path / 'temps.npy'}\n"
    assert (tmp_path / "temps.npy").read_bytes() == (files / "temps.npy").read_bytes()  # what np.save wrote
    assert (tmp_path / "raw.bin").read_bytes() == (files / "raw.bin").read_bytes()
    piped = subprocess.run(
        [DATAFABRIC, "get", "run1/small", "-o", "-"], env=embedded.env, capture_output=True, timeout=WAIT
    )
    assert piped.returncode == 0 and piped.stdout == (files / "small.bin").read_bytes()


def test_status_shows_blocks_per_node(embedded):
    as_json, table = ok_many(embedded.env, ["status", "--json"], ["status"])
    status = json.loads(as_json)
    blocks = status["blocks"]
    assert len(blocks) == 2 and {b["node"] for b in blocks} == {"127.0.0.1"}
    assert sum(b["size"] for b in blocks) == 64 * 2**20
    for b in blocks:
        assert b["used"] + b["free"] == b["capacity"] and b["largest_free"] <= b["free"]
    assert sum(b["variables"] for b in blocks) == 3  # raw, run1/small, temps
    assert "total of 2 blocks" in table and "64.0 MiB" in table and blocks[0]["shm_id"] in table
    assert "memory per worker process" in table  # each worker's own memory beside the fabric's pages
    assert status["fabric_id"][:8] in table and status["scheduler"] == embedded.address


def test_status_json_has_the_memory_figures_of_the_table(embedded):
    """`status --json` carries what the table shows per worker process: the real worker
    processes of the embedded start, each mapping at least its own pre-faulted block."""
    as_json, table = ok_many(embedded.env, ["status", "--json"], ["status"])
    status = json.loads(as_json)
    memory, blocks = status["memory"], status["blocks"]
    workers = {p.pid for p in psutil.Process(embedded.proc.pid).children(recursive=True)}
    assert {row["worker"] for row in memory} == {b["worker"] for b in blocks}
    assert len(memory) == 2 and {row["pid"] for row in memory} <= workers
    owned = {b["worker"]: b["size"] for b in blocks}
    for row in memory:
        assert row["node"] == "127.0.0.1" and str(row["pid"]) in table
        assert 0 < row["private"] <= row["uss"] <= row["rss"]
        assert row["fabric_pss"] <= row["fabric_mapped"] <= row["rss"]
        assert row["fabric_mapped"] >= owned[row["worker"]]  # its block, pre-faulted, is mapped


def test_rm_deletes_and_reports_unknown_names(embedded, files):
    ok(embedded.env, "put", "doomed", str(files / "small.bin"), "--type", "10 * int32")
    assert_fails(run(embedded.env, "rm", "doomed", "never-was"), "no variable named 'never-was'")
    assert "doomed" not in [row["name"] for row in json.loads(ok(embedded.env, "ls", "--json"))]


def test_unknown_name(embedded, tmp_path):
    commands = [["show", "nope"], ["info", "nope"], ["get", "nope", "-o", str(tmp_path / "x")], ["rm", "nope"]]
    for result in run_many(embedded.env, *commands):
        assert_fails(result, "no variable named 'nope'", "datafabric ls")
    assert not (tmp_path / "x").exists()


BAD_SLICES = {
    "temps[__import__('os').getpid()]": "is not an integer",  # parsed, never evaluated
    "temps[0,,1.5]": "does not parse",
    "temps[0][1]": "one pair of brackets",
    "temps[40]": "index 40 is out of bounds for axis 0 with size 40",
    "temps[0, ::0]": "slice step cannot be zero",
}


def test_bad_slice(embedded):
    results = run_many(embedded.env, *(["show", selection] for selection in BAD_SLICES))
    for result, why in zip(results, BAD_SLICES.values(), strict=True):
        assert_fails(result, "bad slice", why)


def test_bad_type_string(embedded, files):
    small = str(files / "small.bin")
    unknown, abstract, missing = run_many(
        embedded.env,
        ["put", "x", small, "--type", "10 * int33"],
        ["put", "x", small, "--type", "var * int32"],
        ["put", "x", small],
    )
    assert_fails(unknown, "cannot parse type '10 * int33'")
    assert_fails(abstract, "type 'var * int32' is abstract")
    assert_fails(missing, "raw file: give its type", status=2)


def test_size_mismatch(embedded, files):
    raw, npy = run_many(
        embedded.env,
        ["put", "x", str(files / "small.bin"), "--type", "11 * int32"],
        ["put", "y", str(files / "temps.npy"), "--type", "3 * float64"],
    )
    assert_fails(raw, "type 11 * int32 is 44 bytes but the file has 40 bytes")
    assert_fails(npy, "type 3 * float64 is 24 bytes but the file has 6400 bytes")
    assert {"x", "y"}.isdisjoint(row["name"] for row in json.loads(ok(embedded.env, "ls", "--json")))


def test_name_taken_not_npy_and_second_start_refused(embedded, files, tmp_path):
    (tmp_path / "fake.npy").write_text("hello")
    taken, fake, second = run_many(
        embedded.env,
        ["put", "temps", str(files / "temps.npy")],
        ["put", "x", str(tmp_path / "fake.npy")],
        ["start", "--mb", "16"],
    )
    assert_fails(taken, "a variable named 'temps' exists already")
    assert_fails(fake, "fake.npy is not a .npy file")
    assert_fails(second, f"a `datafabric start` is running already at {embedded.address}")


def test_no_fabric_running(tmp_path):
    stale = tmp_path / "stale" / "datafabric" / "scheduler"  # left by a killed start: not locked
    stale.parent.mkdir(parents=True)
    stale.write_text("tcp://127.0.0.1:9\n")
    nothing, left_behind = run_many(env_for(tmp_path), ["ls"]), run_many(env_for(tmp_path / "stale"), ["status"])
    assert_fails(nothing[0], "no fabric running", "datafabric start")
    assert_fails(left_behind[0], "no fabric running")


def test_unreachable_scheduler(tmp_path):
    address = free_address()
    env = env_for(tmp_path) | {"DASK_SCHEDULER_ADDRESS": address}
    given, from_env, nonsense = run_many(
        env,
        ["ls", "--scheduler", address, "--timeout", "1"],
        ["stop", "--timeout", "1"],
        ["info", "x", "--scheduler", "nonsense"],
    )
    assert_fails(given, f"cannot reach the scheduler at {address}")
    assert_fails(from_env, f"cannot reach the scheduler at {address}")
    assert_fails(nonsense, "cannot reach the scheduler at nonsense")


def test_every_command_has_help_with_an_example(tmp_path):
    commands = ["start", "stop", "ls", "info", "show", "status", "put", "get", "rm"]
    results = run_many(env_for(tmp_path), *([c, "--help"] for c in commands), ["--help"], ["ls", "--no-such-option"])
    for command, result in zip(commands, results, strict=False):
        assert result.returncode == 0, result.stderr
        assert f"Usage: datafabric {command}" in result.stdout and "Example" in result.stdout
        assert f"datafabric {command} " in result.stdout.split("Example")[1]
    assert all(c in results[-2].stdout for c in commands)
    assert_fails(results[-1], "No such option", status=2)


def test_sigterm_ends_the_embedded_start_cleanly(embedded):
    """Last of the module: the shared embedded start goes away as a user's would."""
    blocks = {b["shm_id"] for b in json.loads(ok(embedded.env, "status", "--json"))["blocks"]}
    children = psutil.Process(embedded.proc.pid).children(recursive=True)
    assert len(children) >= 2  # the worker processes, at least

    assert end(embedded.proc, signal.SIGTERM) == 0
    report = json.loads(embedded.out)  # what `start --json` printed when it started
    assert report["scheduler"] == embedded.address and {b["shm_id"] for b in report["blocks"]} == blocks
    assert report["state_file"] == str(embedded.state_file)
    assert segments_of(report["fabric_id"]) == [] and not any(os.path.exists(f"/dev/shm/{b}") for b in blocks)
    assert not embedded.state_file.exists()
    _, alive = psutil.wait_procs(children, timeout=WAIT)
    assert alive == []
    assert "got SIGTERM" in embedded.err and "Traceback" not in embedded.err
    assert "resource_tracker" not in embedded.err and "leaked" not in embedded.err


# -- starting on a cluster of separate processes -------------------------------------------


def dask_process(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    with log.open("wb") as f:
        return subprocess.Popen([DASK, *args], env=env, stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("preload", [False, True], ids=["plain", "preloaded"])
def test_start_on_a_running_cluster_reaches_workers_that_join_later(tmp_path, preload):
    """On a plain scheduler, and on one that preloads the (durable) fabric."""
    scheduler_file = tmp_path / "scheduler.json"
    worker_args = ["worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1", "--nthreads", "1"]
    worker_args += ["--host", "127.0.0.1", "--no-dashboard"]
    scheduler_args = ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
    scheduler_args += ["--preload", "datafabric.preload"] if preload else []
    procs = [dask_process([*scheduler_args, "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")]
    client = fabric = None
    try:
        wait_for(scheduler_file.exists, "the scheduler file")
        address = json.loads(scheduler_file.read_text())["address"]
        procs.append(dask_process(worker_args, tmp_path / "worker1.log"))
        client = Client(address, timeout=WAIT)
        client.wait_for_workers(1, timeout=WAIT)
        env = env_for(tmp_path)

        if preload:  # running, holding nothing
            assert json.loads(ok(env, "ls", "--scheduler", address, "--json")) == []
        else:
            assert_fails(run(env, "ls", "--scheduler", address), f"no fabric is running on {address}")
        report = json.loads(ok(env, "start", "--mb", "16", "--scheduler", address, "--json"))
        fabric = datafabric.connect(client)
        assert report["fabric_id"] == fabric.fabric_id and report["scheduler"] == address
        assert (fabric.fabric_id == durable_fabric_id(address)) is preload
        [first] = report["blocks"]
        assert first["size"] == 16 * 2**20

        procs.append(dask_process(worker_args, tmp_path / "worker2.log"))
        client.wait_for_workers(2, timeout=WAIT)
        late = (set(client.scheduler_info()["workers"]) - {first["worker"]}).pop()
        wait_for(lambda: all(client.run(lambda dask_worker: "datafabric" in dask_worker.plugins).values()), "plugins")

        fabric.allocate(16)  # spreads over both workers now
        owners = {b["worker"] for b in fabric.status()}
        assert owners == {first["worker"], late}
        data = np.arange(4.0)
        task = client.submit(fabric.insert, "late", "", "4 * float64", data, workers=[late], pure=False)
        [(node, shm_id, _)] = task.result()
        assert node == "127.0.0.1" and {b["shm_id"]: b["worker"] for b in fabric.status()}[shm_id] == late
        np.testing.assert_array_equal(fabric.get("late"), data)

        assert "every block is unlinked" in ok(env, "stop", "--scheduler", address)
        assert segments_of(fabric.fabric_id) == []

        (tmp_path / "job.py").write_text(JOB)  # a job on the same cluster, fabric torn down after it
        result = run(env, "start", "--mb", "8", "--scheduler", address, "--run", str(tmp_path / "job.py"), "0")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("script read [0, 1, 2] from fabric ")
        assert segments_of(result.stdout.split()[-1]) == [] and "8.0 MiB in 2 blocks" in result.stderr
    finally:
        if fabric is not None:
            try:
                fabric.shutdown()
            except (FabricError, OSError):
                pass  # `stop` did it
        if client is not None:
            client.close()
        for proc in reversed(procs):  # workers first, then the scheduler
            end(proc)


# -- short-lived embedded starts -----------------------------------------------------------


def test_run_script_then_shut_down_with_its_status(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    args = ["start", "--mb", "16", "--workers", "1", "--dashboard-address", "127.0.0.1:0", "--run", "job.py", "--", "3"]
    result = run(env_for(tmp_path), *args, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    [line] = result.stdout.splitlines()  # stdout is the script's alone
    assert line.startswith("script read [0, 1, 2] from fabric ")
    assert segments_of(line.split()[-1]) == []
    assert "16.0 MiB in 1 block" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "datafabric").exists()  # --run leaves no state file


def test_stop_ends_an_embedded_start(tmp_path):
    start = launch(tmp_path, "--mb", "16", "--workers", "1")
    try:
        assert f"export DASK_SCHEDULER_ADDRESS={start.address}" in start.out
        [page] = [
            line.split()[-1] for line in start.out.splitlines() if line.startswith("web page    http://127.0.0.1:")
        ]
        with urllib.request.urlopen(page + "api/v1/status", timeout=30) as r:  # the address it printed serves
            assert json.load(r)["fabric_id"].startswith(start.out.split()[1].rstrip(":"))
        assert start.state_file.stat().st_mode & 0o777 == 0o600
        assert start.state_file.parent.stat().st_mode & 0o777 == 0o700
        fabric_prefix = start.out.split()[1].rstrip(":")  # the title of its table: "fabric 1a2b3c4d: 16.0 MiB..."
        assert segments_of(fabric_prefix) != []
        stopped = ok(start.env, "stop")  # the address comes from the state file
        assert "every block is unlinked" in stopped and "has closed its cluster and exited" in stopped
        assert start.proc.wait(WAIT) == 0
        assert segments_of(fabric_prefix) == [] and not start.state_file.exists()
        assert "the fabric was shut down" in start.err and "Traceback" not in start.err
    finally:
        end(start.proc)
