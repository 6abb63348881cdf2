"""Whether a closing worker will be started again by its nanny.

The last worker of a node closing for good unlinks the node's blocks; one its nanny is
restarting (``client.restart()``, ``client.restart_workers``) leaves them for its
successor to adopt, so that the data outlives the restart.  Only the nanny knows which:
it stays running while it restarts its worker, and is closing, or closing gracefully
(a retirement), when the worker goes for good.
"""

from __future__ import annotations

import asyncio
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import NannyPlugin


class RestartIntent(NannyPlugin):
    """Answers its worker's question: will you start me again?"""

    name = "datafabric-restarts"
    idempotent = True

    def setup(self, nanny: Any) -> None:
        nanny.handlers["datafabric_restarts_worker"] = lambda: nanny.status == Status.running


ANSWER_WITHIN = 1.0  # seconds; a closing nanny has stopped listening and never answers


async def nanny_restarts(worker: Any) -> bool:
    if not worker.nanny:
        return False
    try:
        answer = await asyncio.wait_for(worker.rpc(worker.nanny).datafabric_restarts_worker(), ANSWER_WITHIN)
    except Exception:  # no answer, or a nanny without the plugin: not a restart
        return False
    return answer is True
