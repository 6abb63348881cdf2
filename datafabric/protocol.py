"""What the parts agree on: plugin names, the handler prefix, the event topic, and how a
refusal travels back to the caller."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from datafabric import errors

WORKER_PLUGIN = "datafabric"
SCHEDULER_PLUGIN = "datafabric-yellowpages"
HANDLER_PREFIX = "datafabric_"  # every RPC and stream op of the fabric starts with this
EVENT_TOPIC = "datafabric"  # clients hear of invalidations and unlinked blocks here
TRANSFER_CHUNK = 64 * 2**20  # bytes per message when data crosses nodes
CHUNKS_IN_FLIGHT = 4  # messages a fetch keeps in flight


def refusal(exc: Exception) -> dict:
    """A handler's answer for a refused request: expected outcomes travel as data, so
    Dask does not log them as server errors, and the caller re-raises the same class."""
    return {"refused": type(exc).__name__, "message": str(exc)}


def raise_if_refused(answer: Any) -> Any:
    if isinstance(answer, dict) and "refused" in answer:
        cls = getattr(errors, answer["refused"], errors.FabricError)
        raise cls(answer["message"])
    return answer


def answering_refusals(handler: Callable) -> Callable:
    """Wrap an RPC handler so that FabricErrors become refusals."""
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def wrapped_async(**kwargs):
            try:
                return await handler(**kwargs)
            except errors.FabricError as exc:
                return refusal(exc)

        return wrapped_async

    @functools.wraps(handler)
    def wrapped(**kwargs):
        try:
            return handler(**kwargs)
        except errors.FabricError as exc:
            return refusal(exc)

    return wrapped
