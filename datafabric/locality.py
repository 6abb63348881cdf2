"""Running a task next to the data in a way that survives the death of its workers.

Every worker of the fabric carries a Dask resource named after its node
(``datafabric-node:<node>``, with more slots than any worker has threads, so it never
limits concurrency).  A task that asks for one unit of it runs on any worker of that node
that is alive when the task is scheduled, including one a nanny restarted under a new
address.  Pinning by address (``workers=[...]``) cannot do that: the task waits for the
named address, in Dask's ``no-worker`` state, for ever.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

NODE_RESOURCE_PREFIX = "datafabric-node:"
NODE_SLOTS = 2**20  # per worker: far more than its threads, so the resource only says where


def node_resource(node: str) -> str:
    return f"{NODE_RESOURCE_PREFIX}{node}"


def nearest_node(fabric: Any, names: tuple[str, ...]) -> str | None:
    """The node holding the most of ``names`` (the first in order among equals)."""
    count: Counter[str] = Counter()
    for name in names:
        count.update({node for node, _, _ in fabric.get_locations(name)})
    return count.most_common(1)[0][0] if count else None


def submit_near(fabric: Any, client: Any, call: Any, func: Any, names: tuple[str, ...], kwargs: dict) -> Any:
    """``client.submit(call, fabric, func, names)`` on a worker of the node holding the
    most of ``names``, through its resource; anywhere when no node holds them."""
    node = nearest_node(fabric, names)
    if node is not None and "resources" not in kwargs and "workers" not in kwargs:
        kwargs = {**kwargs, "resources": {node_resource(node): 1}}
    return client.submit(call, fabric, func, names, **kwargs)
