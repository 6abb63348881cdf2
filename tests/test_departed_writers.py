"""A writer's reservation outlives the writer's departure while its process may write.

Leaving the scheduler is not dying (a client whose stream broke reconnects with its id;
a worker removed while its task runs keeps running it), so a departed writer's
reservations it may still write into (the block is on its node, it maps it) are kept out
of reuse until the block's owner proves the process dead, or the writer seals or aborts
them; bytes streamed by a writer off the node go through its owner, which writes only
into the reservation they name.  Real cluster, real shared memory, a writer process
really SIGKILLed.  (The writer that departs and comes back alive is in
``tests/test_attack_unfilled_left.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
from distributed.protocol import to_serialize

import datafabric
from datafabric.errors import InvalidArgumentError, VariableUnavailableError, WorkerLostError
from tests.waiting import wait_for


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def test_a_streamed_write_lands_only_in_the_reservation_it_names(client):
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    try:
        ctx = fabric._ctx()
        res = ctx.call(
            "reserve", name="streamed", type="16 * uint8", doc="", nbytes=16, node=ctx.node, holder=ctx.holder
        )
        where = {k: res[k] for k in ("shm_id", "extent_offset", "extent_id", "data_offset")}

        def write(**changed):
            data = to_serialize(np.arange(16, dtype=np.uint8).data)
            return ctx.call_worker(res["worker"], "write", **{**where, **changed}, data=data)

        with pytest.raises(VariableUnavailableError):
            write(extent_id=res["extent_id"] ^ 1)
        with pytest.raises(VariableUnavailableError):
            write(extent_offset=res["extent_offset"] + 64)
        with pytest.raises(InvalidArgumentError):
            write(data_offset=res["data_offset"] + 8)  # its last 8 bytes past the data
        with pytest.raises(InvalidArgumentError):
            write(data_offset=res["data_offset"] - 8)  # into the header
        write()
        ctx.call("abort", shm_id=res["shm_id"], extent_offset=res["extent_offset"], extent_id=res["extent_id"])
        wait_for(lambda: used(fabric) == before, "the aborted reservation's memory to return")
        with pytest.raises(VariableUnavailableError):  # a late piece of an aborted insert
            write()
    finally:
        fabric.shutdown()


def test_a_seal_or_abort_of_a_reservation_names_it_by_its_id(client):
    """A late seal or abort of a reservation that ended, whose memory was reserved again at
    the same offset, must not seal or end the new one."""
    fabric = datafabric.start(client, mb=4)
    before = used(fabric)
    try:
        ctx = fabric._ctx()
        res = ctx.call("reserve", name="named", type="16 * uint8", doc="", nbytes=16, node=ctx.node, holder=ctx.holder)
        keys = ("shm_id", "extent_offset", "extent_size", "data_offset", "extent_id")
        item = {"name": "named", "doc": "", "type": "16 * uint8", "nbytes": 16} | {k: res[k] for k in keys}
        with pytest.raises(WorkerLostError):
            ctx.call("seal", items=[item | {"extent_id": res["extent_id"] ^ 1}], holder=ctx.holder)
        with pytest.raises(WorkerLostError):  # another holder's seal
            ctx.call("seal", items=[item], holder=f"{ctx.holder}-other")
        ctx.call("abort", shm_id=res["shm_id"], extent_offset=res["extent_offset"], extent_id=res["extent_id"] ^ 1)
        assert used(fabric) > before  # that abort named another reservation: this one is kept
        ctx.call("seal", items=[item], holder=ctx.holder)
        assert fabric.get("named").nbytes == 16
        fabric.delete("named")
        wait_for(lambda: used(fabric) == before, "the memory to return")
    finally:
        fabric.shutdown()
