"""The YellowPages: a SchedulerPlugin that is the fabric's single source of truth.

It never touches shared memory.  This module is the Dask-facing part only: the plugin's
life, Dask's membership hooks and the table of ``datafabric_<op>`` handlers, each served by
the component that owns its protocol::

    directory.py   names, blocks, leases, reservations (no Dask)
    owners.py      the one way to talk to block owners
    moves.py       when offsets may change and be used; compaction (defragment)
    placement.py   free -> compact -> evict, for every new extent
    inserts.py     reserve, abort, seal
    departed.py    reservations kept while a departed writer's process may still write
    reads.py       acquire, release, info, names, where
    local_leases.py  what each node's workers lease without asking; recalling it
    deletes.py     delete
    copies.py      replicas and migration
    membership.py  registration, removal, handoff, adoption, take-back after a restart
    blocks.py      allocate, deallocate, status, shutdown
    datasets.py    chunked datasets: create, chunk homes, write tickets, seal, end
    dataset_records.py  sealed datasets' records; rebuilding them after a restart
    locality.py    tasks reading a dataset's chunks run on a node holding them
    failover.py    tasks pinned to dead fabric workers run on a live worker of their node
    http/          the HTTP/JSON API, its leases with a time to live, and the web page

Lease releases arrive one-way on the scheduler's batched streams (``datafabric_release``),
so that dropping a view costs its process no round trip.
"""

from __future__ import annotations

import enum
import functools
import inspect
import uuid
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps

from datafabric.errors import FabricError, NoFabricError
from datafabric.protocol import HANDLER_PREFIX, SCHEDULER_PLUGIN, answering_refusals
from datafabric.references import carrying
from worker_plugin.memory import SharedMemoryAwareNanny
from worker_plugin.plugin import FabricWorkerPlugin
from worker_plugin.restarts import RestartIntent
from yp.blocks import Inventory
from yp.client_events import ClientEvents
from yp.copies import Copies
from yp.datasets import Datasets
from yp.deletes import Deletes
from yp.departed import DepartedWriters
from yp.directory import Directory
from yp.failover import Failover
from yp.http import install as install_http
from yp.http.leases import Leases
from yp.inserts import Inserts
from yp.local_leases import LocalLeases
from yp.locality import restrict_chunk_tasks
from yp.membership import Membership
from yp.moves import BlockMoves, Compaction
from yp.owners import Owners
from yp.placement import Placement
from yp.reads import Reads


def durable_fabric_id(scheduler_address: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"datafabric:{scheduler_address}").hex


class Status(enum.Enum):
    NEW = "new"  # not started on a scheduler yet
    RUNNING = "running"
    STOPPED = "stopped"  # shut down: every call is refused; a new start registers a new plugin


