"""The ``datafabric`` group, its entry point and what every command shares: its options
and how it fails.

Failures are reported as one ``error: ...`` line on stderr with a non-zero exit status,
because a command line is used by people and by scripts, and neither wants a traceback.
The group lives here, apart from the commands, so that the command modules import it and
only the package imports them: they register on it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
import distributed.comm

from datafabric.errors import FabricError, NameNotFoundError

CONNECT_TIMEOUT = 5.0


class CliError(Exception):
    """A failure of a command, reported as one line with exit status 1."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    try:
        return cli.main(args=argv, prog_name="datafabric", standalone_mode=False) or 0
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return fail(f"{exc.format_message().rstrip('.')}{hint}", exc.exit_code)
    except click.ClickException as exc:
        return fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        return fail("interrupted", 130)
    except (CliError, FabricError) as exc:
        return fail(str(exc), 1)
    except distributed.comm.CommClosedError as exc:
        return fail(f"lost the connection to the scheduler ({exc})", 1)
    except Exception as exc:  # an unforeseen failure is still reported as one line
        return fail(f"{type(exc).__name__}: {exc}", 1)


def fail(message: str, status: int) -> int:
    """Report a failure as ``main`` does, also for a command that goes on after one."""
    click.echo(f"error: {message}", err=True)
    return status


@contextmanager
def known_name(name: str) -> Iterator[None]:
    """A missing name fails with a pointer to where the names are listed."""
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
timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=CONNECT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the scheduler to answer.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")


def connection_options(command: Callable) -> Callable:
    """--scheduler and --timeout: every command that talks to a fabric takes both."""
    return _scheduler_option(timeout_option(command))


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
