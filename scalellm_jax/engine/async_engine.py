"""AsyncEngine: the LLMEngine in its own thread, behind an asyncio API that never blocks the loop.

The engine thread owns the LLMEngine exclusively. The event loop talks to it only through a
thread-safe inbox (new requests, aborts) and gets outputs back through
``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per request. Validation runs on the
caller's side before anything is queued, so bad input raises ``ValueError`` at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from scalellm_jax.engine.engine import LLMEngine, RequestOutput
from scalellm_jax.engine.request import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; the message carries the original error."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Add] = {}  # engine-thread only
        self._ids = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="scalellm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns an async iterator of its outputs (the last has ``finished``).

        Raises ``ValueError`` immediately for input the engine can never serve. Leaving the
        iteration early (client disconnect) aborts the request.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        params = sampling_params or SamplingParams()
        self.engine.check_request(prompt_token_ids, params)  # pure checks against immutable config
        if request_id is None:
            with self._lock:
                self._ids += 1
                request_id = f"async-{self._ids}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(request_id, list(prompt_token_ids), params, priority, asyncio.get_running_loop(), outputs))
        return self._stream(request_id, outputs)

    async def _stream(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished). Never blocks."""
        self._inbox.put(_Abort(request_id))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out)
        except BaseException as exc:  # deliver the failure to every waiting client, never hang them
            logger.exception("engine thread failed")
            self._error = exc
            for stream in list(self._streams.values()):
                _send(stream, EngineDeadError(repr(exc)))
            self._streams.clear()

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, _Abort):
                out = self.engine.abort(item.request_id)
                if out is not None:
                    self._deliver(out)
                continue
            try:
                self.engine.add_request(
                    item.prompt_token_ids, item.params, request_id=item.request_id, priority=item.priority
                )
            except ValueError as exc:  # e.g. a duplicate id or a KV limit: fail this request only
                _send(item, exc)
                continue
            self._streams[item.request_id] = item

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        _send(stream, out)


def _send(stream: _Add, item) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)
    except RuntimeError:  # the client's event loop is closed: nobody is listening any more
        logger.debug("dropping output for %s: event loop closed", stream.request_id)
