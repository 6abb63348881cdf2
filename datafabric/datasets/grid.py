"""The chunk grid of a dataset: pure arithmetic, shared by the client and the YellowPages.

Chunks are regular: every chunk has the dataset's chunk shape except at the far edge of a
dimension, where it is clipped to the dataset (h5py pads edge chunks; a clipped chunk
takes only the memory of its elements).  A chunk is numbered by its C-order position in
the grid (its *flat* index); its variable holds a C-contiguous array of its shape.
"""

from __future__ import annotations

import math
from numbers import Integral

from datafabric.errors import InvalidArgumentError

AUTO_CHUNK_BYTES = 16 * 2**20  # "auto" chunks hold about this much (zarr's and dask's order of size)


def grid_shape(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-n // c) if n else 0 for n, c in zip(shape, chunks, strict=True))


def chunk_count(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    return math.prod(grid_shape(shape, chunks))


def unravel(flat: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for g in reversed(grid):
        flat, k = divmod(flat, g)
        index.append(k)
    return tuple(reversed(index))


def ravel(index: tuple[int, ...], grid: tuple[int, ...]) -> int:
    flat = 0
    for k, g in zip(index, grid, strict=True):
        flat = flat * g + k
    return flat


def chunk_shape(index: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(c, n - k * c) for k, n, c in zip(index, shape, chunks, strict=True))


def chunk_type(element: str, shape: tuple[int, ...]) -> str:
    """The datashape of a chunk's variable: its dims, then the dataset's element type."""
    return " * ".join([*map(str, shape), element])


def normalize_chunks(chunks: object, shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """h5py's ``chunks``: an int (every dimension), a tuple, or None / "auto" / True for
    about ``AUTO_CHUNK_BYTES``.  Each chunk length is at least 1; a length over its
    dimension is clipped to it."""
    if chunks is None or chunks is True or chunks == "auto":
        return auto_chunks(shape, itemsize)
    if isinstance(chunks, bool) or not isinstance(chunks, Integral | tuple | list):
        raise InvalidArgumentError(f"chunks must be an int, a tuple of ints, None or 'auto', not {chunks!r}")
    given = (chunks,) * len(shape) if isinstance(chunks, Integral) else tuple(chunks)
    if len(given) != len(shape) or not all(
        isinstance(c, Integral) and not isinstance(c, bool) and c > 0 for c in given
    ):
        raise InvalidArgumentError(
            f"chunks {chunks!r} do not fit shape {shape}: give one positive int per dimension ({len(shape)})"
        )
    return tuple(max(1, min(int(c), n)) for c, n in zip(given, shape, strict=True))


def auto_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Halve the longest dimension of the chunk until it holds at most
    ``AUTO_CHUNK_BYTES``: near-cubic chunks, C-order friendly."""
    chunks = [max(1, n) for n in shape]
    while math.prod(chunks) * itemsize > AUTO_CHUNK_BYTES:
        longest = max(range(len(chunks)), key=lambda i: (chunks[i], -i))
        if chunks[longest] == 1:
            break
        chunks[longest] = -(-chunks[longest] // 2)
    return tuple(chunks)


def normalize_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple | list) or not all(
        isinstance(n, Integral) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise InvalidArgumentError(f"shape must be an int or a tuple of ints >= 0, not {shape!r}")
    return tuple(int(n) for n in shape)
