"""Client-caused log lines: one INFO line without a traceback, at most once per cause per interval."""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlparse

from server_helpers import ServerProcess

from scalellm_jax.server.log_limits import RateLimitFilter


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _record(msg: str, exc: BaseException | None = None, name: str = "aiohttp.server") -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, exc_info)


def test_one_line_per_cause_per_interval_with_the_count_of_the_rest():
    clock = _Clock()
    limiter = RateLimitFilter(interval_s=10, clock=clock)
    first = _record("Error handling request", ValueError("bad header\nsecond line"))
    assert limiter.filter(first)
    assert first.getMessage() == "Error handling request: ValueError: bad header"
    assert (first.levelname, first.exc_info, first.exc_text) == ("INFO", None, None)  # no traceback
    for _ in range(5):
        assert not limiter.filter(_record("Error handling request", ValueError("again")))
    assert limiter.filter(_record("Error handling request", KeyError("x")))  # another exception: another cause
    assert limiter.filter(_record("%s went away", name="scalellm_jax.server.generation"))
    clock.now = 10.5
    later = _record("Error handling request", ValueError("later"))
    assert limiter.filter(later)
    assert later.getMessage().endswith("(5 more like this in the last 10 s)")


def test_a_flood_of_distinct_causes_does_not_grow_the_table():
    limiter = RateLimitFilter(interval_s=10, clock=_Clock())
    for i in range(5000):
        limiter.filter(_record(f"cause {i}"))
    assert len(limiter._last) <= 1001


def test_malformed_requests_log_one_line_in_a_server_process():
    server = ServerProcess()
    try:
        parsed = urlparse(server.url)
        for _ in range(50):
            with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
                # a malformed header: aiohttp logs these at ERROR with a traceback
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.0 400")
    finally:
        server.stop()
    lines = [line for line in server.log if "Error handling request" in line]
    assert len(lines) == 1 and " INFO " in lines[0]
    assert not any("Traceback" in line for line in server.log)
