"""The fabric over HTTP: a JSON API and a web page on the scheduler's own HTTP server.

    routes.py   the API under /fabric/api/v1/ (names, info, data, status, lease)
    entries.py  what an entry is: listing, description, selection (datasets plug in here)
    slices.py   Caterva2's slice syntax; a selection read in pieces
    source.py   a selection's bytes: a read-only mapping on this node, or the owner's read
    leases.py   leases with a time to live, kept in the directory like every other lease
    upload.py   PUT: reserve, stream, seal
    page.py     the web page at /fabric/ (plain HTML and JS, no build step, nothing fetched)
    png.py      2-D data as a grey-scale PNG

Nothing here listens: the routes join the application of the server Dask starts for its
dashboard (``Scheduler.http_application``), so they are served on the dashboard's address,
over TLS when ``distributed.scheduler.dashboard.tls.*`` is set.
"""

from __future__ import annotations

from typing import Any

from tornado import web

from yp.http.page import page_routes
from yp.http.routes import api_routes

_MARK = "_datafabric_http"


def install(scheduler: Any) -> str | None:
    """Add the routes to the scheduler's HTTP application, once per scheduler; returns the
    page's address, or None if the scheduler serves no HTTP."""
    http = getattr(scheduler, "http_application", None)
    if http is None:
        return None
    if not getattr(http, _MARK, False):
        http.add_application(web.Application(api_routes(scheduler) + page_routes(scheduler)))
        setattr(http, _MARK, True)
    return page_address(scheduler)


def page_address(scheduler: Any) -> str | None:
    server = getattr(scheduler, "http_server", None)
    if server is None:
        return None
    scheme = "https" if server.ssl_options is not None else "http"
    host = server.address if server.address not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{server.port}/fabric/"
