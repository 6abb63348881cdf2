"""``put`` of an HDF5, zarr or chunked .npy file as a dataset, and ``get`` to a file of
any kind: the CLI's side of ``datafabric.files``, with progress bars."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from datafabric.cli import format as fmt
from datafabric.cli.address import connected_fabric
from datafabric.cli.app import CliError, known_name
from datafabric.files import export_file, exported
from datafabric.files.exports import Exported, check_output, export_kind, replacing
from datafabric.files.imports import import_source
from datafabric.files.sources import open_source, split_inner


def parse_chunks(text: str | None) -> Any:
    """``--chunks``: ``256,256`` -> (256, 256); ``auto``; None when not given."""
    if text is None or text == "auto":
        return text
    try:
        chunks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give positive ints separated by commas, e.g. 256,256, or auto") from None
    if not all(c > 0 for c in chunks):
        raise click.BadParameter(f"{text!r}: every chunk length must be at least 1")
    return chunks


def put_dataset(name: str, spec: str, chunks: Any, doc: str, scheduler: str | None, timeout: float) -> None:
    with ExitStack() as stack:
        source = open_source(spec, stack)  # before connecting: a bad file fails fast
        nbytes = math.prod(source.shape) * source.dtype.itemsize
        with connected_fabric(scheduler, timeout) as fabric, fmt.progress(nbytes, f"put {name}") as advance:
            ds = import_source(fabric, name, source, chunks, doc, advance)
    click.echo(
        f"put {name}: dataset {ds.shape} {ds.dtype}, chunks {ds.chunks}, {fmt.human_size(nbytes)}, "
        f"{len(ds.attrs)} attrs"
    )
    if source.dropped:
        click.echo(
            f"attrs not kept (a dataset's hold str, int, float, bool and flat lists): {', '.join(source.dropped)}"
        )


def get_to_file(name: str, output: str, force: bool, scheduler: str | None, timeout: float) -> None:
    """``get`` of a variable or a dataset to stdout or a file of any kind."""
    to_stdout = output == "-"
    path = split_inner(output)[0]
    kind = None if to_stdout else export_kind(output)
    if not to_stdout:
        check_output(path, force)  # before anything is read
    with connected_fabric(scheduler, timeout) as fabric:
        with known_name(name):
            array = exported(fabric, name)
        label = f"get {name}"
        if to_stdout:
            write_plain(array, sys.stdout.buffer, npy=False, label=label)
            return
        if kind is None or (kind == "npy" and array.view is not None):
            with replacing(path, force) as tmp, _created(tmp) as target:
                write_plain(array, target, npy=kind == "npy", label=label)
            written = str(path)
        else:
            with fmt.progress(array.nbytes, label) as advance:
                written = export_file(array, output, force, advance)
    click.echo(f"wrote {name} ({fmt.human_size(array.nbytes)}) to {written}")


@contextmanager
def _created(tmp: Path) -> Iterator[Any]:
    try:
        target = tmp.open("xb")
    except OSError as exc:
        raise CliError(f"cannot write {tmp.parent}: {exc.strerror}") from None
    with target:
        yield target


def write_plain(array: Exported, target: Any, *, npy: bool, label: str) -> None:
    """A variable as ``np.save`` writes it (``npy``), or any array's raw bytes in C order."""
    from datafabric.cli.transfer import write_view

    if array.view is not None:
        write_view(array.view, target, npy=npy, label=label)
        return
    with fmt.progress(array.nbytes, label) as advance:
        for rows in array.rows():
            target.write(rows.reshape(-1).view("u1").data)
            advance(rows.nbytes)
        target.flush()
