"""Log lines that clients can cause, bounded: one line per cause per interval, never a traceback.

Malformed HTTP messages, protocol errors and clients that disconnect mid-stream are the clients'
doing, so each is logged as one INFO line naming the exception, and at most once per cause (logger,
message and exception type) per interval, with the count suppressed since. An unauthenticated
client sending garbage in a loop can then not fill the disk.
"""

from __future__ import annotations

import logging
import time

# aiohttp's loggers for what happens below our handlers (malformed requests, protocol errors), and ours
# for disconnects and refused connections
CLIENT_CAUSED = ("aiohttp.server", "aiohttp.web", "scalellm_jax.server.generation", "scalellm_jax.server.connections")


class RateLimitFilter(logging.Filter):
    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self._interval = interval_s
        self._clock = clock
        self._last: dict[tuple, float] = {}  # cause -> when its last line was let through
        self._suppressed: dict[tuple, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        cause = (record.name, record.msg, type(exc).__name__ if exc else None)
        now = self._clock()
        last = self._last.get(cause)
        if last is not None and now - last < self._interval:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            return False
        if len(self._last) > 1000:  # causes are few; a flood of distinct ones must not grow this
            self._last.clear()
        self._last[cause] = now
        if exc is not None:  # one line: the exception's type and message, no traceback
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            record.args, record.exc_info, record.exc_text = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        suppressed = self._suppressed.pop(cause, 0)
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} more like this in the last {self._interval:g} s)"
            record.args = None
        return True


def install(logger_names=CLIENT_CAUSED, interval_s: float = 10.0) -> RateLimitFilter:
    """Put one shared limiter on the loggers of client-caused events (ours are passed in explicitly)."""
    limiter = RateLimitFilter(interval_s)
    for name in logger_names:
        logging.getLogger(name).addFilter(limiter)
    return limiter
