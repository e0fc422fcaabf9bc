"""AsyncEngine: the LLMEngine in its own thread, behind an asyncio API that never blocks the loop.

The engine thread owns the LLMEngine exclusively. The event loop talks to it only through a
thread-safe inbox (new requests, aborts) and gets outputs back into one ``asyncio.Queue`` per
request, with one ``loop.call_soon_threadsafe`` per step and event loop (not per request: each
call wakes the loop through its self-pipe). Validation runs on the caller's side before anything
is queued, so bad input raises ``ValueError`` at once.

What crosses the thread boundary is plain data (``boundary``): the engine thread turns each request
into an ``EngineRequest`` and sends back ``RequestDelta``s, only what is new per step; each stream folds
them into whole outputs on the caller's side (``OutputAccumulator``), or hands them on as they are
(``deltas=True``, what a streamed HTTP response sends). Moving the engine into its own process would
change this transport, not the engine or its callers.

A prompt may also be a zero-argument callable that returns the token ids: the engine thread calls
it when it takes the request in, so tokenization needs no hop to a worker thread. Under load such a
hop waits on the GIL and the OS scheduler for milliseconds at 64 streams, far longer than tokenizing a
short prompt takes (tens of microseconds). (With the engine in another process, the caller's side
would call it before sending the request.)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from scalellm_jax.engine.boundary import EngineInfo, EngineRequest, EngineStats, RequestDelta
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.lockstep import LockstepError
from scalellm_jax.engine.outputs import OutputAccumulator, RequestOutput
from scalellm_jax.engine.request import SamplingParams

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
    prompt_text: str | None
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


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
        self.info: EngineInfo = engine.info  # immutable: any thread may read it
        self._streams: dict[str, _Add] = {}  # engine-thread only
        self._ids = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        # called on the engine thread if it fails, after every stream got the error (the server exits on it
        # when the engine spans processes: the other processes are gone or stopping)
        self.on_failure: Callable[[BaseException], None] | None = None
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
        prompt_text: str | None = None,
        deltas: bool = False,
    ) -> AsyncIterator[RequestOutput] | AsyncIterator[RequestDelta]:
        """Queue a request; returns an async iterator of its outputs (the last has ``finished``).

        ``prompt``: token ids, or a zero-argument callable returning them, which runs on the engine
        thread (keep it short: the engine steps after it). ``prompt_text``: the text those ids were
        tokenized from, if the caller has it (the length predictor reads it). Raises ``ValueError``
        immediately for token ids the engine can never serve; a callable's ``ValueError`` (or the
        check of the ids it returns) arrives from the iterator instead. Leaving the iteration early
        (client disconnect) aborts the request. Later failures arrive as exceptions from the
        iterator: ``ValueError`` (a limit only the engine thread checks), ``RequestFailedError`` or
        ``EngineDeadError``. A stream that is never iterated is not aborted by closing it: call
        ``abort`` instead.

        The iterator yields whole outputs (``RequestOutput``, whose lists keep growing with later
        outputs), the first with ``queue_time``; with ``deltas`` it yields the engine's
        ``RequestDelta``s instead, only what is new each time. With ``coalesce`` a consumer that fell
        behind gets what arrived meanwhile as one item.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        params = sampling_params or SamplingParams()
        if not callable(prompt):
            self.info.check_request(prompt, params)
            prompt = list(prompt)
        if request_id is None:
            with self._lock:
                self._ids += 1
                request_id = f"async-{self._ids}"
        outputs: asyncio.Queue = asyncio.Queue()
        submit_time = time.monotonic()
        self._inbox.put(_Add(request_id, prompt, params, priority, prompt_text, asyncio.get_running_loop(), outputs))
        accumulator = None if deltas else OutputAccumulator(request_id, submit_time)
        return self._stream(request_id, outputs, coalesce, accumulator)

    async def _stream(self, request_id: str, outputs: asyncio.Queue, coalesce: bool,
                      accumulator: OutputAccumulator | None) -> AsyncIterator[RequestOutput | RequestDelta]:
        finished = False
        try:
            while True:
                delta = await outputs.get()
                while True:
                    if isinstance(delta, BaseException):
                        finished = True  # the engine side already dropped this request
                        raise delta
                    if accumulator is not None:
                        accumulator.add(delta)
                    if not coalesce or delta.finished or outputs.empty():
                        break
                    newer = outputs.get_nowait()
                    merge = accumulator is None and not isinstance(newer, BaseException)
                    delta = delta.merged(newer) if merge else newer  # an accumulator folds it next
                finished = delta.finished
                yield delta if accumulator is None else accumulator.output()
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
                    self.engine.step_deltas(on_deltas=self._deliver)  # delivered before the device wait
                self.stats = self.engine.stats()
            self.engine.close()  # a multi-process leader's followers exit
        except BaseException as exc:  # deliver the failure to every waiting client, never hang them
            if isinstance(exc, LockstepError):  # one line: which process and why is all there is to know
                logger.error("engine thread failed: %s", exc)
            else:
                logger.exception("engine thread failed")
            self._error = exc
            for stream in list(self._streams.values()):
                _send(stream, EngineDeadError(repr(exc)))
            self._streams.clear()
            if self.on_failure is not None:
                self.on_failure(exc)

    def _drain_inbox(self, block: bool) -> None:
        """Take in what the inbox holds; ``block``: the engine is idle, so wait for the first item (a
        multi-process leader wakes every ``keepalive_s`` meanwhile to tell its followers it lives)."""
        keepalive_s = self.engine.keepalive_s
        while True:
            try:
                item = self._inbox.get(block=block, timeout=keepalive_s if block else None)
            except queue.Empty:
                if block:
                    self.engine.keepalive()
                    continue
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
            return
        if isinstance(item, _Abort):
            delta = self.engine.abort(item.request_id)
            if delta is not None:
                self._deliver([delta])
            return
        try:
            prompt = item.prompt() if callable(item.prompt) else item.prompt
            self.engine.add(EngineRequest(item.request_id, tuple(prompt), item.params, prompt_text=item.prompt_text,
                                          priority=item.priority))
        except ValueError as exc:  # e.g. a duplicate id, a KV limit, a prompt too long: fail this request only
            _send(item, exc)
            return
        except Exception as exc:
            logger.exception("adding request %s failed", item.request_id)
            _send(item, RequestFailedError(f"the engine failed this request: {exc!r}"))
            return
        self._streams[item.request_id] = item

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if delta.finished:
                del self._streams[delta.request_id]
            batches.setdefault(stream.loop, []).append((stream.outputs, delta))
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
