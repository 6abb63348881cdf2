"""``PUT data/{name}``: a variable written over HTTP, as a client's insert is written.

The extent is reserved before the first byte of the body is read (so a taken name, a bad
type or a size that does not match is refused with nothing stored), the body is streamed
to the block's owner in pieces, and the name is sealed only once every byte has arrived.
A request that ends any other way gives the extent back: nothing half-written is visible.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from distributed.protocol import to_serialize

from datafabric.errors import InvalidArgumentError, TypeMismatchError
from datafabric.messages import Placement, VariableInfo
from datafabric.names import validate_name
from datafabric.types import parse_type
from yp.http.entries import PIECE

if TYPE_CHECKING:
    from yp.plugin import YellowPages


class Upload:
    def __init__(self, yp: YellowPages, name: str, type_: str, doc: str, nbytes: int, placed: Placement, holder: str):
        self.yp, self.name, self.type, self.doc, self.nbytes = yp, name, type_, doc, nbytes
        self.placed, self.holder = placed, holder
        self.received = 0
        self.buffer = bytearray()
        self.done = False

    @classmethod
    async def begin(cls, yp: YellowPages, name: str, type_text: str | None, doc: str, length: int | None) -> Upload:
        validate_name(name)
        if not type_text:
            raise InvalidArgumentError("give the variable's type: PUT data/NAME?type=100 * float64")
        ftype = parse_type(type_text)
        if length is None:
            raise InvalidArgumentError("a PUT needs a Content-Length header (the variable's size in bytes)")
        if length != ftype.nbytes:
            raise TypeMismatchError(f"type {ftype.datashape!r} takes {ftype.nbytes} bytes; the body has {length}")
        yp.directory.check_new_names([name])
        holder = f"http-put-{secrets.token_hex(8)}"
        placed = await yp.inserts.reserve(name, ftype.datashape, doc, ftype.nbytes, None, holder)
        return cls(yp, name, ftype.datashape, doc, ftype.nbytes, placed, holder)

    async def feed(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.nbytes:
            raise TypeMismatchError(f"the body is longer than {self.nbytes} bytes")
        self.buffer += chunk
        self.received += len(chunk)
        if len(self.buffer) >= PIECE:
            await self._send()

    async def _send(self) -> None:
        start = self.received - len(self.buffer)
        p = self.placed
        await self.yp.owners.ask(
            p["worker"],
            "write",
            shm_id=p["shm_id"],
            extent_offset=p["extent_offset"],
            extent_id=p["extent_id"],
            data_offset=p["data_offset"] + start,
            data=to_serialize(bytes(self.buffer)),
        )
        self.buffer = bytearray()

    async def seal(self) -> VariableInfo:
        if self.received != self.nbytes:
            raise TypeMismatchError(f"the body ended after {self.received} of {self.nbytes} bytes")
        if self.buffer:
            await self._send()
        p = self.placed
        item = {
            "name": self.name,
            "doc": self.doc,
            "type": self.type,
            "nbytes": self.nbytes,
            **{k: p[k] for k in ("shm_id", "extent_offset", "extent_size", "data_offset", "extent_id")},
        }
        [info] = await self.yp.inserts.seal([item], self.holder)
        self.done = True
        return info

    async def abort(self) -> None:
        """Give the extent back (once); a sealed upload keeps it."""
        if self.done:
            return
        self.done = True
        p = self.placed
        await self.yp.inserts.abort(p["shm_id"], p["extent_offset"], p["extent_id"])
