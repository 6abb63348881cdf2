"""What Dask's TCP comms write, counted in every process of a cluster: the bytes on the wire."""

from __future__ import annotations

from typing import Any


def _count() -> int:
    """Installs the counter in this process on first use; the bytes written since."""
    from distributed.comm import tcp

    if not hasattr(tcp.TCP, "_written"):
        original = tcp.TCP.write

        async def write(self, msg, serializers=None, on_error="message"):
            n = await original(self, msg, serializers, on_error)
            tcp.TCP._written += n
            return n

        tcp.TCP._written = 0
        tcp.TCP.write = write
    return tcp.TCP._written


def bytes_written(client: Any) -> int:
    """Bytes written so far by the workers, the scheduler and this process (a LocalCluster's
    scheduler shares it)."""
    return sum(client.run(_count).values()) + _count()
