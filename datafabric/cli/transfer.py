"""The commands that move data in and out of a fabric: ``put``, ``get`` and ``rm``.

Data moves in chunks of ``CHUNK`` bytes, each reported as it goes, so that a large
transfer can show its progress.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import numpy as np

from datafabric.cli import format as fmt
from datafabric.cli.address import connected_fabric
from datafabric.cli.app import CliError, cli, connection_options, fail, known_name
from datafabric.cli.files import get_to_file, parse_chunks, put_dataset
from datafabric.errors import FabricError, FileFormatError
from datafabric.files import sources
from datafabric.types import parse_type

CHUNK = 8 * 2**20  # bytes per read or write of put and get: the unit of progress


@cli.command(short_help="Copy a file into a variable or a dataset.")
@click.argument("name")
@click.argument("file", metavar="FILE")
@click.option(
    "--type",
    "type_",
    metavar="TYPE",
    help="Datashape of a raw file, e.g. '1000 * 3 * float64'.  A .npy, .h5 or .zarr file carries its own.",
)
@click.option(
    "--chunks",
    metavar="N,N,...|auto",
    help="Chunk shape of the dataset made of a .h5, .zarr or .npy file (default: the file's own "
    "chunks, else auto, about 16 MiB).  A .npy file becomes a dataset only with --chunks.",
)
@click.option("--doc", default="", help="Documentation stored with the variable or dataset.")
@connection_options
def put(
    name: str, file: str, type_: str | None, chunks: str | None, doc: str, scheduler: str | None, timeout: float
) -> None:
    """Copy FILE into the fabric as the write-once variable or the dataset NAME.

    \b
    FILE.h5:/group/dataset  an HDF5 dataset -> a dataset (needs h5py); the inner path
                            may be left out when the file holds one dataset
    DIR.zarr                a zarr v2 or v3 array -> a dataset (needs zarr)
    FILE.npy --chunks ...   a .npy file -> a dataset, read chunk by chunk from its mapping
    FILE.npy                a .npy file -> a variable, its dtype and shape kept
    FILE --type TYPE        any other file: raw bytes -> a variable of that type

    A dataset keeps the file's chunks, fill value and the attributes a dataset's attrs can
    hold (it names the others); a failed import leaves no dataset behind.  The bytes are
    read straight into shared memory, with no copy in between.

    \b
    Examples:
      datafabric put temps temps.npy --doc 'daily mean, K'
      datafabric put grid grid.bin --type '1024 * 1024 * float32'
      datafabric put run1/t data.h5:/fields/t
      datafabric put big big.npy --chunks 256,256
    """
    kind = sources.kind(file)
    if kind in ("h5", "zarr") or (kind == "npy" and chunks is not None):
        if type_ is not None:
            raise click.UsageError(f"{file} carries its own type: --type is for raw files")
        put_dataset(name, file, parse_chunks(chunks), doc, scheduler, timeout)
        return
    if chunks is not None:
        raise click.UsageError("--chunks makes a dataset of a .h5, .zarr or .npy file; a raw file becomes a variable")
    path = Path(file)
    if not path.is_file():
        raise FileFormatError(f"{file}: {'is a directory' if path.is_dir() else 'no such file'}")
    if kind is None and type_ is None:
        raise click.UsageError(f"{file} is a raw file: give its type, e.g. --type '1000 * float64'")
    with connected_fabric(scheduler, timeout) as fabric, ExitStack() as stack:
        tp, data, nbytes = _source(path, type_, stack)
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


@cli.command(short_help="Write a variable or a dataset to a file.")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    required=True,
    help="File to write: .h5 (or .h5:/inner/path), .zarr, .npy, else raw bytes in C order; - for stdout.",
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists (once the new one is complete).")
@connection_options
def get(name: str, output: str, force: bool, scheduler: str | None, timeout: float) -> None:
    """Write the variable or dataset NAME to a file.

    \b
    .npy              dtype and shape (a variable: exactly as np.save writes it)
    .h5[:/inner/path] an HDF5 dataset at the inner path (default: /NAME), with a
                      dataset's chunks, fill value and attrs (needs h5py)
    .zarr             a zarr array, the same (v3; v2 for big-endian and record dtypes)
    anything else     the raw bytes in C order

    The file is written under a temporary name beside it and renamed at the end: no
    half-written file is ever seen.  An existing file is refused unless --force.

    \b
    Examples:
      datafabric get temps -o temps.npy
      datafabric get run1/t -o t.h5:/fields/t
      datafabric get grid -o - | sha256sum
    """
    get_to_file(name, output, force, scheduler, timeout)


def write_view(view: np.ndarray, target: Any, *, npy: bool, label: str) -> None:
    """A variable's view: as ``np.save`` writes it, or its raw bytes."""
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
