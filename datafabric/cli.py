"""The ``datafabric`` command: start a fabric, look into it and move data in and out of it
from a shell.

A fabric outlives the process that started it, so people need to reach it without
writing Python: start one on a running cluster or on this machine, see what it holds,
put files in, get variables out, and shut it down.  Every command is a thin layer over
the public ``Fabric`` API.  Failures are reported as one ``error: ...`` line on stderr
with a non-zero exit status, because a command line is used by people and by scripts,
and neither wants a traceback.

Which scheduler a command talks to: ``--scheduler``, else ``DASK_SCHEDULER_ADDRESS``
(Dask's ``scheduler-address`` setting), else the address that a running
``datafabric start`` on this machine left in its state file.
"""

from __future__ import annotations

import ast
import asyncio
import fcntl
import importlib.util
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import EllipsisType
from typing import Any

import click
import dask
import dask.system
import distributed
import distributed.comm
import numpy as np

import datafabric
from datafabric import cli_format as fmt
from datafabric.cleanup import remove as remove_segments
from datafabric.cleanup import stale_segments
from datafabric.errors import FabricError, NameNotFoundError, NoFabricError
from datafabric.protocol import SCHEDULER_PLUGIN
from datafabric.types import from_datashape, parse_type

CONNECT_TIMEOUT = 5.0
CHUNK = 8 * 2**20  # bytes per read or write of put and get: the unit of progress
STOP_WAIT = 60.0  # seconds `stop` waits for an embedded `start` to close its cluster
SCRIPT_GRACE = 30.0  # seconds a --run script has to exit after it is signalled


class CliError(Exception):
    """A failure of a command, reported as one line with exit status 1."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    try:
        return cli.main(args=argv, prog_name="datafabric", standalone_mode=False) or 0
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _fail(f"{exc.format_message().rstrip('.')}{hint}", exc.exit_code)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        return _fail("interrupted", 130)
    except (CliError, FabricError) as exc:
        return _fail(str(exc), 1)
    except distributed.comm.CommClosedError as exc:
        return _fail(f"lost the connection to the scheduler ({exc})", 1)
    except Exception as exc:  # an unforeseen failure is still reported as one line
        return _fail(f"{type(exc).__name__}: {exc}", 1)


def _fail(message: str, status: int) -> int:
    click.echo(f"error: {message}", err=True)
    return status


# -- where the scheduler is --------------------------------------------------------------


def state_path() -> Path:
    """Where a running embedded ``datafabric start`` leaves its scheduler's address:
    ``$XDG_RUNTIME_DIR/datafabric/scheduler``, else the same under ``$XDG_CACHE_HOME``
    or ``~/.cache``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "datafabric" / "scheduler"


def running_start_address() -> str | None:
    """The address in the state file while the ``start`` that wrote it runs.  That
    ``start`` holds an exclusive lock on the file for as long as it lives, so a file
    left behind by a killed ``start`` is recognised as stale and ignored."""
    try:
        fd = os.open(state_path(), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 4096).decode().strip() or None
        return None
    finally:
        os.close(fd)


