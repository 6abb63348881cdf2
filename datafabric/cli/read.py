"""The commands that look into a fabric and change nothing: ``ls``, ``info``, ``show``
and ``status``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from typing import Any

import click
import numpy as np

from datafabric.cli import format as fmt
from datafabric.cli.address import connected_fabric
from datafabric.cli.app import CliError, cli, connection_options, json_option, known_name
from datafabric.cli.slices import parse_selection
from datafabric.datasets import Dataset
from datafabric.datasets.selection import Selection
from datafabric.errors import NameNotFoundError
from datafabric.types import from_datashape

LS_PAGE = 1000  # names per request of `ls`
SHOW_DATASET_BYTES = 64 * 2**20  # the most of a dataset `show` assembles


@cli.command(name="ls", short_help="List variables.")
@click.argument("prefix", default="")
@connection_options
@json_option
def ls(prefix: str, scheduler: str | None, timeout: float, as_json: bool) -> None:
    """List the variables whose names start with PREFIX: name, type, size, locations.

    \b
    Example:
      datafabric ls run1/
    """
    with connected_fabric(scheduler, timeout) as fabric:
        rows = []
        for name in pages(fabric, prefix):
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
@connection_options
@json_option
def info(name: str, scheduler: str | None, timeout: float, as_json: bool) -> None:
    """Show a variable's type, numpy shape and dtype, size, documentation and locations;
    a dataset's chunk shape, chunks written, fill value and attributes too.

    \b
    Example:
      datafabric info temps
    """
    with connected_fabric(scheduler, timeout) as fabric, known_name(name):
        details = fabric.info(name)
        if "dataset" in details:
            ds = fabric.dataset(name)
            fill = fmt.values(np.asarray(ds.fillvalue, dtype=ds.dtype))
            details["dataset"] |= {"fillvalue": fill, "attrs": ds.attrs}
    ftype = from_datashape(details["type"])
    details |= {"shape": list(ftype.shape), "dtype": str(ftype.dtype)}
    if as_json:
        click.echo(fmt.to_json(details))
    else:
        fmt.console().print(fmt.info_table(details))


@cli.command(short_help="Print a variable or a slice of it.")
@click.argument("selection", metavar="NAME[SLICE]")
@connection_options
@json_option
def show(selection: str, scheduler: str | None, timeout: float, as_json: bool) -> None:
    """Print a variable or a dataset, or a numpy-style slice of it, with numpy's printing
    (of a dataset, at most 64 MiB is read: slice a larger one).

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
            view = _readable(fabric, name)
        try:
            if isinstance(view, Dataset):
                _check_show_size(view, index)
            part = np.asarray(view[index] if index is not None else view[()] if isinstance(view, Dataset) else view)
        except (IndexError, ValueError) as exc:
            raise CliError(f"bad slice [{text}] for {name!r} of shape {view.shape}: {exc}") from None
        if as_json:
            header = {"name": name, "slice": text, "shape": list(part.shape), "dtype": str(part.dtype)}
            click.echo(fmt.to_json(header | {"data": fmt.values(part)}))
        else:
            with np.printoptions(linewidth=shutil.get_terminal_size().columns):
                click.echo(str(part))


@cli.command(short_help="Show the blocks and their use.")
@connection_options
@json_option
def status(scheduler: str | None, timeout: float, as_json: bool) -> None:
    """Show every block per node: size, used, free, largest free extent, variables; and
    per worker process, its own memory beside the fabric's shared pages it maps.  With
    --json: an object of "fabric_id", "scheduler", "blocks" (one per block) and "memory"
    (one per worker process: rss, uss, private, fabric_mapped, fabric_pss in bytes).

    \b
    Example:
      datafabric status --json
    """
    with connected_fabric(scheduler, timeout) as fabric:
        blocks = fabric.status()
        memory = fabric.memory()
    if as_json:
        click.echo(
            fmt.to_json(
                {"fabric_id": fabric.fabric_id, "scheduler": fabric.address, "blocks": blocks, "memory": memory}
            )
        )
    elif blocks:
        fmt.console().print(fmt.status_table(blocks, title=f"fabric {fabric.fabric_id[:8]} on {fabric.address}"))
        fmt.console().print(fmt.memory_table(memory))
    else:
        click.echo(f"fabric {fabric.fabric_id[:8]} on {fabric.address} has no blocks")


def _readable(fabric: Any, name: str) -> Dataset | np.ndarray:
    """A dataset's handle, else a variable's view."""
    try:
        return fabric.dataset(name)
    except NameNotFoundError:
        return fabric.get(name)


def _check_show_size(ds: Dataset, index: tuple | None) -> None:
    """A dataset's selection is assembled in this process's memory: refuse a large one."""
    nbytes = math.prod(Selection(index if index is not None else (), ds.shape).shape) * ds.dtype.itemsize
    if nbytes > SHOW_DATASET_BYTES:
        raise CliError(
            f"{ds.name!r}{'' if index is None else '[...]'} is {fmt.human_size(nbytes)}; show reads at most "
            f"{fmt.human_size(SHOW_DATASET_BYTES)} of a dataset: select a slice, e.g. '{ds.name}[0, :10]'"
        )


def pages(fabric: Any, prefix: str, size: int = LS_PAGE) -> Iterator[str]:
    """The names under ``prefix``, a page of ``size`` per request: each request costs the
    scheduler the page, however many names it holds."""
    after = None
    while page := fabric.get_list(prefix, limit=size, after=after):
        yield from page
        if len(page) < size:
            return
        after = page[-1]