class YellowPages(SchedulerPlugin):
    """``fabric_id`` None makes a durable fabric: its id comes from the scheduler's
    address, so the YellowPages of a scheduler restarted at that address (loaded with
    ``--preload datafabric.preload``) recognises the blocks left in shared memory."""

    name = SCHEDULER_PLUGIN

    def __init__(self, fabric_id: str | None = None) -> None:
        self.durable = fabric_id is None
        self.fabric_id = fabric_id
        self.status = Status.NEW
        self.directory = Directory()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        if self.durable:
            self.fabric_id = durable_fabric_id(scheduler.address)
        d = self.directory
        self.moves = BlockMoves()
        self.owners = Owners(scheduler, d, self.moves)
        self.members = Membership(scheduler, self.fabric_id, d, self.owners, self.moves)
        self.local = self.members.local = LocalLeases(d, self.moves, self.owners, self.members)
        self.compaction = Compaction(d, self.moves, self.owners, self.members.lost_block, self.local)
        self.placement = Placement(d, self.moves, self.compaction, self.owners, self.local)
        self.inserts = Inserts(d, self.placement, self.owners, self.members, self.local)
        self.departed = DepartedWriters(d, self.owners)  # reservations that outlive their writer's departure
        self.client_events = ClientEvents(scheduler, self.fabric_id)  # never in a stream's first batch
        self.members.kept_reserved = self.departed.wake  # a closing worker's own, kept by its adopter
        self.reads = Reads(d, self.moves, self.owners, self.members)
        self.deletes = Deletes(d, self.reads, self.owners, self.fabric_id, self.local)
        self.copies = Copies(d, self.reads, self.placement, self.owners, self.local)
        self.datasets = Datasets(d, self.placement, self.owners, self.reads, self.deletes, self.members, self.local)
        self.members.node_back = self.datasets.records.node_back  # sealed datasets rebuilt after a restart
        self.failover = Failover(scheduler, self.members)  # tasks pinned to dead workers of a node
        self.inventory = Inventory(self.fabric_id, d, self.moves, self.owners, self.members, self.copies)
        self.http_leases = Leases(self)
        self.page = install_http(scheduler)
        self.status = Status.RUNNING
        scheduler.handlers.update(
            {f"{HANDLER_PREFIX}{op}": answering_refusals(self._guarded(h)) for op, h in self._handlers().items()}
        )
        scheduler.handlers[f"{HANDLER_PREFIX}handoff"] = self.handoff  # answered even when stopped
        scheduler.stream_handlers["datafabric_release"] = self.reads.release
        scheduler.stream_handlers["datafabric_recalled"] = self.local.recalled
        scheduler.stream_handlers["datafabric_used"] = self.local.used
        scheduler.stream_handlers["datafabric_dataset_end_write"] = self.datasets.end_write_sent
        scheduler.stream_handlers["update-graph"] = carrying(scheduler.stream_handlers["update-graph"])
        await self._install_on_workers()

    def _handlers(self) -> dict[str, Callable]:
        return {
            "register_worker": self.members.register,
            "allocate": self.inventory.allocate,
            "deallocate": self.inventory.deallocate,
            "status": self.inventory.status,
            "shutdown": self.shutdown,
            "reserve": self.inserts.reserve,
            "abort": self.inserts.abort,
            "seal": self.inserts.seal,
            "acquire": self.reads.acquire,
            "acquire_at": self.reads.acquire_at,
            "declare_kept": self.members.declare_kept,
            "declared": self.members.declarations.declared,
            "acquire_ref": self.reads.acquire_ref,
            "acquire_many": self.reads.acquire_many,
            "names": self.datasets.names,
            "info": self.datasets.info,
            "where": self.reads.where,
            "delete": self.datasets.delete,
            "delete_many": self.datasets.delete_many,
            "dataset_create": self.datasets.create,
            "dataset_open": self.datasets.open,
            "dataset_list": self.datasets.list,
            "dataset_begin_write": self.datasets.begin_write,
            "dataset_end_write": self.datasets.end_write,
            "dataset_seal": self.datasets.seal,
            "dataset_abort": self.datasets.abort,
            "defragment": self.compaction.defragment,
            "replicate": self.copies.replicate,
            "replicate_to": self.copies.replicate_to,
            "page": lambda: {"address": self.page},
        }

    @property
    def running(self) -> bool:
        return self.status is Status.RUNNING

    def _guarded(self, handler: Callable) -> Callable:
        """Refuse every call once the fabric is shut down."""

        def check() -> None:
            if not self.running:
                raise NoFabricError(
                    "the fabric has been shut down; start a new one with datafabric.start(client, mb=...)"
                )

        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def guarded_async(**kwargs: Any) -> Any:
                check()
                return await handler(**kwargs)

            return guarded_async

        @functools.wraps(handler)
        def guarded(**kwargs: Any) -> Any:
            check()
            return handler(**kwargs)

        return guarded

    async def _install_on_workers(self) -> None:
        """The worker side goes to every worker and nanny, present and future, from here:
        a restarted scheduler's YellowPages re-installs it with no client involved."""
        plugins = [
            (self.scheduler.register_nanny_plugin, SharedMemoryAwareNanny()),
            (self.scheduler.register_nanny_plugin, RestartIntent()),
            (self.scheduler.register_worker_plugin, FabricWorkerPlugin(self.fabric_id)),
        ]
        for register, plugin in plugins:
            answers = await register(comm=None, plugin=dumps(plugin), name=plugin.name, idempotent=False)
            for address, answer in answers.items():
                if answer.get("status") == "error":
                    raise FabricError(f"{address} could not set up {plugin.name!r}: {answer.get('exception_text')}")

    async def shutdown(self, fabric_id: str | None = None) -> dict:
        """Unlink every block on every worker; the fabric is stopped for good.  A caller
        naming another fabric (one shut down before this one started) ends nothing."""
        if fabric_id is not None and fabric_id != self.fabric_id:
            raise NoFabricError(f"fabric {fabric_id[:8]} was shut down already; {self.fabric_id[:8]} runs here now")
        self.status = Status.STOPPED
        self.http_leases.release_all()
        self.departed.stop()
        await self.inventory.shutdown()
        self.directory.blocks.clear()
        return {}

    async def close(self) -> None:
        """A scheduler closing on purpose takes its fabric with it, as Dask takes its
        workers; only a crash leaves the blocks for a restarted scheduler to take back."""
        if self.running:
            await self.shutdown()

    async def handoff(self, address: str, restarting: bool = False) -> dict:
        if not self.running or self.scheduler.status.name != "running":
            return {"decision": "unlink"}
        return await self.members.handoff(address, restarting)

    # -- Dask's hooks ----------------------------------------------------------------
    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        if self.running:
            self.failover.left(worker)
            self.members.remove(worker)
            self.departed.wake()
            self.datasets.left(worker, self.scheduler.loop.add_callback)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if self.running:
            self.failover.transition(key, finish)

    def update_graph(self, scheduler: Any, *, tasks: list, **kwargs: Any) -> None:
        if self.running:
            restrict_chunk_tasks(scheduler, tasks, self.datasets.workers_for)

    def add_client(self, scheduler: Any, client: str) -> None:
        """A client registers, reconnecting under its id or new; one that outlived a
        scheduler restart reconnects to this YellowPages unannounced.  Either hears the
        fabric's events again once its stream's first batch has gone (``client_events.py``),
        and the latter, once blocks came back, is asked to declare the views it kept."""
        if not self.running:
            return
        self.directory.arrived(client)  # a client that reconnected under its id
        if self.durable:
            self.members.declarations.joined(client)  # take-backs still waiting for declarations wait for it too
        tell = self.members.declarations.tell if self.durable and self.members.took_back else None
        self.client_events.registering(client, self.durable, then=tell)

    def remove_client(self, scheduler: Any, client: str) -> None:
        if self.running:
            self.members.kept.forget(client)
            self.members.declarations.left(client)
            self.owners.free_later(self.directory.drop_holder(client))
            self.departed.wake()
            self.datasets.left(client, self.scheduler.loop.add_callback)