class StateFile:
    """The state file of a running embedded ``start``: created locked, mode 0600, and
    removed when the ``start`` ends."""

    def __init__(self) -> None:
        self.path = state_path()
        address = running_start_address()
        if address is not None:
            raise CliError(
                f"a `datafabric start` is running already at {address} (state file {self.path}); "
                "stop it with `datafabric stop`, or use `datafabric start --run SCRIPT`, which needs no state file"
            )
        self._fd: int | None = None

    def publish(self, address: str) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it is visible: never read as stale
        os.write(fd, f"{address}\n".encode())
        os.replace(tmp, self.path)
        self._fd = fd

    def remove(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def resolve_address(given: str | None) -> str:
    if given:
        return given
    configured = dask.config.get("scheduler-address", None)
    if configured:
        return str(configured)
    address = running_start_address()
    if address:
        return address
    raise CliError(
        "no fabric running: no scheduler given and no `datafabric start` is running on this machine; "
        "pass --scheduler ADDRESS, set DASK_SCHEDULER_ADDRESS, or start one with `datafabric start --mb N`"
    )


@contextmanager
def connected_client(address: str, timeout: float) -> Iterator[distributed.Client]:
    """A client of the scheduler, or one clear line if it does not answer in time.  The
    scheduler is reached with a bare comm first: a ``Client`` that fails to connect
    prints a traceback of its own when it is collected."""

    async def reach() -> None:
        comm = await distributed.comm.connect(address, timeout=timeout)
        await comm.close()

    try:
        asyncio.run(reach())
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(f"cannot reach the scheduler at {address}: {exc}") from None
    logging.getLogger("distributed").setLevel(logging.CRITICAL)  # failures surface as exceptions
    client = distributed.Client(address, timeout=timeout, set_as_default=False)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def connected_fabric(scheduler: str | None, timeout: float) -> Iterator[datafabric.Fabric]:
    address = resolve_address(scheduler)
    with connected_client(address, timeout) as client:
        try:
            fabric = datafabric.connect(client)
        except NoFabricError:
            raise CliError(
                f"no fabric is running on {address}; start one with `datafabric start --mb N --scheduler {address}`"
            ) from None
        yield fabric


@contextmanager
def known_name(name: str) -> Iterator[None]:
    try:
        yield
    except NameNotFoundError:
        raise CliError(f"no variable named {name!r}; `datafabric ls` lists the names") from None


# -- options shared by the commands ------------------------------------------------------

_scheduler_option = click.option(
    "--scheduler",
    "-s",
    metavar="ADDRESS",
    help="Scheduler to talk to, e.g. tcp://10.0.0.5:8786.  Default: $DASK_SCHEDULER_ADDRESS, "
    "else the embedded `datafabric start` running on this machine.",
)
_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=CONNECT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the scheduler to answer.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")


def _connection_options(command: Callable) -> Callable:
    return _scheduler_option(_timeout_option(command))


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Run `datafabric COMMAND --help` for a command's options and an example.",
)
@click.version_option(package_name="datafabric")
def cli() -> None:
    """Shared-memory data fabric for Dask clusters: typed, write-once variables that
    every process of a machine reads with no copy.

    \b
    Example:
      datafabric start --mb 4096                 # a local cluster with a fabric; Ctrl-C ends it
      datafabric put temps temps.npy             # in another shell
      datafabric show 'temps[0, :10]'
    """


# -- start ------------------------------------------------------------------------------

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
@_timeout_option
@_json_option
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
        _report_start(out, fabric, as_json, {"scheduler": address})
        if script is None:
            if not as_json:
                out.print(
                    f"The fabric lives on in the cluster.  Connect with --scheduler {address}; "
                    f"`datafabric stop --scheduler {address}` shuts it down."
                )
            return 0
        with _signals_handled() as stop:
            try:
                return _run_script(script, script_args, address, stop)
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
    with _signals_handled() as stop, ExitStack() as cleanup:  # signals stay handled while cleaning up
        if state is not None:
            cleanup.callback(state.remove)
        with _sigint_ignored():  # the workers must not die of the terminal's Ctrl-C: we close them
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                host="127.0.0.1",
                dashboard_address=dashboard_address,
            )
        cleanup.callback(cluster.close)
        client = distributed.Client(cluster, set_as_default=False)
        cleanup.callback(client.close)
        fabric = _start_fabric(client, mb)
        cleanup.callback(_shutdown, fabric)
        address = cluster.scheduler_address
        dashboard = cluster.dashboard_link if importlib.util.find_spec("bokeh") else None
        extra = {"scheduler": address, "dashboard": dashboard, "state_file": str(state.path) if state else None}
        _report_start(out, fabric, as_json, extra)
        if script is not None:
            return _run_script(script, script_args, address, stop)  # the cleanup shuts down
        if not as_json:
            _print_connect_help(out, address, dashboard, state)
        state.publish(address)  # last: once the file is there, the fabric is ready and announced
        click.echo(f"datafabric: {_serve(cluster, stop)}", err=True)
    return 0


def _start_fabric(client: distributed.Client, mb: float) -> datafabric.Fabric:
    address = client.scheduler.address
    try:
        datafabric.connect(client)
    except NoFabricError:
        pass
    else:
        raise CliError(
            f"a fabric is running on {address} already; `datafabric status --scheduler {address}` shows it, "
            f"`datafabric stop --scheduler {address}` shuts it down"
        )
    fabric = datafabric.start(client)
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


