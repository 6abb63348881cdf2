"""Which node (machine, or simulated machine) this process is on."""

from __future__ import annotations

import dask
from distributed.comm import get_address_host


def configured_node() -> str | None:
    """The Dask config key ``datafabric.node-id`` (env ``DASK_DATAFABRIC__NODE_ID``):
    set it for containers and to simulate several nodes on one machine."""
    node = dask.config.get("datafabric.node-id", None)
    return str(node) if node not in (None, "") else None


def worker_node(address: str) -> str:
    return configured_node() or get_address_host(address)
