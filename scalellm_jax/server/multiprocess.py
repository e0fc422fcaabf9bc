"""The server over several processes (hosts): one model on a mesh that spans them.

Every host runs ``python -m scalellm_jax.server`` with the same flags and the ``SCALELLM_*`` variables
(``scalellm_jax.distributed``). Process 0 serves HTTP, tokenizes and runs the engine; the others load
their shards, build the same engine and follow process 0's device work (``engine.lockstep``) until it
shuts down. Nothing else differs: the same code path builds the engine everywhere, so a flag means
the same on every host (checked at start-up).

Exits: a clean shutdown of process 0 releases the followers, and all processes leave through JAX's
shutdown barrier. When a process is lost, the others print one line and exit 1 at once, skipping
that barrier: with a peer gone it can only fail (JAX aborts the process with a stack dump).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

logger = logging.getLogger("scalellm_jax.server")

_joined = False  # this process joined a multi-process runtime
_abandoned = False  # process 0 stopped before its engine ran: the followers were never released


def join() -> bool:
    """Join the other processes when ``SCALELLM_COORDINATOR`` is set; True on process 0 or without it.

    Raises ``ConfigError`` naming the variable that is wrong.
    """
    global _joined
    from scalellm_jax import distributed  # imports JAX: keep `--help` fast

    config = distributed.DistributedConfig.from_env()
    if config is None:
        return True
    distributed.initialize(config)
    import jax

    _joined = jax.process_count() > 1
    if _joined:
        logger.info("process %d of %d joined (%d local devices of %d)%s", jax.process_index(), jax.process_count(),
                    jax.local_device_count(), jax.device_count(),
                    ": serving HTTP" if jax.process_index() == 0 else ": following process 0")
    return jax.process_index() == 0


def spans_processes() -> bool:
    return _joined


def follow(model: str, build_options: Callable[[], dict]) -> int:
    """A follower process: build the engine as process 0 does, repeat its device work; the exit code."""
    import jax

    from scalellm_jax.engine.lockstep import LockstepError
    from scalellm_jax.server.loading import build_llm

    rank = jax.process_index()
    try:
        llm = build_llm(model, **build_options())
    except LockstepError as exc:
        print(f"error: process {rank}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, as process 0 prints it
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: process {rank}: --model: cannot load {model}: {message}", file=sys.stderr)
        return 1
    logger.info("process %d: engine built, following process 0", rank)
    try:
        steps = llm.engine.follow()
    except LockstepError as exc:
        print(f"error: process {rank}: {exc}; stopping", file=sys.stderr)
        return 1
    swapper = getattr(llm.engine.runner, "swapper", None)  # a simulated device has none
    swaps = f" ({swapper.num_swap_outs} swap-outs, {swapper.num_swap_ins} swap-ins)" if swapper is not None else ""
    logger.info("process %d: process 0 closed the engine after %d steps%s; exiting", rank, steps, swaps)
    return 0


def watch_engine(engine, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """A future that gets the engine's failure as one line, when the engine spans processes (it can then
    no longer run: the server must stop); never done in a single-process server, whose ``/health`` reports
    a failed engine while it stays up for an orchestrator to restart it."""
    failed = loop.create_future()
    if not _joined:
        return failed

    def report(exc: BaseException) -> None:
        if not failed.done():
            failed.set_result(f"the engine failed ({exc}); stopping every process")

    engine.on_failure = lambda exc: loop.call_soon_threadsafe(report, exc)
    if engine.error is not None:  # failed before the callback was set
        report(engine.error)
    return failed


def abandon() -> None:
    """Process 0 stops before its engine ran (a signal while loading): exit without the shutdown barrier."""
    global _abandoned
    _abandoned = True


def finish(code: int) -> int:
    """This process's exit: through JAX's shutdown barrier after a clean run, at once otherwise."""
    if not _joined:
        return code
    if code == 0 and not _abandoned:
        import jax

        jax.distributed.shutdown()
        return 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
