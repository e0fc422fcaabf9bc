"""Slow and idle clients are bounded: idle keep-alive, trickled headers, trickled bodies, too many connections.

Raw sockets, as such clients behave: every wait below is a blocking read with a deadline (the
server's timeout is what ends it), never a sleep used to synchronize.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import pytest
from server_helpers import call, wait_until

KEEPALIVE_S = 1.0
READ_TIMEOUT_S = 1.0


def _connect(url: str, timeout: float = 10.0) -> socket.socket:
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=timeout)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(scope="module")
def strict_server(served):
    from server_helpers import MODEL

    from scalellm_jax.server import ServerConfig, create_app
    from scalellm_jax.server.background import BackgroundServer

    config = ServerConfig(model_name=MODEL, keepalive_timeout_s=KEEPALIVE_S, request_read_timeout_s=READ_TIMEOUT_S,
                          max_connections=4)
    with BackgroundServer(create_app(config, served)) as running:
        yield running


def test_an_idle_keep_alive_connection_is_closed(strict_server):
    with _connect(strict_server.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        data = _read_until_closed(sock)  # the response, then the close after the idle timeout
        assert data.startswith(b"HTTP/1.1 200")
        assert time.monotonic() - start < KEEPALIVE_S + 3


def test_trickled_headers_are_cut_off(strict_server):
    with _connect(strict_server.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        sock.settimeout(0.2)
        closed = False
        while time.monotonic() - start < KEEPALIVE_S + 5:  # one header byte per 0.2 s, until the server hangs up
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            try:
                sock.sendall(b"X")
            except OSError:  # reset: closed
                closed = True
                break
        assert closed, "the server kept a connection whose headers never completed"
        assert time.monotonic() - start < KEEPALIVE_S + 3


def test_a_trickled_body_gets_408_and_the_connection_closes(strict_server):
    with _connect(strict_server.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        start = time.monotonic()
        data = _read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b'"param": "body"' in data and b"timeout_error" in data
        assert time.monotonic() - start < READ_TIMEOUT_S + 2 + 3  # the timeout, then at most 2 s of lingering


def test_connections_past_the_cap_get_503_and_are_closed(strict_server):
    held = [_connect(strict_server.url) for _ in range(4)]
    try:
        for sock in held:  # each makes a request, so each is surely accepted and counted
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        with _connect(strict_server.url) as extra:
            data = _read_until_closed(extra)
        assert data.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in data and b"too many open connections" in data
    finally:
        for sock in held:
            sock.close()
    # the held connections are gone: new ones are served again
    wait_until(lambda: call(strict_server.url + "/health")[0] == 200, timeout=10)


def test_timeouts_and_cap_are_validated():
    from scalellm_jax.server import ServerConfig

    for field, value in (("keepalive_timeout_s", 0), ("request_read_timeout_s", float("nan")),
                         ("shutdown_grace_s", -1), ("shutdown_grace_s", float("inf")), ("max_connections", 0)):
        with pytest.raises(ValueError, match=field):
            ServerConfig(model_name="m", **{field: value})
