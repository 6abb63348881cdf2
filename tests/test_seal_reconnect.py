"""A seal refused because the YellowPages counts its client gone while the client's stream
reconnects is tried again once the client is back (``datafabric/writer.py::_seal``): the
write is kept, since the YellowPages keeps a departed live writer's reservation for it
(``yp/departed.py``).  A client that never comes back gets the refusal once Dask's client
gives up reconnecting.

The client is kept from reconnecting by its own side (its stream's connection attempts fail
as if the scheduler were unreachable), while its calls still reach the scheduler: so the
YellowPages counts it gone for as long as the test wants, and the first seal is refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from distributed import Client

import datafabric
from datafabric.errors import HolderAwayError
from tests.test_client_events import _cut, _state
from tests.waiting import wait_for


def _kept_away(monkeypatch, client: Client) -> threading.Event:
    """Until the event is set, the client's reconnections fail."""
    let_back = threading.Event()
    reconnect = client._ensure_connected

    async def ensure_connected(timeout=None):
        if not let_back.is_set():
            raise OSError("kept away by the test")
        return await reconnect(timeout=timeout)

    monkeypatch.setattr(client, "_ensure_connected", ensure_connected)
    return let_back


def _away(client, other) -> bool:
    return client.run_on_scheduler(_state, client_id=other.id)[0] is False


def test_a_seal_while_the_writer_s_stream_reconnects_waits_for_it_and_keeps_the_bytes(client, fabric, monkeypatch):
    with Client(client.scheduler.address) as other:
        theirs = datafabric.connect(other)
        creation = theirs.create("sr/x", "", "1000 * float64")
        creation.array[:] = np.arange(1000.0)
        let_back = _kept_away(monkeypatch, other)
        client.run_on_scheduler(_cut, client_id=other.id)
        wait_for(lambda: _away(client, other), "the writer counted gone")
        back = threading.Timer(1.0, let_back.set)
        back.start()
        started = time.monotonic()
        creation.seal()  # refused while away, then sealed once back
        assert time.monotonic() - started >= 0.9  # it did wait for the reconnection
        back.join()
        assert np.array_equal(fabric.get("sr/x"), np.arange(1000.0))
        assert np.array_equal(theirs.get("sr/x"), np.arange(1000.0))
        fabric.delete("sr/x")


def test_a_seal_of_a_writer_that_never_comes_back_is_refused_once_its_client_gives_up(client, fabric, monkeypatch):
    other = Client(client.scheduler.address, timeout="3s")
    try:
        theirs = datafabric.connect(other)
        creation = theirs.create("sr/gone", "", "10 * float64")
        _kept_away(monkeypatch, other)
        client.run_on_scheduler(_cut, client_id=other.id)
        wait_for(lambda: _away(client, other), "the writer counted gone")
        started = time.monotonic()
        with pytest.raises(HolderAwayError, match="has left the cluster"):
            creation.seal()
        assert other.status in ("closing", "closed")  # refused for good once the client gave up reconnecting
        assert time.monotonic() - started < 20
    finally:
        other.close()
    assert "sr/gone" not in fabric.get_list()
