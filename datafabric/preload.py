"""``dask scheduler --preload datafabric.preload``: a scheduler that runs the fabric from
its start, so that a scheduler restarted at the same address after a crash takes the
blocks its predecessor left in shared memory back, with every sealed variable in them.

Memory is added as usual, by ``datafabric start --scheduler ADDRESS --mb N`` or
``datafabric.start(client, mb=N)``, which use the preloaded fabric.
"""

from __future__ import annotations

from typing import Any

from yp.plugin import YellowPages


async def dask_setup(scheduler: Any) -> None:
    await scheduler.register_scheduler_plugin(YellowPages(), idempotent=True)
