"""AsyncEngine: the LLMEngine in its own thread, behind an asyncio API that never blocks the loop.

The engine thread owns the LLMEngine exclusively. The event loop talks to it only through a
thread-safe inbox (new requests, aborts) and gets outputs back into one ``asyncio.Queue`` per
request, with one ``loop.call_soon_threadsafe`` per step and event loop (not per request: each
call wakes the loop through its self-pipe). Validation runs on the caller's side before anything
is queued, so bad input raises ``ValueError`` at once.

A prompt may also be a zero-argument callable that returns the token ids: the engine thread calls
it when it takes the request in, so tokenization needs no hop to a worker thread. Under load such a
hop waits on the GIL and the OS scheduler for milliseconds at 64 streams, far longer than tokenizing a
short prompt takes (tens of microseconds).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from scalellm_jax.engine.engine import EngineStats, LLMEngine, RequestOutput
from scalellm_jax.engine.request import RequestStatus, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; the message carries the original error."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request (not because of its input); other requests go on."""


class ShuttingDownError(RuntimeError):
    """The request was ended unfinished because the server is shutting down (``AsyncEngine.abort_all``)."""


Prompt = list[int] | Callable[[], list[int]]  # token ids, or a function the engine thread calls for them


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    priority: int
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    submit_time: float
    queue_time: float | None = None  # engine thread: set when first seen scheduled
    sent_first: bool = False


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    error: BaseException


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Add] = {}  # engine-thread only
        self._queued: dict[str, _Add] = {}  # engine-thread only: added, not yet scheduled
        self._ids = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        # Replaced (never mutated) by the engine thread after every step, so any thread may read it.
        self.stats: EngineStats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="scalellm-engine", daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine thread, or None while it runs."""
        return self._error

    # ------------------------------------------------------------------ event-loop side

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        coalesce: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns an async iterator of its outputs (the last has ``finished``).

        ``prompt``: token ids, or a zero-argument callable returning them, which runs on the engine
        thread (keep it short: the engine steps after it). Raises ``ValueError`` immediately for
        token ids the engine can never serve; a callable's ``ValueError`` (or the check of the ids
        it returns) arrives from the iterator instead. Leaving the iteration early (client
        disconnect) aborts the request. Later failures arrive as
        exceptions from the iterator: ``ValueError`` (a limit only the engine thread checks),
        ``RequestFailedError`` or ``EngineDeadError``. With ``coalesce`` a consumer that fell
        behind gets only the newest of the outputs waiting for it (outputs are cumulative).
        A stream that is never iterated is not aborted by closing it: call ``abort`` instead.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        params = sampling_params or SamplingParams()
        if not callable(prompt):
            self.engine.check_request(prompt, params)  # pure checks against immutable config
            prompt = list(prompt)
        if request_id is None:
            with self._lock:
                self._ids += 1
                request_id = f"async-{self._ids}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(request_id, prompt, params, priority, asyncio.get_running_loop(), outputs,
                             time.monotonic()))
        return self._stream(request_id, outputs, coalesce)

    async def _stream(self, request_id: str, outputs: asyncio.Queue, coalesce: bool) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await outputs.get()
                while coalesce and isinstance(item, RequestOutput) and not item.finished and not outputs.empty():
                    newer = outputs.get_nowait()
                    if isinstance(newer, RequestOutput) and newer.queue_time is None:
                        newer.queue_time = item.queue_time
                    item = newer
                if isinstance(item, BaseException):
                    finished = True  # the engine side already dropped this request
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

    def abort_all(self, error: BaseException) -> None:
        """End every request taken in so far: abort it and fail its stream with ``error``. Never blocks."""
        self._inbox.put(_AbortAll(error))

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
                    start = time.monotonic()
                    self.engine.step(on_outputs=self._deliver)  # delivered before the device wait
                    self._mark_scheduled(start)
                self.stats = self.engine.stats()
        except BaseException as exc:  # deliver the failure to every waiting client, never hang them
            logger.exception("engine thread failed")
            self._error = exc
            for stream in list(self._streams.values()):
                _send(stream, EngineDeadError(repr(exc)))
            self._streams.clear()

    def _drain_inbox(self, block: bool) -> None:
        """Take in what the inbox holds; ``block``: the engine is idle, so wait for the first item."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            self._take(item)

    def _take(self, item: _Add | _Abort | _AbortAll) -> None:
        if isinstance(item, _AbortAll):
            for request_id, stream in self._streams.items():
                self.engine.abort(request_id)
                _send(stream, item.error)
            self._streams.clear()
            self._queued.clear()
            return
        if isinstance(item, _Abort):
            out = self.engine.abort(item.request_id)
            self._queued.pop(item.request_id, None)
            if out is not None:
                self._deliver([out])
            return
        try:
            prompt = item.prompt() if callable(item.prompt) else item.prompt
            self.engine.add_request(prompt, item.params, request_id=item.request_id, priority=item.priority)
        except ValueError as exc:  # e.g. a duplicate id, a KV limit, a prompt too long: fail this request only
            _send(item, exc)
            return
        except Exception as exc:
            logger.exception("adding request %s failed", item.request_id)
            _send(item, RequestFailedError(f"the engine failed this request: {exc!r}"))
            return
        self._streams[item.request_id] = item
        self._queued[item.request_id] = item

    def _mark_scheduled(self, step_start: float) -> None:
        """Record the queue time of requests the step just scheduled for the first time."""
        get = self.engine.scheduler.get
        for request_id, stream in list(self._queued.items()):
            request = get(request_id)
            if request is None or request.status is not RequestStatus.WAITING:
                stream.queue_time = max(0.0, step_start - stream.submit_time)
                del self._queued[request_id]

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
                self._queued.pop(out.request_id, None)
            if not stream.sent_first:
                stream.sent_first = True
                out.queue_time = stream.queue_time
            batches.setdefault(stream.loop, []).append((stream.outputs, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                logger.debug("dropping %d outputs: event loop closed", len(items))


def _put_all(items: list) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


def _send(stream: _Add, item) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)
    except RuntimeError:  # the client's event loop is closed: nobody is listening any more
        logger.debug("dropping output for %s: event loop closed", stream.request_id)
