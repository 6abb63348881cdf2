"""``datafabric stop`` and ``datafabric cleanup``: ending a fabric, and clearing away what
crashed ones left behind.
"""

from __future__ import annotations

import time

import click
import dask.config

import datafabric
from datafabric.cleanup import remove_dead, survey
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
@click.argument("names", nargs=-1, metavar="[SEGMENT]...")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed, and why the rest is kept.")
@click.option(
    "--none-running",
    is_flag=True,
    help="No scheduler to ask: you state that no fabric with blocks on this machine is running.",
)
@click.option("--forget-durable", is_flag=True, help="Remove dead blocks of durable (preloaded) fabrics too.")
@connection_options
@json_option
def cleanup(
    names: tuple[str, ...],
    dry_run: bool,
    none_running: bool,
    forget_durable: bool,
    scheduler: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Remove this machine's fabric segments (or the SEGMENTs named) that are proven
    dead: what is left in /dev/shm when every process of a fabric crashed.

    A segment is removed only if it is this user's with mode 0600; it is older than
    10 s (a younger one may be a block being created); its header reads as a fabric
    block; its fabric is not the one running on the scheduler asked (--scheduler,
    DASK_SCHEDULER_ADDRESS, and a running `datafabric start`, each of which must
    answer); its fabric is not durable (a preloaded scheduler that restarts takes its
    blocks back), unless --forget-durable; and no process maps it.  Every other segment
    is kept and listed with the reason.  With no scheduler to ask, cleanup refuses
    unless --none-running.

    \b
    Example:
      datafabric cleanup --dry-run --scheduler tcp://10.0.0.5:8786
      datafabric cleanup --none-running
    """
    addresses = {a for a in (scheduler or dask.config.get("scheduler-address", None), running_start_address()) if a}
    if not addresses and not none_running:
        raise CliError(
            "no scheduler to ask which fabrics run, so nothing is proven dead; name it with --scheduler ADDRESS, "
            "or pass --none-running if no fabric with blocks on this machine is running"
        )
    live = {_running_fabric(address, timeout) for address in sorted(addresses)} - {None}
    verdicts = survey(live, list(names) or None, forget_durable=forget_durable)
    removed = [] if dry_run else remove_dead(verdicts)
    dead = [v.name for v in verdicts if v.kept_because is None]
    kept = {v.name: v.kept_because for v in verdicts if v.kept_because is not None}
    if as_json:
        click.echo(fmt.to_json({"removed": removed, "stale": dead, "kept": kept}))
        return
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {len(dead if dry_run else removed)} dead segment(s)"]
    lines += [f"  {n}" for n in (dead if dry_run else removed)]
    lines += [f"kept {name}: {why}" for name, why in kept.items()]
    click.echo("\n".join(lines))


def _running_fabric(address: str, timeout: float) -> str | None:
    """The id of the fabric running on the scheduler at ``address``; a scheduler that
    does not answer is an error: what it runs cannot be known."""
    with connected_client(address, timeout) as client:
        try:
            return datafabric.connect(client).fabric_id
        except NoFabricError:
            return None
