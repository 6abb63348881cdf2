"""Attacks on "a scheduler carries task arguments as references" (``references.carrying``):
no lease is held by the scheduler for a task argument whatever the graph shape; workers read
the right bytes through deletes, defragments and block moves between submit and run, or fail
with ``ReferenceGoneError``; memory comes back exactly; the flag reaches nothing else (views
the client receives, Dask's other scheduler paths, tasks spawned inside update-graph).  The
wrapper's lifecycle (restarts, shutdown, threads) is ``test_attack_carried_lifecycle``.
Real LocalClusters, real shared memory."""

from __future__ import annotations

import asyncio
import os
import pickle
import sys

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, Event, Queue, Reschedule, Variable, wait
from distributed.diagnostics.plugin import SchedulerPlugin

import datafabric
from datafabric.errors import ReferenceGoneError
from datafabric.protocol import SCHEDULER_PLUGIN
from datafabric.references import FabricView, pin_of
from tests.conftest import local_cluster
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SEED = 20261207
ROUNDS = 16  # of the churn test


@pytest.fixture(scope="module")
def cfabric(client):
    fabric = datafabric.start(client, mb=64)
    try:
        yield fabric
    finally:
        fabric.shutdown()


def values(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


def scheduler_leases(dask_scheduler=None) -> dict:
    """Leases held under the scheduler's own holder, by variable name.  In a LocalCluster the
    client's received views hold theirs under it too: a test probes with none alive."""
    yp = dask_scheduler.plugins[SCHEDULER_PLUGIN]
    me = f"scheduler {dask_scheduler.address}"
    return {v.name: n for v in list(yp.directory.by_id.values()) for h, n in v.leases.items() if h == me and n}


def no_scheduler_lease(client) -> None:
    wait_for(lambda: not client.run_on_scheduler(scheduler_leases), "no lease held by the scheduler", timeout=20)


def blocks(fabric) -> list:
    """Each block's used and free bytes (its owner's address aside: a restarted worker adopts it)."""
    return sorted((b["node"], b["shm_id"], b["used"], b["free"]) for b in fabric.status())


def checksum(x) -> tuple:
    """In a task: the argument's type, whether it is fabric memory, and its sum."""
    return type(x).__name__, pin_of(x) is not None, float(np.asarray(x).sum())


def from_a_task(fabric, name: str, lo: int) -> tuple:
    """In a task: a view of its own passed to a task it submits (the worker's client)."""
    from distributed import worker_client

    with worker_client() as client:
        return client.submit(checksum, fabric.get(name)[lo:], pure=False).result()


def total(*xs) -> float:
    return float(sum(np.asarray(x).sum() for x in xs))


# -- (1) every graph shape: the scheduler never holds a lease -------------------------------
def test_every_graph_shape_leaves_no_lease_on_the_scheduler_and_reads_the_right_bytes(client, cfabric):
    rng = np.random.default_rng(SEED)
    before = blocks(cfabric)
    data = {f"car/shape{i}": values(SEED + i, 4096) for i in range(4)}
    for name, array in data.items():
        cfabric.insert(name, "", np.float64, array)
    views = {n: cfabric.get(n) for n in data}
    a, b = sorted(client.scheduler_info()["workers"])
    for _ in range(3):
        name = sorted(data)[int(rng.integers(len(data)))]
        lo = int(rng.integers(0, 2048))
        view, want = views[name][lo::3], data[name][lo::3]
        assert client.submit(checksum, view, workers=[b], pure=False).result() == ("FabricView", True, want.sum())
        echo = client.submit(lambda x: x, view, workers=[b], pure=False).result()  # the worker's view, back
        assert type(echo) is FabricView and pin_of(echo) is not None and np.array_equal(echo, want)
        del echo  # in a LocalCluster its lease is under the scheduler's holder (the shared loop)
        sums = client.gather(client.map(checksum, [views[n][lo:] for n in sorted(data)], pure=False))
        assert [s[2] for s in sums] == [data[n][lo:].sum() for n in sorted(data)] and all(s[1] for s in sums)
        assert dask.delayed(total)(view, views[name][:lo]).compute() == pytest.approx(
            want.sum() + data[name][:lo].sum()
        )
        embedded = da.from_array(views[name].reshape(64, 64), chunks=16)  # views inside the graph
        fused = ((embedded + 1) * 2).T[::2].sum()  # blockwise ops fused into the chunk tasks
        assert float(fused.compute()) == pytest.approx(float((((data[name].reshape(64, 64) + 1) * 2).T[::2]).sum()))
        assert float(client.compute(embedded.sum()).result()) == pytest.approx(float(data[name].sum()))
        inlined = da.from_array(views[name].reshape(64, 64), chunks=16, inline_array=True)  # in every task
        assert float(inlined[lo // 64 :].sum().compute()) == pytest.approx(
            float(data[name].reshape(64, 64)[lo // 64 :].sum())
        )
        assert float(dask.delayed(views[name])[lo:].sum().compute()) == pytest.approx(float(data[name][lo:].sum()))
        kept = embedded.persist()
        wait(kept)
        assert np.array_equal(kept.compute(), data[name].reshape(64, 64))
        del kept
        key = f"car-same-key-{lo}"  # the same key submitted twice: the second rides on the first
        first = client.submit(checksum, view, key=key)
        again = client.submit(checksum, views[name][lo::3], key=key)
        assert first.result() == again.result() == ("FabricView", True, want.sum())
        del first, again
        no_scheduler_lease(client)
    nested = client.submit(from_a_task, cfabric, "car/shape1", 17, workers=[a], pure=False).result()
    assert nested == ("FabricView", True, data["car/shape1"][17:].sum())
    many = client.map(
        lambda x: float(x.sum()), [views[n][i : i + 16] for n in sorted(data) for i in range(250)], pure=False
    )
    assert client.gather(many) == [float(data[n][i : i + 16].sum()) for n in sorted(data) for i in range(250)]
    del many
    no_scheduler_lease(client)
    del views, view
    cfabric.delete_prefix("car/shape")
    wait_for(lambda: blocks(cfabric) == before, "every byte back")


# -- (2) the right bytes through deletes, moves and defragments between submit and run -----
def gated(gate: str, x) -> tuple:
    Event(gate).wait(timeout=30)
    return checksum(x)


def test_a_gated_task_reads_its_argument_after_the_name_is_deleted_and_its_variable_moved(client, cfabric):
    """The task's argument is materialised when the worker receives the task, which it does
    once ``blocker`` ends; meanwhile the names are deleted and the block compacted (a slide
    toward the block's start). A deleted variable the client still views does not move; a
    visible one nobody views does, and its reference finds it at its new offset."""
    before = blocks(cfabric)
    a, _ = sorted(client.scheduler_info()["workers"])
    for i in range(6):
        cfabric.insert(f"car/move{i}", "", np.float64, values(100 + i, 20_000))
    kept = cfabric.get("car/move0")  # the client holds this one throughout
    loose = cfabric.get("car/move5")
    hold, gate = Event("car-hold"), Event("car-gate")
    blocker = client.submit(lambda: Event("car-hold").wait(timeout=60), workers=[a], pure=False)
    kept_task = client.submit(lambda _, x: gated("car-gate", x), blocker, kept[7::5], workers=[a], pure=False)
    loose_task = client.submit(lambda _, x: gated("car-gate", x), blocker, loose[11:], workers=[a], pure=False)
    del loose  # now only the reference in the scheduler's task names car/move5
    cfabric.delete_many(["car/move0", "car/move1", "car/move2", "car/move3"])  # holes after the kept one
    moved = cfabric.defragment()
    assert "car/move5" in str(moved), moved  # the unviewed variable moved while its task waited
    no_scheduler_lease(client)
    hold.set()
    gate.set()
    assert kept_task.result() == ("FabricView", True, values(100, 20_000)[7::5].sum())
    assert loose_task.result() == ("FabricView", True, values(105, 20_000)[11:].sum())
    del kept_task, loose_task, blocker, kept
    hold.clear()
    gate.clear()
    cfabric.delete_prefix("car/move")
    wait_for(lambda: blocks(cfabric) == before, "every byte back")


def test_a_task_whose_argument_was_deleted_and_let_go_fails_with_reference_gone():
    """Its own cluster: a ReferenceGoneError raised where a worker reads the compute-task
    message would end its scheduler stream (and the next worker's, given the task next)."""
    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=16)
        try:
            before, alive = blocks(fabric), sorted(client.scheduler_info()["workers"])
            a = alive[0]
            fabric.insert("car/gone", "", np.float64, values(7, 50_000))
            view = fabric.get("car/gone")
            hold = Event("car-hold-gone")
            blocker = client.submit(lambda: Event("car-hold-gone").wait(timeout=60), workers=[a], pure=False)
            task = client.submit(lambda _, x: checksum(x), blocker, view[100:], workers=[a], pure=False)
            fabric.delete("car/gone")
            del view  # the last view: the memory comes back while the task still waits
            wait_for(lambda: blocks(fabric) == before, "the deleted argument's memory back")
            fabric.insert("car/other", "", np.float64, values(8, 50_000))  # may take the freed bytes
            hold.set()
            with pytest.raises(ReferenceGoneError, match="deleted"):
                task.result(timeout=20)
            assert sorted(client.scheduler_info()["workers"]) == alive, "a worker left"
            assert client.submit(checksum, fabric.get("car/other"), workers=[a], pure=False).result(timeout=20)[1]
            fabric.delete("car/other")
            wait_for(lambda: blocks(fabric) == before, "every byte back")
        finally:
            fabric.shutdown()


def test_a_gone_result_gathered_by_the_client_raises_on_use_instead_of_hanging(client, cfabric):
    """A result spilled as its reference, its variable deleted and let go: the client's
    read of it is on its event loop (raising there, the gather hung)."""
    from tests.test_references import spill_everything

    a, _ = sorted(client.scheduler_info()["workers"])
    cfabric.insert("car/spilled", "", np.float64, values(14, 1000))
    held = client.submit(lambda f: f.get("car/spilled")[10:], cfabric, workers=[a], pure=False)
    wait(held)
    client.run(spill_everything, workers=[a])
    cfabric.delete("car/spilled")
    got = held.result(timeout=20)
    with pytest.raises(ReferenceGoneError, match="deleted"):
        np.asarray(got)
    assert "UnreadableReference" in repr(got)
    del got, held


def open_gate(gate: str) -> None:
    Event(gate).wait(timeout=60)


def test_churn_of_arguments_deleted_dropped_and_compacted_between_submit_and_run(client, cfabric):
    """Seeded rounds: new variables, tasks on slices of random ones held back by a gate,
    then names deleted, client views dropped, a defragment, and the gate opened.  Every task
    reads the right bytes, but one whose variable was deleted and dropped by the client
    (nothing else holds it), which may fail with ReferenceGoneError; never wrong bytes."""
    rng = np.random.default_rng(SEED + 1)
    before, nodes = blocks(cfabric), sorted(client.scheduler_info()["workers"])
    seeds, views, deleted, outcomes = {}, {}, set(), []
    for step in range(ROUNDS):
        for k in range(3):
            name = f"car/churn{step}_{k}"
            seeds[name] = int(rng.integers(1 << 30))
            cfabric.insert(name, "", np.float64, values(seeds[name], int(rng.integers(1000, 30_000))))
            views[name] = cfabric.get(name)
        gate = Event(f"car-churn-{step}")
        blocker = client.submit(open_gate, gate.name, workers=[nodes[step % 2]], pure=False)
        for _ in range(5):
            name = sorted(views)[int(rng.integers(len(views)))]
            lo, stride = int(rng.integers(0, 500)), int(rng.integers(1, 5))
            task = client.submit(lambda _, x: checksum(x), blocker, views[name][lo::stride], pure=False)
            outcomes.append((task, name, values(seeds[name], len(views[name]))[lo::stride].sum()))
        for name in sorted(views):
            roll = rng.random()
            if roll < 0.25 and name not in deleted:
                cfabric.delete(name)
                deleted.add(name)
            if roll < 0.15 or 0.25 <= roll < 0.4:
                del views[name]  # dropped: deleted too, or just unviewed (then free to move)
        cfabric.defragment()
        no_scheduler_lease(client)
        gate.set()
        for task, name, want in outcomes[-5:]:
            if task.status == "error" or task.exception(timeout=30) is not None:
                assert name in deleted and name not in views, (name, task.exception())
                assert isinstance(task.exception(), ReferenceGoneError)
            else:
                assert task.result() == ("FabricView", True, want), name
        del task, blocker
    assert sum(1 for task, _, _ in outcomes if task.exception() is None) >= len(outcomes) // 2
    del outcomes, views
    for step in range(ROUNDS):
        Event(f"car-churn-{step}").clear()
    cfabric.delete_many(sorted(set(seeds) - deleted))
    no_scheduler_lease(client)
    wait_for(lambda: blocks(cfabric) == before, "every byte back")


# -- (2) tasks run again after their worker died, and stolen ones ---------------------------
def die_once(marker: str, x) -> tuple:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker dies holding the task: the scheduler sends it again
    return checksum(x)


def reschedule_once(marker: str, x) -> tuple:
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise Reschedule()  # the scheduler decides again and sends the task's spec again
    return checksum(x)


def test_tasks_run_again_after_their_worker_died_and_stolen_ones_read_the_right_bytes(tmp_path):
    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=32)
        try:
            before = blocks(fabric)
            fabric.insert("car/retry", "", np.float64, values(9, 100_000))
            view = fabric.get("car/retry")
            a, _ = sorted(client.scheduler_info()["workers"])
            retried = client.submit(die_once, str(tmp_path / "died"), view[5:], workers=[a], pure=False)
            fabric.delete("car/retry")  # the client's view alone keeps it, across the retry
            assert retried.result(timeout=60) == ("FabricView", True, values(9, 100_000)[5:].sum())
            client.wait_for_workers(2, timeout=60)
            again = client.submit(reschedule_once, str(tmp_path / "rescheduled"), view[::9], pure=False)
            assert again.result(timeout=30) == ("FabricView", True, values(9, 100_000)[::9].sum())
            assert (tmp_path / "rescheduled").exists()
            a, _ = sorted(client.scheduler_info()["workers"])
            sleepy = [  # all queued on one worker with others free: stealing moves some
                client.submit(
                    lambda x: (__import__("time").sleep(0.05), checksum(x))[1],
                    view[i::7],
                    workers=[a],
                    allow_other_workers=True,
                    pure=False,
                )
                for i in range(40)
            ]
            got = client.gather(sleepy)
            assert got == [("FabricView", True, values(9, 100_000)[i::7].sum()) for i in range(40)]
            del retried, again, sleepy, got
            no_scheduler_lease(client)
            del view
            wait_for(lambda: blocks(fabric) == before, "every byte back")
        finally:
            fabric.shutdown()


# -- (4) the flag reaches nothing else --------------------------------------------------------
def hand_back(fabric, name: str):
    return fabric.get(name)[3:]


def test_views_the_client_receives_and_other_scheduler_paths_stay_views(client, cfabric):
    cfabric.insert("car/back", "", np.float64, values(11, 8192))
    want = values(11, 8192)[3:]
    received = [
        client.submit(hand_back, cfabric, "car/back", pure=False).result(),
        client.gather(client.submit(hand_back, cfabric, "car/back", pure=False)),
        *client.run(hand_back, cfabric, "car/back").values(),
    ]
    queue, var = Queue("car-queue"), Variable("car-var")
    queue.put(cfabric.get("car/back")[3:])
    var.set(cfabric.get("car/back")[3:])
    received += [queue.get(timeout=10), var.get(timeout=10)]
    [scattered] = client.scatter([cfabric.get("car/back")[3:]], broadcast=True)
    client.publish_dataset(car_published=scattered)
    received.append(client.get_dataset("car_published").result())
    for got in received:
        assert type(got) is FabricView and pin_of(got) is not None, type(got)
        assert np.array_equal(got, want)
    var.delete()
    client.unpublish_dataset("car_published")
    del received, scattered, queue, var
    cfabric.delete("car/back")


class SpawnsOnGraphs(SchedulerPlugin):
    """A plugin whose update_graph hook starts a task of its own that, later, unpickles a
    view on the scheduler: a task started inside the handler copies its context."""

    name = "car-spawner"

    def __init__(self, blob: bytes):
        self.blob, self.seen = blob, []

    def update_graph(self, scheduler, **kwargs) -> None:
        async def later():
            await asyncio.sleep(0.1)  # the handler has returned by now
            self.seen.append(type(pickle.loads(self.blob)).__name__)

        asyncio.get_running_loop().create_task(later())


def test_a_task_a_plugin_starts_inside_update_graph_unpickles_views_as_views(client, cfabric):
    cfabric.insert("car/spawn", "", np.float64, values(12, 512))
    blob = pickle.dumps(cfabric.get("car/spawn")[1:])
    client.register_plugin(SpawnsOnGraphs(blob))
    try:
        assert client.submit(lambda: 1, pure=False).result() == 1
        seen = wait_for(
            lambda: client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["car-spawner"].seen)
        )
        assert seen[0] == "FabricView"
    finally:
        client.unregister_scheduler_plugin("car-spawner")
    cfabric.delete("car/spawn")
