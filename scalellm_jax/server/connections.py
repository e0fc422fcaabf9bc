"""A cap on open connections: past it, a new connection gets a bare 503 and is closed at once.

Without a cap, the file-descriptor limit is the only bound on idle or slow clients, and reaching it
makes ``accept`` fail for everyone (health checks included). A refused client is told why, in HTTP.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

logger = logging.getLogger(__name__)


def _refusal(retry_after_s: int) -> bytes:
    body = (b'{"error":{"message":"the server has too many open connections; retry later",'
            b'"type":"service_unavailable","param":null,"code":null}}')
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (retry_after_s, len(body), body))


def limit_connections(server: web.Server, limit: int, retry_after_s: int = 1) -> None:
    """Cap ``server``'s open connections at ``limit`` (call after ``AppRunner.setup``, before serving)."""
    admit = server.connection_made
    refusal = _refusal(retry_after_s)

    def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        admit(handler, transport)
        if (open_now := len(server.connections)) > limit:
            logger.warning("refused a connection: %d open, --max-connections is %d", open_now, limit)
            transport.write(refusal)
            handler.force_close()  # closes the transport once the refusal is written

    server.connection_made = connection_made
