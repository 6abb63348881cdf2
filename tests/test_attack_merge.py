"""Adversarial tests of the protocols merged together: datasets against deletes, seals
against deletes, chunk names at every delete entry point.

Each test drives real worker processes (and real SIGSTOP) into a window the merged code
leaves open, and checks an invariant of ``docs/protocols.md``: nothing half-written is
visible, a deleted name's memory is freed once unread, the fabric's own chunk names are
refused where a user names something to change.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import cloudpickle
import numpy as np
import pytest

from datafabric import errors
from datafabric.names import chunk_name
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
