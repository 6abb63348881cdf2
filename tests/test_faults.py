"""Faults: a block that cannot get its memory, a writer killed mid-insert.  After each,
every surviving variable reads back byte for byte and the free space adds up."""

from __future__ import annotations

import os
import resource
import signal
import sys
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client, get_worker

import datafabric
from datafabric import errors
from tests.conftest import fabric_segments, local_cluster
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20


def limit_file_size(nbytes: int) -> None:
    """Make this worker's next large fallocate fail (EFBIG), as a full tmpfs would."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def lift_file_size_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))


def test_allocate_that_cannot_get_its_memory_is_refused_whole(client, fabric):
    a, b = sorted(client.scheduler_info()["workers"])
    before = set(fabric_segments())
    blocks_before = fabric.status()
    client.run(limit_file_size, 8 * MiB, workers=[b])
    try:
        with pytest.raises(errors.OutOfSpaceError, match="cannot reserve"):
            fabric.allocate(64)  # 32 MiB per worker: worker b cannot, so worker a's block goes too
    finally:
        client.run(lift_file_size_limit, workers=[b])
    assert set(fabric_segments()) == before
    assert [s["shm_id"] for s in fabric.status()] == [s["shm_id"] for s in blocks_before]
    assert len(fabric.allocate(16)) == 2  # and the fabric goes on


STAGES = ("reserved", "half-filled", "filled", "sealed")


def producer_stopping_at(fabric, name: str, stage: str) -> None:
    """Writes ``name`` in place up to ``stage``, then waits to be killed."""
    creation = fabric.create(name, "", f"{4 * MiB // 8} * float64")
    if stage != "reserved":
        filled = creation.array.size // 2 if stage == "half-filled" else creation.array.size
        creation.array[:filled] = 7.0
    if stage == "sealed":
        creation.seal()
    get_worker()._datafabric_test_creation = creation
    time.sleep(60)


@pytest.mark.parametrize("stage", STAGES)
def test_writer_killed_at_any_point_of_an_insert(client, fabric, stage):
    """SIGKILL at each stage of an in-place write.  Before the seal: nothing visible and
    the space returns.  After: the variable stays, adopted by the node's other worker.
    The other variables read back exactly either way."""
    a, b = sorted(client.scheduler_info()["workers"])
    good = {f"ok/{i}": np.random.default_rng(i).random(MiB // 8) for i in range(3)}
    for name, data in good.items():
        fabric.insert(name, "", np.float64, data)
    free_before = sum(s["free"] for s in fabric.status())
    future = client.submit(producer_stopping_at, fabric, "written", stage, workers=[a], pure=False)

    def reached() -> bool:
        return "written" in fabric.get_list() if stage == "sealed" else sum(s["reserved"] for s in fabric.status())

    wait_for(reached, f"the producer to reach {stage}", 30)
    time.sleep(0.2)  # the fill is under way or done
    pid = client.run(os.getpid, workers=[a])[a]
    os.kill(pid, signal.SIGKILL)
    client.cancel(future)  # pinned to the dead worker: it would wait for it forever

    def settled() -> bool:
        stats = fabric.status()
        return all(s["worker"] is not None and s["reserved"] == 0 for s in stats)

    wait_for(settled, "the killed worker's block to be adopted")
    for name, data in good.items():
        np.testing.assert_array_equal(fabric.get(name), data)
    stats = fabric.status()
    assert all(s["free"] + s["used"] == s["capacity"] for s in stats)
    if stage == "sealed":
        np.testing.assert_array_equal(fabric.get("written"), np.full(4 * MiB // 8, 7.0))
        assert sum(s["free"] for s in stats) < free_before - 4 * MiB
    else:
        assert "written" not in fabric.get_list()
        assert sum(s["free"] for s in stats) == free_before
    client.wait_for_workers(2)  # the nanny restarted the worker for the next tests


def test_block_bigger_than_the_tmpfs_is_refused_at_allocate(client, fabric):
    """The kernel's own refusal (ENOSPC from fallocate), not an rlimit: a block larger
    than all of /dev/shm.  Nothing is left behind and the fabric goes on."""
    fabric.insert("kept", "", np.float64, np.arange(1000.0))
    st = os.statvfs("/dev/shm")
    too_big_per_worker = st.f_blocks * st.f_frsize + 2**30
    before = set(fabric_segments())
    with pytest.raises(errors.OutOfSpaceError, match="No space left on device|can give"):
        fabric.allocate(2 * too_big_per_worker / MiB)
    assert set(fabric_segments()) == before
    np.testing.assert_array_equal(fabric.get("kept"), np.arange(1000.0))
    assert all(s["free"] + s["used"] == s["capacity"] for s in fabric.status())


def insert_and_read_here(fabric, name):
    data = np.arange(1000.0)
    fabric.insert(name, "", np.float64, data)
    view = fabric.get(name)
    return bool((view == data).all()), view.flags.owndata


def restarted(client, old: dict[str, int]) -> bool:
    """Two workers again, one of them new (a restarted worker listens on a new port)."""
    workers = set(client.scheduler_info()["workers"])
    return len(workers) == 2 and workers != set(old)


@pytest.mark.parametrize("how", ["sigkill", "restart_workers"])
def test_a_nanny_restarted_worker_rejoins_and_its_data_survives(client, fabric, how):
    """SIGKILL (the nanny restarts it; a peer adopts its blocks from their headers) and
    Dask's graceful ``restart_workers`` (it hands its blocks to a peer first)."""
    a, b = sorted(client.scheduler_info()["workers"])
    data = {f"on-a/{i}": np.random.default_rng(i).random(50_000) for i in range(4)}
    client.submit(lambda f: [f.insert(n, "", np.float64, d) for n, d in data.items()], fabric, workers=[a]).result()
    pids = client.run(os.getpid)
    if how == "sigkill":
        os.kill(pids[a], signal.SIGKILL)
    else:
        client.restart_workers([a])
    wait_for(
        lambda: restarted(client, pids) and all(s["worker"] is not None for s in fabric.status()),
        "the worker to come back and its blocks to be adopted",
    )
    for name, array in data.items():
        np.testing.assert_array_equal(fabric.get(name), array)
    stats = fabric.status()
    assert all(s["free"] + s["used"] == s["capacity"] and s["reserved"] == 0 for s in stats)
    new = sorted(set(client.scheduler_info()["workers"]) - {b})
    assert len(new) == 1
    same, private = client.submit(insert_and_read_here, fabric, f"from-new-{how}", workers=new).result()
    assert same and not private  # it writes into and maps the node's blocks: it is in the fabric


