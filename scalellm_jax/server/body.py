"""Reading a request body as JSON, strictly: what a parser would silently accept is a clear 4xx instead.

* Content-Type: ``application/json`` (or ``application/*+json``), or none at all (as FastAPI, which vLLM
  uses, reads a body without one); anything else is a 415 naming it.
* A body that cannot be read as sent (a ``Content-Encoding`` that does not match it) is a 400.
* A body that does not arrive within the read timeout (a client trickling bytes) is a 408, and the
  connection is closed.
* Duplicate object keys (a parser keeps the last one silently) and the non-JSON constants ``NaN`` and
  ``Infinity`` (which would be parsed, then refused with a misleading range message) are 400s naming the key.
  Anything else that is not valid JSON is left to the schema's parser, whose message says where.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from scalellm_jax.server.errors import APIError


def check_content_type(request: web.Request) -> None:
    if "Content-Type" not in request.headers:
        return
    kind = request.content_type.lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise APIError(415, f"Content-Type: the body must be JSON (application/json), got {kind[:80]!r}",
                       param="Content-Type")


async def read_json_body(request: web.Request, timeout_s: float) -> bytes:
    """The raw body, read within ``timeout_s``, after the checks above (the schema parses it)."""
    check_content_type(request)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise APIError(408, f"body: not received within {timeout_s:g} s", param="body",
                       headers={"Connection": "close"}) from None
    except (HttpProcessingError, RequestPayloadError):  # e.g. "Content-Encoding: gzip" on a plain body
        encoding = request.headers.get("Content-Encoding")
        what = f"as its Content-Encoding ({encoding[:40]!r}) says" if encoding else "as sent"
        raise APIError(400, f"body: could not be decoded {what}", param="body") from None
    _check_strict_json(raw)
    return raw


class _Refused(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Refused(f"body: the key {json.dumps(key)[:80]} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(name: str):
    raise _Refused(f"body: {name} is not a JSON value (numbers must be finite)")


def _check_strict_json(raw: bytes) -> None:
    try:
        json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Refused as exc:
        raise APIError(400, exc.message, param="body") from None
    except ValueError:  # not JSON at all (or not UTF-8): the schema's parser reports where
        return
