"""Where the fabric's web page and HTTP API are served, for ``Fabric``."""

from __future__ import annotations


class WebMixin:
    def web_page(self) -> str | None:
        """The address of the fabric's web page on the scheduler's HTTP server (the API is
        under it, at ``api/v1/``), or None if the scheduler serves no HTTP."""
        return self._ctx().call("page")["address"]
