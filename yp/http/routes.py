"""The HTTP/JSON API under ``/fabric/api/v1/``, served by the scheduler's own HTTP server
(the one that serves Dask's dashboard, with its TLS settings): no new port.

Every handler finds the running YellowPages when the request arrives, so a fabric shut
down and started again serves the same routes.  A refusal is a JSON body
``{"error": class, "message": ...}`` with the status of ``STATUS``, and changes nothing.
Reads of data hold a lease for the whole response (``yp.http.leases``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any

import dask
import numpy as np
from tornado import iostream, web

from datafabric import errors
from datafabric.errors import FabricError, InvalidArgumentError, NoFabricError, WritesDisabledError
from datafabric.protocol import SCHEDULER_PLUGIN
from datafabric.types import from_dtype
from yp.http import dataset_reads, entries
from yp.http.leases import lease_answer, parse_ttl
from yp.http.png import MAX_PIXELS, png_of
from yp.http.source import read_pieces
from yp.http.upload import Upload

API = "/fabric/api/v1/"
WRITABLE_KEY = "datafabric.http.writable"
MAX_JSON_VALUES = 10_000

STATUS = {
    errors.InvalidArgumentError: 400,
    errors.InvalidNameError: 400,
    errors.InvalidTypeError: 400,
    errors.TypeMismatchError: 400,
    errors.InvalidBufferError: 400,
    errors.WritesDisabledError: 403,
    errors.NameNotFoundError: 404,
    errors.LeaseNotFoundError: 404,
    errors.BlockNotFoundError: 404,
    errors.NoFabricError: 404,
    errors.InvalidSelectionError: 400,
    errors.NameExistsError: 409,
    errors.DatasetWritingError: 409,
    errors.OutOfSpaceError: 413,
    errors.VariableUnavailableError: 503,
    errors.WorkerLostError: 503,
    errors.NotOnThisNodeError: 503,
}


def status_of(exc: FabricError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)


class FabricHandler(web.RequestHandler):
    def initialize(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    @property
    def yp(self) -> Any:
        yp = self.scheduler.plugins.get(SCHEDULER_PLUGIN)
        if yp is None or not yp.running:
            raise NoFabricError("no datafabric runs on this scheduler; start one with `datafabric start`")
        return yp

    def fail(self, exc: FabricError) -> None:
        self.clear()
        self.set_default_headers()
        self.set_status(status_of(exc))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": type(exc).__name__, "message": str(exc)}))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own refusals (a path that is not UTF-8, a body over its size) in JSON too."""
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": "HTTPError", "message": self._reason}))

    def answer(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def int_argument(self, key: str, default: int) -> int:
        text = self.get_query_argument(key, None)
        if text is None:
            return default
        try:
            return int(text)
        except ValueError:
            raise InvalidArgumentError(f"{key} must be an integer, got {text!r}") from None

    def check_writable(self) -> None:
        if not dask.config.get(WRITABLE_KEY, False):
            raise WritesDisabledError(
                f"the HTTP API is read-only; set the scheduler's Dask config key {WRITABLE_KEY!r} to true "
                "(env DASK_DATAFABRIC__HTTP__WRITABLE=true) to allow PUT and DELETE"
            )


class NamesHandler(FabricHandler):
    def get(self) -> None:
        try:
            body = entries.page(
                self.yp,
                self.get_query_argument("prefix", ""),
                self.get_query_argument("after", None),
                self.int_argument("limit", entries.DEFAULT_PAGE),
            )
        except FabricError as exc:
            return self.fail(exc)
        self.answer(body)


class InfoHandler(FabricHandler):
    async def get(self, name: str) -> None:
        try:
            yp = self.yp
            record = entries.sealed_dataset(yp, entries.checked_name(name))
            if record is not None:
                return self.answer(entries.describe_dataset(yp, record))
            info = await yp.reads.info(name)
            self.answer(entries.describe(info))
        except FabricError as exc:
            self.fail(exc)


class StatusHandler(FabricHandler):
    async def get(self) -> None:
        try:
            yp = self.yp
            rows = await yp.inventory.status()
        except FabricError as exc:
            return self.fail(exc)
        blocks = [dict(r) for r in rows]  # "variables": each block's count of sealed extents
        nodes: dict[str, dict[str, int]] = {}
        for b in blocks:
            n = nodes.setdefault(b["node"], {"blocks": 0, "capacity": 0, "used": 0, "free": 0})
            n["blocks"] += 1
            for k in ("capacity", "used", "free"):
                n[k] += b[k]
        names = len(yp.directory.variables) + sum(c.left for c in yp.directory.columns)  # chunks in columns too
        self.answer({"fabric_id": yp.fabric_id, "names": names, "nodes": nodes, "blocks": blocks})


@web.stream_request_body
class DataHandler(FabricHandler):
    """GET: raw bytes (``format=raw``, the default), a ``.npy`` file (``format=npy``), the
    values as JSON (``format=json``, small selections) or a PNG (``format=png``, 2-D).
    PUT: a new variable, streamed; DELETE: the name goes.  Both need the write switch."""

    upload: Upload | None = None

    async def prepare(self) -> None:
        if self.request.method != "PUT":
            return
        try:
            self.check_writable()
            length = self.request.headers.get("Content-Length")
            self.upload = await Upload.begin(
                self.yp,
                self.path_args[0],
                self.get_query_argument("type", None),
                self.get_query_argument("doc", ""),
                int(length) if length is not None and length.isdigit() else None,
            )
            self.request.connection.set_max_body_size(self.upload.nbytes)
        except FabricError as exc:
            self.fail(exc)

    async def data_received(self, chunk: bytes) -> None:
        if self.upload is not None:
            try:
                await self.upload.feed(chunk)
            except FabricError as exc:
                await self.upload.abort()
                self.fail(exc)

    async def put(self, name: str) -> None:
        try:
            info = await self.upload.seal()
        except FabricError as exc:
            await self.upload.abort()
            return self.fail(exc)
        self.answer(entries.describe(info), status=201)

    def on_connection_close(self) -> None:  # a client that hangs up mid-body
        self._give_back()

    def on_finish(self) -> None:  # any answer but the seal's
        self._give_back()

    def _give_back(self) -> None:
        if self.upload is not None and not self.upload.done:
            self.scheduler.loop.add_callback(self.upload.abort)

    async def delete(self, name: str) -> None:
        try:
            self.check_writable()
            await self.yp.datasets.delete(entries.checked_name(name))  # a dataset's, or a variable's
        except FabricError as exc:
            return self.fail(exc)
        self.answer({"deleted": name})

    async def get(self, name: str) -> None:
        fmt = self.get_query_argument("format", "raw")
        try:
            if fmt not in ("raw", "npy", "json", "png"):
                raise InvalidArgumentError(f"format must be raw, npy, json or png, got {fmt!r}")
            yp = self.yp
            record = entries.sealed_dataset(yp, entries.checked_name(name))
            if record is not None:
                return await self._dataset(yp, record, fmt)
            async with yp.http_leases.hold(name) as info:
                chosen = entries.opened(info, self.get_query_argument("slice", None))
                if fmt in ("json", "png"):
                    return await self._small(yp, info, chosen, fmt)
                await self._stream(yp, info, chosen, fmt)
        except FabricError as exc:
            if not self._headers_written:
                self.fail(exc)
            else:
                self.request.connection.close()
        except iostream.StreamClosedError:
            pass  # the client hung up; the lease ended with the block above

    async def _dataset(self, yp: Any, record: Any, fmt: str) -> None:
        """A dataset's selection, run by run, under leases on the chunks it touches."""
        chosen = entries.opened_dataset(record, self.get_query_argument("slice", None))
        ftype = from_dtype(chosen.dtype, chosen.shape)
        if fmt in ("json", "png"):
            _check_small(chosen.shape, fmt)
        async with dataset_reads.leased_chunks(yp, chosen) as chunks:
            runs = dataset_reads.read_runs(yp, chosen, chunks)
            async with contextlib.aclosing(runs):
                if fmt in ("json", "png"):
                    parts = [_bytes_of(run) async for run in runs]
                    return self._answer_small(np.frombuffer(b"".join(parts), ftype.dtype).reshape(chosen.shape), fmt)
                await self._send_head(ftype, chosen.shape, chosen.nbytes, fmt)
                async for run in runs:
                    await self.request.connection.write(_bytes_of(run))
        self.finish()

    async def _send_head(self, ftype: Any, shape: tuple[int, ...], nbytes: int, fmt: str) -> None:
        head = b""
        if fmt == "npy":
            buf = io.BytesIO()
            header = {"descr": np.lib.format.dtype_to_descr(ftype.dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_2_0(buf, header)
            head = buf.getvalue()
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Length", str(len(head) + nbytes))
        self.set_header("X-Datafabric-Type", ftype.datashape)
        self.set_header("X-Datafabric-Dtype", entries.dtype_text(ftype.dtype))
        self.set_header("X-Datafabric-Shape", ",".join(map(str, shape)))
        await self.flush()
        if head:
            await self.request.connection.write(head)

    async def _stream(self, yp: Any, info: dict, chosen: entries.Opened, fmt: str) -> None:
        sel, ftype = chosen.selection, chosen.ftype
        await self._send_head(ftype, sel.shape, sel.nbytes, fmt)
        async with contextlib.aclosing(read_pieces(yp, info, sel.pieces)) as pieces:
            async for piece, raw in pieces:
                await self.request.connection.write(piece.take(raw, _base_dtype(info)))
        self.finish()

    async def _small(self, yp: Any, info: dict, chosen: entries.Opened, fmt: str) -> None:
        sel, ftype = chosen.selection, chosen.ftype
        _check_small(sel.shape, fmt)
        async with contextlib.aclosing(read_pieces(yp, info, sel.pieces)) as pieces:
            parts = [bytes(p.take(raw, _base_dtype(info))) async for p, raw in pieces]
        self._answer_small(np.frombuffer(b"".join(parts), ftype.dtype).reshape(sel.shape), fmt)

    def _answer_small(self, values: np.ndarray, fmt: str) -> None:
        if fmt == "png":
            body = png_of(values)
            self.set_header("Content-Type", "image/png")
            return self.finish(body)
        self.answer(
            {
                "shape": list(values.shape),
                "dtype": entries.dtype_text(values.dtype),
                "values": _jsonable(values.tolist()),
            }
        )


def _bytes_of(run: np.ndarray) -> memoryview:
    """A C-contiguous run's bytes, with no copy (records and 0-d runs too)."""
    return memoryview(run.reshape(-1).view(np.uint8))


def _check_small(shape: tuple[int, ...], fmt: str) -> None:
    limit = MAX_JSON_VALUES if fmt == "json" else MAX_PIXELS
    count = math.prod(shape)
    if count > limit:
        raise InvalidArgumentError(
            f"{count} values is more than {limit} for format={fmt}; narrow it with slice=, or use format=npy"
        )


def _base_dtype(info: dict) -> np.dtype:
    return entries.type_of(info["type"]).dtype


def _jsonable(value: Any) -> Any:
    """numpy's values as JSON: non-finite floats and complex numbers as strings, records as lists."""
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, complex | bytes):
        return str(value)
    return value


class LeaseHandler(FabricHandler):
    """POST lease/NAME[?ttl=S][&lease=ID]: a lease, or the renewal of one.  DELETE lease/ID."""

    async def post(self, name: str) -> None:
        try:
            yp = self.yp
            ttl = parse_ttl(self.get_query_argument("ttl", None))
            renewing = self.get_query_argument("lease", None)
            if entries.checked_name(name) in yp.directory.datasets:
                raise InvalidArgumentError(
                    f"{name!r} is a dataset: leases are per variable; read it with GET data/{name}?slice=..., "
                    "which holds a lease on every chunk it reads for as long as the response runs"
                )
            if renewing is not None:
                lease = yp.http_leases.renew(renewing, name, ttl)
                return self.answer(lease_answer(lease, ttl=ttl))
            lease, info = await yp.http_leases.take(entries.checked_name(name), ttl)
            copies = yp.directory.by_id[info["var_id"]].copies  # read in the step the lease was granted
            located = entries.describe(info)
            extents = {(c.shm_id, c.data_offset): c for c in copies}
            for loc in located["locations"]:
                c = extents[loc["shm_id"], loc["data_offset"]]
                loc.update(extent_offset=c.extent_offset, extent_id=c.extent_id)
        except FabricError as exc:
            return self.fail(exc)
        self.answer(lease_answer(lease, ttl=ttl, fabric_id=yp.fabric_id, **located), status=201)

    def delete(self, lease_id: str) -> None:
        try:
            self.yp.http_leases.release(lease_id)
        except FabricError as exc:
            return self.fail(exc)
        self.answer({"released": lease_id})


def api_routes(scheduler: Any) -> list[tuple[str, type, dict]]:
    kw = {"scheduler": scheduler}
    return [
        (API + "names", NamesHandler, kw),
        (API + "info/(.+)", InfoHandler, kw),
        (API + "data/(.+)", DataHandler, kw),
        (API + "status", StatusHandler, kw),
        (API + "lease/(.+)", LeaseHandler, kw),
    ]
