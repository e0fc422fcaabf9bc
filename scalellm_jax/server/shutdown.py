"""Graceful, bounded shutdown: stop taking work, let what runs finish within a grace period, end the rest.

On the first SIGTERM/SIGINT ``/health`` turns 503 at once, so a load balancer stops sending here,
and new generation requests get 503 with Retry-After (clients retry elsewhere). Requests in flight
run on for up to the grace period (``--shutdown-grace-s``, 30 s by default: Kubernetes' default
termination grace). Whatever is still running then is ended: a stream gets a final error event and
``[DONE]``, a non-streamed request a 503. The process then closes its connections and exits, a few
seconds after the grace period at most. A second signal exits at once (``serve`` handles that).
"""

from __future__ import annotations

import logging

from scalellm_jax.server.app import ServerState

logger = logging.getLogger("scalellm_jax.server")

# After the grace period: how long the ended requests get to write their last event and return.
SETTLE_S = 3.0


async def drain(state: ServerState, grace_s: float) -> bool:
    """Shut the server's work down gracefully; True when every request finished on its own."""
    generator = state.begin_drain()
    if generator is None:
        return True
    if generator.in_flight:
        logger.info("shutting down: /health is 503 and new requests get 503; %d requests in flight have up to "
                    "%.0f s to finish (a second signal exits at once)", generator.in_flight, grace_s)
    if await generator.wait_idle(grace_s):
        return True
    logger.warning("shutdown grace of %.0f s is over: ending %d requests still in flight", grace_s,
                   generator.in_flight)
    generator.end_all()
    if not await generator.wait_idle(SETTLE_S):
        logger.warning("%d requests did not end within %.0f s; their connections are closed", generator.in_flight,
                       SETTLE_S)
    return False