def _print_connect_help(out: Any, address: str, dashboard: str | None, state: StateFile) -> None:
    lines = [
        f"scheduler   {address}",
        f"dashboard   {dashboard or 'none (install bokeh for the Dask dashboard)'}",
        f"connect     export DASK_SCHEDULER_ADDRESS={address}",
        f"            or: datafabric ls --scheduler {address}",
        "            Python: datafabric.connect(distributed.Client())",
    ]
    lines.append(f"state file  {state.path} (where the other commands find the fabric)")
    lines.append("Ctrl-C, SIGTERM or `datafabric stop` shuts the fabric down and closes the cluster.")
    out.print("\n".join(lines))
    out.file.flush()


class _Stop(threading.Event):
    signum: int = 0


@contextmanager
def _signals_handled() -> Iterator[_Stop]:
    """SIGINT and SIGTERM set the returned event instead of interrupting: the fabric and
    the cluster are then shut down in order."""
    stop = _Stop()

    def handler(signum: int, frame: Any) -> None:
        stop.signum = signum
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Processes started meanwhile inherit an ignored SIGINT (a handled one would be reset
    to the default in them)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _serve(cluster: distributed.LocalCluster, stop: _Stop) -> str:
    """Wait for a signal, or for the fabric to be shut down from outside; say which."""
    while not stop.wait(0.5):
        yellowpages = cluster.scheduler.plugins.get(SCHEDULER_PLUGIN)
        if yellowpages is None or yellowpages.fabric_id is None:
            return "the fabric was shut down; closing the cluster"
    return f"got {signal.Signals(stop.signum).name}; shutting the fabric down and closing the cluster"


