"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every client-caused error names the request field it is about (``param``), both for pydantic
validation errors and for the engine's ``ValueError``s, whose messages start with the field name.
"""

from __future__ import annotations

import json
import re

from aiohttp import web
from pydantic import ValidationError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"), "param": self.param,
                          "code": None}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as one Server-Sent Event, for failures after a stream has started."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first offending field (``messages[0].content``) and what was wrong with it."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object")
    # A union field (prompt, stop, content) fails once per member: report the member that got furthest.
    field = first["loc"][0]
    first = max((e for e in errors if e["loc"] and e["loc"][0] == field), key=lambda e: len(e["loc"]))
    path = _field_path(first["loc"])
    message = f"{path}: {first['msg']}"
    if first["type"] == "extra_forbidden":
        message = f"{path}: unsupported field (this server does not implement it)"
    more = len({e["loc"][0] for e in errors if e["loc"]} - {field})
    if more:
        message += f" (and {more} more invalid field{'s' if more > 1 else ''})"
    return APIError(400, message, param=path)


def _field_path(loc: tuple) -> str:
    """``('messages', 0, 'content', 'str')`` → ``messages[0].content`` (union member tags dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_tag(part):
            path += f".{part}" if path else part
    return path


def _is_union_tag(part: str) -> bool:
    # pydantic names union members by type ("str", "list[int]", "function-after[...]"), never like a field
    return part in ("str", "int", "float", "bool") or "[" in part or part.startswith("constrained-")


_FIELD = re.compile(r"^([a-z_]+)")


def from_engine_error(exc: ValueError, prompt_field: str) -> APIError:
    """A 400 for a request the engine refused; its message starts with the engine's field name."""
    message = str(exc)
    match = _FIELD.match(message)
    param = match.group(1) if match else None
    if param == "prompt_token_ids":
        param = prompt_field
        message = prompt_field + message[len("prompt_token_ids"):]
    return APIError(400, message, param=param)
