"""The playground: a chat and completion page at ``GET /``, served from the package's ``static/`` folder.

Plain HTML, CSS and JavaScript (no build step, nothing fetched from another site: the page works offline),
talking to the same public API any client uses (``/v1/chat/completions``, ``/v1/completions``, ``/state``).
The files are read once, when the app is built, and served from memory. The Content-Security-Policy lets
the page load and call nothing but this server. The page itself needs no API key; the key it sends to
``/v1/*`` is typed into the page and kept in the browser's storage, never in the server.
"""

from __future__ import annotations

import pathlib

from aiohttp import web

from scalellm_jax.server.errors import APIError

STATIC = pathlib.Path(__file__).parent / "static"
INDEX = "index.html"
# The page's own files, at /playground/{name}: a fixed list, so no path from a URL ever reaches the file system.
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: an upgraded server's page is picked up at the next load
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


class Playground:
    def __init__(self, folder: pathlib.Path = STATIC):
        names = {INDEX: "text/html", **ASSETS}
        self._files = {name: ((folder / name).read_bytes(), kind) for name, kind in names.items()}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/playground/{name}", self._asset)

    def _response(self, name: str) -> web.Response:
        body, kind = self._files[name]
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=_HEADERS)

    async def _index(self, request: web.Request) -> web.Response:
        return self._response(INDEX)

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise APIError(404, f"no such playground file {name[:80]!r}; there are {', '.join(sorted(ASSETS))}")
        return self._response(name)
