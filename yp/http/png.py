"""A grey-scale PNG of 2-D numeric data, written with zlib and struct (no imaging library):
DVID serves slices as PNG, and a browser shows them with no code of ours."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from datafabric.errors import InvalidArgumentError

MAX_PIXELS = 2048 * 2048  # 32 MiB of float64 at most in the scheduler


def png_of(values: np.ndarray) -> bytes:
    """Smallest value black, largest white; NaN black.  Refuses what is not 2-D numbers."""
    if values.ndim != 2:
        raise InvalidArgumentError(f"an image needs 2-D data; this selection has shape {values.shape}: slice it to 2-D")
    if values.dtype.kind not in "biuf":
        raise InvalidArgumentError(f"an image needs real numbers; the dtype is {values.dtype}")
    if values.size == 0:
        raise InvalidArgumentError(f"an image of shape {values.shape} has no pixels")
    if values.size > MAX_PIXELS:
        raise InvalidArgumentError(
            f"{values.shape} has more than {MAX_PIXELS} pixels; slice it with a step, e.g. ::4,::4"
        )
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    low, high = (data[finite].min(), data[finite].max()) if finite.any() else (0.0, 0.0)
    span = high - low if high > low else 1.0
    grey = np.where(finite, (data - low) / span * 255.0, 0.0).round().astype(np.uint8)
    height, width = grey.shape
    rows = np.hstack([np.zeros((height, 1), np.uint8), grey])  # filter type 0 before each row
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _chunk(b"IEND", b""),
        ]
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
