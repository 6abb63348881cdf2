"""``datafabric start``: a fabric on a running cluster, or on an embedded local cluster
that lives as long as the command does.

Starting is all or nothing: a fabric that cannot get its memory is shut down again, and
the embedded cluster, its fabric and its state file are taken down in order however the
command ends.
"""

from __future__ import annotations

import importlib.util
from contextlib import ExitStack
from typing import Any

import click
import dask.config
import dask.system
import distributed

import datafabric
from datafabric.cli import format as fmt
from datafabric.cli import shield
from datafabric.cli.address import StateFile, connected_client
from datafabric.cli.app import CliError, cli, json_option, timeout_option
from datafabric.cli.supervise import run_script, serve, signals_handled
from datafabric.errors import FabricRunningError, NoFabricError

_EMBEDDED_ONLY = ("workers", "threads_per_worker", "dashboard_address")


@cli.command(context_settings={"allow_interspersed_args": False}, short_help="Start a fabric.")
@click.option(
    "--mb",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    metavar="MB",
    help="Megabytes (2**20 bytes) of shared memory in all, spread evenly over the nodes.",
)
@click.option(
    "--scheduler",
    "-s",
    metavar="ADDRESS",
    help="Install the fabric on this running cluster.  Default: start a local one.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker processes of the embedded cluster.  Default: min(4, CPUs).",
)
@click.option(
    "--threads-per-worker",
    type=click.IntRange(min=1),
    help="Threads per worker of the embedded cluster.  Default: CPUs / workers.",
)
@click.option(
    "--dashboard-address",
    default="127.0.0.1:8787",
    show_default=True,
    help="Where the embedded cluster serves its dashboard.",
)
@click.option(
    "--run",
    "script",
    type=click.Path(exists=True, dir_okay=False),
    help="Run `python SCRIPT [ARGS]...` with DASK_SCHEDULER_ADDRESS set, then shut down "
    "and exit with the script's status.",
)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[ARGS]...")
@timeout_option
@json_option
@click.pass_context
def start(
    ctx: click.Context,
    mb: float,
    scheduler: str | None,
    workers: int | None,
    threads_per_worker: int | None,
    dashboard_address: str,
    script: str | None,
    script_args: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> int:
    """Start a fabric of MB megabytes.

    With --scheduler, install it on that running cluster (workers that join later get
    it too), print its blocks and exit: the fabric lives on in the cluster.

    Without, start a local cluster of worker processes bound to 127.0.0.1, start the
    fabric in it, print how to connect, and run until Ctrl-C, SIGTERM or `datafabric
    stop`; then unlink every block and close the cluster.  Its address is left in a
    state file (see `datafabric stop --help`) for the other commands to find.

    \b
    Examples:
      datafabric start --mb 4096
      datafabric start --mb 4096 --scheduler tcp://10.0.0.5:8786
      datafabric start --mb 512 --run examples/workflow.py
      datafabric start --mb 512 --run job.py -- --steps 10    # the script's own arguments
    """
    if script_args and script is None:
        raise click.UsageError(f"got unexpected arguments {list(script_args)}; only a --run script takes arguments")
    out = fmt.console(stderr=script is not None)  # with --run, stdout is the script's
    if scheduler is not None:
        given = [o for o in _EMBEDDED_ONLY if ctx.get_parameter_source(o) is not click.core.ParameterSource.DEFAULT]
        if given:
            flags = ", ".join("--" + o.replace("_", "-") for o in given)
            raise click.UsageError(f"{flags}: for the embedded cluster only, not with --scheduler")
        return _start_on(scheduler, mb, timeout, script, script_args, as_json, out)
    cpus = dask.system.CPU_COUNT
    workers = workers or min(4, cpus)
    threads = threads_per_worker or max(1, cpus // workers)
    return _start_embedded(mb, workers, threads, dashboard_address, script, script_args, as_json, out)


def _start_on(
    address: str,
    mb: float,
    timeout: float,
    script: str | None,
    script_args: tuple[str, ...],
    as_json: bool,
    out: Any,
) -> int:
    with connected_client(address, timeout) as client:
        fabric = _start_fabric(client, mb)
        page = fabric.web_page()
        _report_start(out, fabric, as_json, {"scheduler": address, "page": page})
        if script is None:
            if not as_json:
                out.print(
                    f"The fabric lives on in the cluster.  Connect with --scheduler {address}; "
                    f"`datafabric stop --scheduler {address}` shuts it down.  Web page: {page or 'none'}"
                )
            return 0
        with signals_handled() as stop:
            try:
                return run_script(script, script_args, address, stop)
            finally:
                _shutdown(fabric)


def _start_embedded(
    mb: float,
    workers: int,
    threads: int,
    dashboard_address: str,
    script: str | None,
    script_args: tuple[str, ...],
    as_json: bool,
    out: Any,
) -> int:
    state = StateFile() if script is None else None
    with signals_handled() as stop, ExitStack() as cleanup:  # signals stay handled while cleaning up
        if state is not None:
            cleanup.callback(state.remove)
        cluster = distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address=dashboard_address,
            preload=[*dask.config.get("distributed.worker.preload"), shield.PRELOAD],  # we end the workers
        )
        cleanup.callback(cluster.close)
        client = distributed.Client(cluster, set_as_default=False)
        cleanup.callback(client.close)
        fabric = _start_fabric(client, mb)
        cleanup.callback(_shutdown, fabric)
        address = cluster.scheduler_address
        dashboard = cluster.dashboard_link if importlib.util.find_spec("bokeh") else None
        page = fabric.web_page()  # the fabric's own page, bokeh or not
        extra = {
            "scheduler": address,
            "dashboard": dashboard,
            "page": page,
            "state_file": str(state.path) if state else None,
        }
        _report_start(out, fabric, as_json, extra)
        if script is not None:
            return run_script(script, script_args, address, stop)  # the cleanup shuts down
        if not as_json:
            _print_connect_help(out, address, dashboard, page, state)
        state.publish(address)  # last: once the file is there, the fabric is ready and announced
        click.echo(f"datafabric: {serve(cluster, stop)}", err=True)
    return 0


def _start_fabric(client: distributed.Client, mb: float) -> datafabric.Fabric:
    address = client.scheduler.address
    try:
        fabric = datafabric.start(client)
    except FabricRunningError:
        raise CliError(
            f"a fabric is running on {address} already; `datafabric status --scheduler {address}` shows it, "
            f"`datafabric stop --scheduler {address}` shuts it down"
        ) from None
    try:
        fabric.allocate(mb)
    except BaseException:
        _shutdown(fabric)  # all or nothing: a fabric with no memory is of no use
        raise
    return fabric


def _shutdown(fabric: datafabric.Fabric) -> None:
    try:
        fabric.shutdown()
    except NoFabricError:
        pass  # shut down already, by `datafabric stop` or by a script


def _report_start(out: Any, fabric: datafabric.Fabric, as_json: bool, extra: dict) -> None:
    blocks = fabric.status()
    if as_json:
        print(fmt.to_json({"fabric_id": fabric.fabric_id, **extra, "blocks": blocks}), file=out.file)
    else:
        total = sum(b["size"] for b in blocks)
        title = (
            f"fabric {fabric.fabric_id[:8]}: {fmt.human_size(total)} in {len(blocks)} block{'s' * (len(blocks) != 1)}"
        )
        out.print(fmt.status_table(blocks, title=title))
    out.file.flush()


def _print_connect_help(out: Any, address: str, dashboard: str | None, page: str | None, state: StateFile) -> None:
    lines = [
        f"scheduler   {address}",
        f"web page    {page or 'none (the scheduler serves no HTTP)'}",
        *([f"HTTP API    {page}api/v1/ (docs: README, 'The HTTP API')"] if page else []),
        f"dashboard   {dashboard or 'none (install bokeh for the Dask dashboard)'}",
        f"connect     export DASK_SCHEDULER_ADDRESS={address}",
        f"            or: datafabric ls --scheduler {address}",
        "            Python: datafabric.connect(distributed.Client())",
    ]
    lines.append(f"state file  {state.path} (where the other commands find the fabric)")
    lines.append("Ctrl-C, SIGTERM or `datafabric stop` shuts the fabric down and closes the cluster.")
    out.print("\n".join(lines))
    out.file.flush()
