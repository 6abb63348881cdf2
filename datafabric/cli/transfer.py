"""The commands that move data in and out of a fabric: ``put``, ``get`` and ``rm``.

Data moves in chunks of ``CHUNK`` bytes, each reported as it goes, so that a large
transfer can show its progress.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import numpy as np

from datafabric.cli import format as fmt
from datafabric.cli.address import connected_fabric
from datafabric.cli.app import CliError, cli, connection_options, fail, known_name
from datafabric.errors import FabricError
from datafabric.types import parse_type

CHUNK = 8 * 2**20  # bytes per read or write of put and get: the unit of progress


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
@connection_options
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
@connection_options
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
@connection_options
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
                status = fail(str(exc), 1)
    return status
