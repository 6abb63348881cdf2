"""Adversarial tests of the protocols merged together: datasets against deletes, seals
against deletes, chunk names at every delete entry point.

Each test drives real worker processes (and real SIGSTOP) into a window the merged code
leaves open, and checks an invariant of ``docs/protocols.md``: nothing half-written is
visible, a deleted name's memory is freed once unread, the fabric's own chunk names are
refused where a user names something to change.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib

import cloudpickle
import numpy as np
import pytest

import datafabric
from datafabric import errors
from datafabric.names import chunk_name
from datafabric.protocol import SCHEDULER_PLUGIN
from tests import churn
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def variables(fabric) -> int:
    return sum(b["variables"] for b in fabric.status())


def known(fabric, name: str) -> bool:
    """Whether the directory has a variable ``name`` (asking no worker)."""
    try:
        fabric.get_locations(name)
    except errors.NameNotFoundError:
        return False
    return True


def write_rows(ds, start: int, stop: int, value: float) -> None:
    ds[start:stop] = value


def test_a_chunk_of_a_sealed_dataset_cannot_be_deleted_by_its_name(fabric):
    """A chunk variable is the fabric's own: deleting it by name would leave its dataset
    pointing at a variable that is gone.  ``delete`` and ``delete_many`` refuse it
    clearly and change nothing."""
    before = used(fabric)
    with fabric.create_dataset("own/ds", (8,), np.int32, chunks=(4,), fillvalue=-1) as ds:
        ds[0:8] = np.arange(8, dtype=np.int32)
    chunk = chunk_name(ds.id, 0)
    assert chunk == ds.chunk_name(0)
    with pytest.raises(errors.InvalidNameError, match="the fabric's own"):
        fabric.delete(chunk)
    with pytest.raises(errors.FabricError):
        fabric.delete_many([chunk])
    np.testing.assert_array_equal(fabric.dataset("own/ds")[...], np.arange(8, dtype=np.int32))
    fabric.delete("own/ds")
    wait_for(lambda: used(fabric) == before, "the dataset's chunks to be freed")


def test_a_dataset_deleted_while_its_seal_marks_the_chunks_leaves_nothing(client, fabric):
    """The seal turns homes into chunk variables, then awaits the owners' SEALED marks,
    then makes the dataset visible.  A delete in that await ends the dataset: the seal
    must not then make it visible, nor leave its chunk variables (hidden, so nobody could
    delete them) holding memory."""
    before = used(fabric)
    ds = fabric.create_dataset("race/sealdel", (64,), np.float64, chunks=(16,), fillvalue=-1)
    client.submit(write_rows, ds, 0, 64, 3.0, pure=False).result()
    pids = list(client.run(os.getpid).values())
    outcome: dict = {}

    def seal() -> None:
        try:
            ds.seal()
            outcome["sealed"] = True
        except errors.FabricError as exc:
            outcome["refused"] = exc

    for pid in pids:  # the owners of the homes: the seal's mark waits for them
        os.kill(pid, signal.SIGSTOP)
    try:
        sealing = threading.Thread(target=seal)
        sealing.start()
        wait_for(lambda: known(fabric, chunk_name(ds.id, 3)), "the seal to make the homes chunk variables")
        assert sealing.is_alive()
        fabric.delete("race/sealdel")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    sealing.join(60)
    assert not sealing.is_alive()
    assert "refused" in outcome, "a seal whose dataset was deleted meanwhile reported success"
    assert "race/sealdel" not in fabric
    with pytest.raises(errors.NameNotFoundError):
        fabric.dataset("race/sealdel")
    wait_for(lambda: variables(fabric) == 0 and used(fabric) == before, "the deleted dataset's chunks to be freed")


def base_of(name: str) -> int:
    return zlib.crc32(name.encode()) << 20


def dataset_churn(fabric, actor: str, seed: int, seconds: float) -> dict:
    """Create, write (several writes per dataset), seal, read and hold zero-copy chunk
    views of others' datasets, delete own old rounds (``delete`` or ``delete_prefix``,
    datasets and plain variables under one prefix), defragment now and then.  Element i
    of dataset NAME holds ``base_of(NAME) + i``, so a view of wrong bytes shows."""
    rng = random.Random(seed)
    held: list[tuple[str, int, np.ndarray]] = []
    counts = {"sealed": 0, "deleted": 0, "reads": 0, "bad": 0, "gone": 0, "full": 0}
    rounds: list[str] = []
    deadline = time.monotonic() + seconds
    r = 0
    while time.monotonic() < deadline:
        prefix = f"dsc/{actor}/{r}/"
        r += 1
        rounds.append(prefix)
        for k in range(rng.randint(1, 3)):
            name, n = f"{prefix}{k}", rng.choice((50, 3000, 40_000))
            chunk = max(1, n // rng.choice((1, 3, 7)))
            values = base_of(name) + np.arange(n, dtype=np.int64)
            try:
                with fabric.create_dataset(name, (n,), np.int64, chunks=(chunk,), fillvalue=-1) as ds:
                    cut = rng.randrange(n)
                    ds[cut:] = values[cut:]
                    ds[:cut] = values[:cut]
                counts["sealed"] += 1
            except errors.OutOfSpaceError:
                counts["full"] += 1
        with contextlib.suppress(errors.OutOfSpaceError):
            fabric.insert(f"{prefix}plain", "", np.int64, np.arange(100, dtype=np.int64))
        for name in fabric.get_list("dsc/", limit=20, after=f"dsc/{rng.random()}")[:6]:
            if name.endswith("plain"):
                continue
            try:
                ds = fabric.dataset(name)
                start = rng.randrange(ds.shape[0])
                c = ds.chunks[0]
                stop = min(ds.shape[0], (start // c + 1) * c)  # inside one chunk: a view
                view = ds[start:stop]
                whole = ds[...]
            except errors.NameNotFoundError:
                counts["gone"] += 1
                continue
            counts["reads"] += 1
            counts["bad"] += not np.array_equal(whole, base_of(name) + np.arange(len(whole)))
            held.append((name, start, view))
        rng.shuffle(held)
        for name, start, view in held[10:]:
            counts["bad"] += not np.array_equal(view, base_of(name) + np.arange(start, start + len(view)))
        del held[10:]
        if len(rounds) > 2:
            old = rounds.pop(0)
            if rng.random() < 0.5:
                counts["deleted"] += fabric.delete_prefix(old)
            else:
                for name in fabric.get_list(old):
                    fabric.delete(name)
                    counts["deleted"] += 1
        if rng.random() < 0.2:
            fabric.defragment()
    for name, start, view in held:
        counts["bad"] += not np.array_equal(view, base_of(name) + np.arange(start, start + len(view)))
    return counts


@pytest.mark.timeout(240)
def test_churn_of_datasets_with_chunk_views_held_reads_only_right_bytes(client):
    """Actors in tasks on both workers (local leases, ``get_many`` of chunks) and the
    client churn datasets through create, seal, read, delete, ``delete_prefix`` and
    defragment: every view held reads its own bytes to the end, and all memory returns."""
    fabric = datafabric.start(client, mb=96)
    try:
        total = churn.everywhere(client, dataset_churn, fabric, 290, 12)
        print(total)
        assert total["bad"] == 0, f"bad reads: {total}"
        assert total["sealed"] > 30 and total["reads"] > 30, f"the churn did too little: {total}"
        fabric.delete_prefix("dsc/")
        assert fabric.get_list("dsc/") == [] and fabric.datasets("dsc/") == []
        wait_for(lambda: all(b["free"] == b["capacity"] for b in fabric.status()), "all memory to return")
    finally:
        fabric.shutdown()


def hold_a_local_view(fabric, name: str, event: str) -> int:
    """In a task: a view of ``name`` (a local lease, no RPC), held while the client
    deletes the name; then the bytes differing from what ``name`` held."""
    from distributed import Event

    view = fabric.get(name)
    Event(f"{event}/held").set()
    Event(f"{event}/deleted").wait(60)
    return int((view != np.arange(len(view), dtype=np.int64) * 3).sum())


def test_a_local_view_held_through_a_delete_keeps_its_bytes_and_its_worker(client, fabric):
    """The recall before the free reports the task's local lease; the YellowPages counts
    it as the worker's, which holds no lease there yet.  The view reads its bytes to the
    end, the worker stays connected, and the memory is freed once the view is gone."""
    from distributed import Event

    a = sorted(client.scheduler_info()["workers"])[0]
    before = used(fabric)
    fabric.insert("local/held", "", np.int64, np.arange(100_000, dtype=np.int64) * 3)
    task = client.submit(hold_a_local_view, fabric, "local/held", "attack-local", workers=[a], pure=False)
    assert Event("attack-local/held", client=client).wait(60)
    fabric.delete("local/held")
    Event("attack-local/deleted", client=client).set()
    assert task.result(timeout=60) == 0
    assert a in client.scheduler_info()["workers"]
    wait_for(lambda: used(fabric) == before, "the deleted variable's memory to be freed")


LATE_WRITER = """
import sys, numpy as np
from distributed import Client
import datafabric
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
ds = fabric.dataset(sys.argv[2])
print("writing", flush=True)
ds[32:48] = 9.0  # its chunk's home is placed while the owners are stopped; killed meanwhile
"""


def placing(dask_scheduler=None) -> int:
    """Chunk homes being placed (reserved, then filled) at the YellowPages."""
    return len(dask_scheduler.plugins[SCHEDULER_PLUGIN].datasets.homes.placing)


def test_a_home_placed_for_a_killed_writer_during_the_seal_is_freed(client, fabric, tmp_path):
    """A writer killed while its chunk's home is being placed loses its ticket at once, so
    the seal must wait for the placement still in flight (a home recorded after the seal
    took the homes would be nobody's): the dataset reads as written, the late home as the
    fill value, and every byte comes back at the delete."""
    before = used(fabric)
    ds = fabric.create_dataset("race/late", (64,), np.float64, chunks=(16,), fillvalue=-1)
    ds[0:16] = 1.0
    pids = list(client.run(os.getpid).values())
    script = tmp_path / "late.py"
    script.write_text(LATE_WRITER)
    writer = subprocess.Popen(
        [sys.executable, str(script), client.scheduler.address, ds.name], stdout=subprocess.PIPE, text=True
    )
    outcome: dict = {}
    try:
        assert writer.stdout.readline().strip() == "writing"
        for pid in pids:  # the owners: the late home's fill and the seal's mark wait for them
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: client.run_on_scheduler(placing) == 1, "the late writer's home placement")
            writer.kill()
            writer.wait(30)
            sealing = threading.Thread(target=lambda: outcome.setdefault("info", ds.seal()))
            sealing.start()
            time.sleep(0.5)  # the seal is under way, waiting for the placement (the owners are stopped)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        sealing.join(60)
        assert not sealing.is_alive() and "info" in outcome
        expected = np.full(64, -1.0)
        expected[0:16] = 1.0
        np.testing.assert_array_equal(fabric.dataset("race/late")[...], expected)
        fabric.delete("race/late")
        wait_for(lambda: used(fabric) == before, "every home, the late one too, to be freed")
    finally:
        writer.kill()
        writer.wait()
