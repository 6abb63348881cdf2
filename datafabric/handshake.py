"""Each Dask comm's handshake says which node its process is on, so that a view about
to cross to another node can travel as its bytes rather than as a reference.

A reference that reaches a process of a node with no copy of its variable is turned
back into a view by reading the bytes from a worker of a node that has one, over that
worker's event loop.  Where Dask reads the message, the receiver's event loop is the
one that waits (``datafabric.loopcalls``), so two workers of two nodes receiving each
other's views at once each wait for the other's blocked loop: a deadlock, broken only
by ``CALL_TIMEOUT``.  The sender holds the memory mapped, so when the comm's peer is on
another node it sends the bytes instead (``references._serialize``), and no loop waits.

Dask passes the serialisers a ``context`` whose ``recipient`` is the handshake the peer
sent when the comm opened; this module adds ``datafabric-node`` to it.  A process that
does not know its node (a client with no configured ``datafabric.node-id``, which maps
whatever it can) says nothing, and its peers send it references as before.  A view that
Dask pickles (inside an object its ``dask`` serialisers do not take apart) is reduced by
``FabricView.__reduce_ex__``, which is given no context: Dask's ``pickle`` family is
wrapped to say the peer's node for the duration of the call (``peer_node``).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import distributed
from distributed.comm.core import Comm
from distributed.protocol.serialize import families, register_serialization_family

from datafabric.node import configured_node, worker_node

HANDSHAKE_KEY = "datafabric-node"
# The node of the peer Dask's pickle family is pickling for now, if it said
_pickling_for: ContextVar[str | None] = ContextVar("datafabric_pickling_for", default=None)


def this_node() -> str | None:
    """The node a worker of this process registers its blocks under, or the configured
    node; None for a process that has neither."""
    node = configured_node()
    if node is not None:
        return node
    for worker in list(distributed.Worker._instances):
        if worker.address is not None:
            return worker_node(worker.address)
    return None


def recipient_node(context: dict | None) -> str | None:
    """The node of the peer a message is being serialised for, if it said."""
    recipient = (context or {}).get("recipient") or {}
    node = recipient.get(HANDSHAKE_KEY)
    return str(node) if node is not None else None


def peer_node() -> str | None:
    """The node of the peer an object is being pickled for by Dask, if it said."""
    return _pickling_for.get()


def install() -> None:
    """Add this process's node to the handshake of every comm it opens or accepts from
    now on (comms already open keep theirs: their peers send references), and say the
    peer's node while Dask's pickle family runs."""
    original = Comm.handshake_info
    if getattr(original, "datafabric_node", False):
        return
    pickle_dumps, pickle_loads, _ = families["pickle"]

    def pickle_for_peer(x: Any, context: dict | None = None) -> Any:
        token = _pickling_for.set(recipient_node(context))
        try:
            return pickle_dumps(x, context=context)
        finally:
            _pickling_for.reset(token)

    register_serialization_family("pickle", pickle_for_peer, pickle_loads)

    def handshake_info(self: Comm) -> dict[str, Any]:
        info = original(self)
        node = this_node()
        if node is not None:
            info[HANDSHAKE_KEY] = node
        return info

    handshake_info.datafabric_node = True  # type: ignore[attr-defined]
    Comm.handshake_info = handshake_info  # type: ignore[method-assign]