def _run_script(script: str, args: tuple[str, ...], address: str, stop: _Stop) -> int:
    """Run the script, pass a signal we get on to it, and return its exit status."""
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": address}
    proc = subprocess.Popen([sys.executable, script, *args], env=env)
    while proc.poll() is None:
        if stop.wait(0.2):
            proc.send_signal(stop.signum)
            try:
                proc.wait(SCRIPT_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


# -- stop -------------------------------------------------------------------------------


@cli.command(short_help="Shut the fabric down.")
@_connection_options
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
@_connection_options
@_json_option
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


# -- reading ----------------------------------------------------------------------------


@cli.command(name="ls", short_help="List variables.")
@click.argument("prefix", default="")
@_connection_options
@_json_option
def ls(prefix: str, scheduler: str | None, timeout: float, as_json: bool) -> None:
    """List the variables whose names start with PREFIX: name, type, size, locations.

    \b
    Example:
      datafabric ls run1/
    """
    with connected_fabric(scheduler, timeout) as fabric:
        rows = []
        for name in fabric.get_list(prefix):
            try:
                rows.append(fabric.info(name))
            except NameNotFoundError:
                continue  # deleted meanwhile
    if as_json:
        click.echo(fmt.to_json(rows))
    elif rows:
        fmt.console().print(fmt.variables_table(rows))
    else:
        click.echo(f"no variables{f' starting with {prefix!r}' if prefix else ''}")


@cli.command(short_help="Show a variable's details.")
@click.argument("name")
@_connection_options
@_json_option
def info(name: str, scheduler: str | None, timeout: float, as_json: bool) -> None:
    """Show a variable's type, numpy shape and dtype, size, documentation and locations.

    \b
    Example:
      datafabric info temps
    """
    with connected_fabric(scheduler, timeout) as fabric, known_name(name):
        details = fabric.info(name)
    ftype = from_datashape(details["type"])
    details |= {"shape": list(ftype.shape), "dtype": str(ftype.dtype)}
    if as_json:
        click.echo(fmt.to_json(details))
    else:
        fmt.console().print(fmt.info_table(details))


@cli.command(short_help="Print a variable or a slice of it.")
@click.argument("selection", metavar="NAME[SLICE]")
@_connection_options
@_json_option
def show(selection: str, scheduler: str | None, timeout: float, as_json: bool) -> None:
    """Print a variable, or a numpy-style slice of it, with numpy's printing.

    A slice holds integers (negative ones count from the end), start:stop:step and `...`,
    separated by commas; quote it for the shell.  A variable whose name is exactly
    NAME[SLICE] is shown whole.

    \b
    Examples:
      datafabric show temps
      datafabric show 'temps[0, :10]'
      datafabric show 'temps[..., -1]'
    """
    with connected_fabric(scheduler, timeout) as fabric:
        if "[" in selection and selection in fabric.get_list(selection):
            name, index, text = selection, None, None  # a name that holds brackets itself
        else:
            name, index, text = parse_selection(selection)
        with known_name(name):
            view = fabric.get(name)
        try:
            part = np.asarray(view[index] if index is not None else view)
        except (IndexError, ValueError) as exc:
            raise CliError(f"bad slice [{text}] for {name!r} of shape {view.shape}: {exc}") from None
        if as_json:
            header = {"name": name, "slice": text, "shape": list(part.shape), "dtype": str(part.dtype)}
            click.echo(fmt.to_json(header | {"data": part.tolist()}))
        else:
            with np.printoptions(linewidth=shutil.get_terminal_size().columns):
                click.echo(str(part))


def parse_selection(text: str) -> tuple[str, tuple | None, str | None]:
    """``'temps[0, :10]'`` -> ``('temps', (0, slice(None, 10)), '0, :10')``.  The name ends
    at the first ``[``; the slice is read with ``ast``, never evaluated."""
    if "[" not in text:
        return text, None, None
    if not text.endswith("]"):
        raise _bad_slice(text[text.index("[") + 1 :], "it does not end with ]")
    cut = text.index("[")
    name, inner = text[:cut], text[cut + 1 : -1]
    return name, parse_index(inner), inner


def parse_index(text: str) -> tuple:
    """A numpy index from ints, negative ints, ``start:stop:step`` and ``...`` only."""
    try:
        tree = ast.parse(f"_[{text}]", mode="eval").body
    except SyntaxError:
        raise _bad_slice(text, "it does not parse") from None
    if not (isinstance(tree, ast.Subscript) and isinstance(tree.value, ast.Name)):
        raise _bad_slice(text, "use one pair of brackets, e.g. [0, 1:5]")
    parts = tree.slice.elts if isinstance(tree.slice, ast.Tuple) else [tree.slice]
    return tuple(_index_part(text, part) for part in parts)


def _index_part(text: str, node: ast.expr) -> int | slice | EllipsisType:
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return Ellipsis
    if isinstance(node, ast.Slice):
        return slice(*(None if n is None else _integer(text, n) for n in (node.lower, node.upper, node.step)))
    return _integer(text, node)


def _integer(text: str, node: ast.expr) -> int:
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    raise _bad_slice(text, f"{ast.unparse(node)!r} is not an integer, a start:stop:step slice or ...")


def _bad_slice(text: str, why: str) -> CliError:
    return CliError(f"bad slice [{text}]: {why}")


@cli.command(short_help="Show the blocks and their use.")
@_connection_options
@_json_option
def status(scheduler: str | None, timeout: float, as_json: bool) -> None:
    """Show every block per node: size, used, free, largest free extent, variables.

    \b
    Example:
      datafabric status --json
    """
    with connected_fabric(scheduler, timeout) as fabric:
        blocks = fabric.status()
    if as_json:
        click.echo(fmt.to_json(blocks))
    elif blocks:
        fmt.console().print(fmt.status_table(blocks, title=f"fabric {fabric.fabric_id[:8]} on {fabric.address}"))
    else:
        click.echo(f"fabric {fabric.fabric_id[:8]} on {fabric.address} has no blocks")


# -- moving data ------------------------------------------------------------------------


@cli.command(short_help="Copy a file into a variable.")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--type",
    "type_",
    metavar="TYPE",
    help="Datashape of a raw file, e.g. '1000 * 3 * float64'.  A .npy file carries its own.",
)
@click.option("--doc", default="", help="Documentation stored with the variable.")
@_connection_options
def put(name: str, file: Path, type_: str | None, doc: str, scheduler: str | None, timeout: float) -> None:
    """Copy FILE into the fabric as the write-once variable NAME.

    A .npy file brings its dtype and shape; any other file is raw bytes typed by --type.
    The bytes are read straight into shared memory, with no copy in between.

    \b
    Examples:
      datafabric put temps temps.npy --doc 'daily mean, K'
      datafabric put grid grid.bin --type '1024 * 1024 * float32'
    """
    if file.suffix != ".npy" and type_ is None:
        raise click.UsageError(f"{file} is a raw file: give its type, e.g. --type '1000 * float64'")
    with connected_fabric(scheduler, timeout) as fabric, ExitStack() as stack:
        tp, data, nbytes = _source(file, type_, stack)
        with fmt.progress(nbytes, f"put {name}") as advance:
            if isinstance(data, np.ndarray):
                locations = fabric.insert(name, doc, tp, data)
                advance(nbytes)
            else:
                locations = fabric.insert(name, doc, tp, ChunkedReader(data, advance))
    nodes = ", ".join(dict.fromkeys(loc[0] for loc in locations))
    click.echo(f"put {name}: {fmt.human_size(nbytes)} on {nodes}")


