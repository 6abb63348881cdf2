"""``datafabric stop`` and ``datafabric cleanup``: ending a fabric, and clearing away what
crashed ones left behind.
"""

from __future__ import annotations

import time

import click

import datafabric
from datafabric.cleanup import remove as remove_segments
from datafabric.cleanup import stale_segments
from datafabric.cli import format as fmt
from datafabric.cli.address import connected_client, connected_fabric, resolve_address, running_start_address
from datafabric.cli.app import CliError, cli, connection_options, json_option
from datafabric.errors import NoFabricError

STOP_WAIT = 60.0  # seconds `stop` waits for an embedded `start` to close its cluster


@cli.command(short_help="Shut the fabric down.")
@connection_options
def stop(scheduler: str | None, timeout: float) -> None:
    """Shut the fabric down: unlink every block on every node.

    A fabric started by an embedded `datafabric start` takes its cluster with it: that
    start exits, and stop waits for it.  Its state file is
    $XDG_RUNTIME_DIR/datafabric/scheduler, else the same under $XDG_CACHE_HOME or ~/.cache.

    \b
    Example:
      datafabric stop
      datafabric stop --scheduler tcp://10.0.0.5:8786
    """
    address = resolve_address(scheduler)
    embedded = address == running_start_address()
    with connected_fabric(address, timeout) as fabric:
        fabric.shutdown()
    click.echo(f"stopped fabric {fabric.fabric_id[:8]} on {address}: every block is unlinked")
    if not embedded:
        return
    deadline = time.monotonic() + STOP_WAIT
    while running_start_address() == address:
        if time.monotonic() > deadline:
            raise CliError(f"the embedded `datafabric start` at {address} is still closing its cluster")
        time.sleep(0.1)
    click.echo("the embedded `datafabric start` has closed its cluster and exited")


@cli.command(short_help="Remove segments left by crashed fabrics.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@connection_options
@json_option
def cleanup(dry_run: bool, scheduler: str | None, timeout: float, as_json: bool) -> None:
    """Remove this machine's fabric segments that no process maps and no running fabric
    claims: what is left in /dev/shm when every process of a fabric crashed.  The fabric
    of the scheduler found as usual (--scheduler, DASK_SCHEDULER_ADDRESS, a running
    `datafabric start`) is kept whole, including blocks waiting for adoption.

    \b
    Example:
      datafabric cleanup --dry-run
      datafabric cleanup
    """
    live: set[str] = set()
    try:
        address = resolve_address(scheduler)
    except CliError:
        address = None  # nothing running that we know of: mappings alone decide
    if address is not None:
        with connected_client(address, timeout) as client:
            try:
                live.add(datafabric.connect(client).fabric_id)
            except NoFabricError:
                pass
    stale = stale_segments(live)
    removed = stale if dry_run else remove_segments(stale)
    if as_json:
        click.echo(fmt.to_json({"removed": [] if dry_run else removed, "stale": stale}))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(removed)} stale segment(s)" + "".join(f"\n  {n}" for n in removed))
