"""The web page at ``/fabric/``: one HTML file with its script inline, reading the JSON
API every two seconds.  No bokeh, no build step, nothing fetched from elsewhere at run
time; every name is put into the page as text, never as markup."""

from __future__ import annotations

from importlib import resources
from typing import Any

from tornado import web

PAGE = resources.files("yp.http").joinpath("static", "index.html")


class PageHandler(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'",
        )
        self.finish(PAGE.read_bytes())


class RedirectHandler(web.RequestHandler):
    def get(self) -> None:
        self.redirect("/fabric/")


def page_routes(scheduler: Any) -> list[tuple[str, type]]:
    return [("/fabric", RedirectHandler), ("/fabric/", PageHandler)]