def _source(file: Path, type_: str | None, stack: ExitStack) -> tuple[Any, Any, int]:
    """(type, data, size) of what ``put`` inserts: an open raw file, read straight into
    shared memory; for a .npy file its data bytes the same way when they are in C order,
    else the memmap."""
    if file.suffix != ".npy":
        return type_, stack.enter_context(file.open("rb", buffering=0)), file.stat().st_size
    try:
        with file.open("rb") as f:
            np.lib.format.read_magic(f)
    except ValueError:
        raise CliError(f"{file} is not a .npy file: it does not start with numpy's magic string") from None
    try:
        arr = np.load(file, mmap_mode="r")
    except (ValueError, EOFError, OSError) as exc:
        raise CliError(f"cannot map {file}: {exc}") from None
    tp = type_ if type_ is not None else parse_type(arr.dtype, shape=arr.shape).datashape
    if not (isinstance(arr, np.memmap) and arr.flags.c_contiguous):
        return tp, arr, arr.nbytes
    raw = stack.enter_context(file.open("rb", buffering=0))
    raw.seek(arr.offset)
    return tp, raw, arr.nbytes


class ChunkedReader(io.RawIOBase):
    """A binary file for ``Fabric.insert``, which reads it with ``readinto`` straight into
    shared memory: each call reads at most ``CHUNK`` bytes and reports them."""

    def __init__(self, raw: io.RawIOBase, advance: Callable[[int], None]) -> None:
        super().__init__()
        self._raw = raw
        self._advance = advance

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        n = self._raw.readinto(memoryview(buffer)[:CHUNK])
        self._advance(n or 0)
        return n

    def fileno(self) -> int:
        return self._raw.fileno()

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


class ChunkedWriter:
    """Where ``get`` writes: reports every chunk written.  ``np.save`` writes an array in
    16 MiB pieces to an object like this one (a real file gets one ``tofile``)."""

    def __init__(self, file: Any, advance: Callable[[int], None]) -> None:
        self._file = file
        self._advance = advance

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self._file.write(data)
        self._advance(n)
        return n


@cli.command(short_help="Write a variable to a file.")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    required=True,
    help="File to write: a .npy file (np.save of the variable), else its raw bytes; - for stdout.",
)
@_connection_options
def get(name: str, output: Path, scheduler: str | None, timeout: float) -> None:
    """Write the variable NAME to a file: .npy keeps dtype and shape, any other file
    gets the raw bytes.

    \b
    Examples:
      datafabric get temps -o temps.npy
      datafabric get grid -o - | sha256sum
    """
    to_stdout = str(output) == "-"
    with connected_fabric(scheduler, timeout) as fabric:
        with known_name(name):
            view = fabric.get(name)
        if to_stdout:
            _write(view, sys.stdout.buffer, npy=False, label=f"get {name}")
            return
        with ExitStack() as stack:
            try:
                target = stack.enter_context(output.open("wb"))
            except OSError as exc:
                raise CliError(f"cannot write {output}: {exc.strerror}") from None
            _write(view, target, npy=output.suffix == ".npy", label=f"get {name}")
    click.echo(f"wrote {name} ({fmt.human_size(view.nbytes)}) to {output}")


def _write(view: np.ndarray, target: Any, *, npy: bool, label: str) -> None:
    with fmt.progress(view.nbytes, label) as advance:
        writer = ChunkedWriter(target, advance)
        if npy:
            np.save(writer, view)
        else:
            raw = view.reshape(-1).view(np.uint8)
            for offset in range(0, raw.nbytes, CHUNK):
                writer.write(raw[offset : offset + CHUNK])
        target.flush()


@cli.command(short_help="Delete variables.")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@_connection_options
def rm(names: tuple[str, ...], scheduler: str | None, timeout: float) -> int:
    """Delete variables.  A name disappears at once; its memory is freed when the last
    view of it, in every process, is gone.

    \b
    Example:
      datafabric rm temps run1/grid
    """
    status = 0
    with connected_fabric(scheduler, timeout) as fabric:
        for name in names:
            try:
                with known_name(name):
                    fabric.delete(name)
            except (CliError, FabricError) as exc:  # the other names are still deleted
                status = _fail(str(exc), 1)
    return status