def test_a_worker_exiting_and_the_cluster_closing_leave_no_segment():
    """No ``shutdown()``: a retired worker's peer adopts its blocks, and the cluster
    closing takes the fabric down before Dask closes the workers."""
    with (
        local_cluster() as c,
        Client(c) as client,
    ):
        fabric = datafabric.start(client, mb=16)
        fabric.insert("x", "", np.float64, np.arange(10.0))
        mine = [s for s in fabric_segments() if s.startswith(f"dfab_{fabric.fabric_id[:8]}_")]
        assert len(mine) == 2
        client.retire_workers([sorted(client.scheduler_info()["workers"])[0]])
        # Dask removes a retired worker before it closes: its blocks are adopted once its process is gone.
        wait_for(
            lambda: [s["worker"] for s in fabric.status()].count(None) == 0, "the retired worker's blocks' adoption"
        )
        np.testing.assert_array_equal(fabric.get("x"), np.arange(10.0))
        assert sorted(s for s in fabric_segments() if s in mine) == mine
    assert not set(mine) & set(fabric_segments())


@pytest.mark.parametrize("how", ["restart", "restart_workers"])
def test_a_node_whose_only_worker_dask_restarts_keeps_its_data(how):
    """``client.restart()`` and ``restart_workers`` close the node's last worker
    gracefully; its nanny starts it again, and the new worker adopts the blocks."""
    with (
        local_cluster(n_workers=1) as c,
        Client(c) as client,
    ):
        fabric = datafabric.start(client, mb=16)
        data = {f"kept/{i}": np.random.default_rng(i).random(20_000) for i in range(3)}
        client.submit(lambda f: [f.insert(n, "", np.float64, d) for n, d in data.items()], fabric).result()
        [old] = client.scheduler_info()["workers"]
        mine = [s for s in fabric_segments() if s.startswith(f"dfab_{fabric.fabric_id[:8]}_")]
        if how == "restart":
            client.restart()
        else:
            client.restart_workers([old])
        wait_for(
            lambda: restarted_once(client, old) and all(s["worker"] is not None for s in fabric.status()),
            "the new worker to adopt the blocks",
        )
        assert sorted(s for s in fabric_segments() if s in mine) == mine
        for name, array in data.items():
            np.testing.assert_array_equal(fabric.get(name), array)
        assert all(s["free"] + s["used"] == s["capacity"] and s["reserved"] == 0 for s in fabric.status())
    assert not set(mine) & set(fabric_segments())


def restarted_once(client, old: str) -> bool:
    workers = set(client.scheduler_info()["workers"])
    return len(workers) == 1 and old not in workers
