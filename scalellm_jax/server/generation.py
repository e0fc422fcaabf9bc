"""From a validated OpenAI request to engine requests, and from engine outputs to the HTTP response.

One HTTP request becomes one engine request per choice (``n`` per prompt). Tokenization and chat
templates never run on the event loop: short prompts are tokenized by the engine thread as it takes
the request in (``AsyncEngine`` accepts a callable prompt), which costs microseconds where a hop to
a worker thread and back cost milliseconds under load; long prompts, whose tokenization would hold
up the engine's next step, go to a small thread pool. The engine runs in its own thread and sends
each choice's deltas (new tokens and text only, ``RequestDelta``): a streamed response sends them on,
and a stream that fell behind gets what arrived meanwhile as one delta (``coalesce``), sent as one
chunk. Each choice also folds its deltas into its whole output (``OutputAccumulator``), which a
non-streamed response returns and usage counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from aiohttp import web

from scalellm_jax.engine.async_engine import EngineDeadError, Prompt, RequestFailedError, ShuttingDownError
from scalellm_jax.engine.boundary import RequestDelta
from scalellm_jax.engine.request import SEED_LIMIT, SamplingParams
from scalellm_jax.server import protocol, responses
from scalellm_jax.server.errors import APIError, from_engine_error
from scalellm_jax.server.job import Choice, Job
from scalellm_jax.server.loading import ServedModel
from scalellm_jax.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
# Prompts (chat: all message text) up to this many characters are tokenized on the engine thread:
# with Mixtral's tokenizer that costs less than one thread hop under load (see async_engine).
ENGINE_THREAD_TOKENIZE_MAX_CHARS = 2048


class Generator:
    def __init__(self, served: ServedModel, metrics: ServerMetrics, executor: Executor, max_in_flight: int,
                 retry_after_s: int, stream_interval_s: float = 0.0):
        self.served = served
        self._stream_interval = stream_interval_s
        self.metrics = metrics
        self._executor = executor
        self._max_in_flight = max_in_flight
        self._retry_after = str(retry_after_s)
        # Response ids: 128 random bits, seeded once from os.urandom. uuid4 reads os.urandom on every
        # request, a system call that releases the GIL, and the engine thread may then hold it for
        # milliseconds before the event loop gets it back.
        self._id_bits = random.Random()
        self.in_flight = 0  # engine requests admitted and not finished (event-loop only)
        self._idle = asyncio.Event()  # set while in_flight is 0
        self._idle.set()
        self.closing = False  # shutting down: no new requests (set by ServerState.begin_drain)
        self._ended = False  # shutting down, grace over: what still runs was ended (end_all)

    # ------------------------------------------------------------------ requests → jobs

    async def completion_job(self, req: protocol.CompletionRequest) -> Job:
        encode = self.served.tokenizer.encode
        texts = req.prompts()
        for text in texts:
            if isinstance(text, str):
                self._check_fits(len(text), "prompt")
                await self._check_tokens(text, "prompt")
        prompts = [p if isinstance(p, list) else await self._tokenize(len(p), encode, p) for p in texts]
        max_tokens = req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        job = self._job(req, False, prompts, max_tokens, req.logprobs is not None, req.logprobs or 0, "prompt",
                        echo=req.echo)
        job.prompt_texts = [t if isinstance(t, str) else None for t in texts]
        return job

    async def chat_job(self, req: protocol.ChatCompletionRequest) -> Job:
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        size = sum(len(m["content"]) for m in messages)
        self._check_fits(size, "messages")
        text = "\n".join(m["content"] for m in messages)
        await self._check_tokens(text, "messages")
        try:
            prompt = await self._tokenize(size, self.served.tokenizer.apply_chat_template, messages)
        except ValueError as exc:
            raise from_engine_error(exc, "messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens or self.served.max_model_len
        job = self._job(req, True, [prompt], max_tokens, req.logprobs, req.top_logprobs or 0, "messages")
        job.prompt_texts = [text]
        return job

    def _check_fits(self, chars: int, field: str) -> None:
        """Refuse, before any tokenizing, a text too long for the context whatever its tokens (a 15 MB prompt
        is a 400 in microseconds, not after seconds of tokenizing)."""
        per_token = getattr(self.served.tokenizer, "max_token_chars", None)
        limit = self.served.max_model_len
        if per_token and chars > per_token * limit:
            raise APIError(400, f"{field}: {chars} characters cannot fit in the model's context of {limit} tokens "
                                f"(one token stands for at most {per_token} characters)", param=field)

    async def _check_tokens(self, text: str, field: str) -> None:
        """Refuse a text far longer than the context as soon as a prefix of it is over the context: a text
        that passes ``_check_fits`` may still be up to the longest piece's length times the context, and
        tokenizing all of it would be wasted work."""
        limit = self.served.max_model_len
        if len(text) <= PREFIX_CHARS_PER_TOKEN[0] * limit:
            return
        over = await asyncio.get_running_loop().run_in_executor(
            self._executor, _prefix_over, self.served.tokenizer.encode, text, limit)
        if over is not None:
            cut, count = over
            raise APIError(400, f"{field}: longer than the model's context of {limit} tokens (its first {cut} "
                                f"characters alone are {count} tokens)", param=field)

    async def _tokenize(self, size: int, fn, arg) -> Prompt:
        """Token ids from the pool for a long input; for a short one, a call the engine thread makes
        (once, however many choices share it). Either way, never on the event loop."""
        if size <= ENGINE_THREAD_TOKENIZE_MAX_CHARS:
            return functools.cache(functools.partial(fn, arg))
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)

    async def tokenize(self, req: protocol.TokenizeRequest) -> list[int]:
        """``/tokenize``: a prompt's ids (BOS per ``add_special_tokens``) or chat messages' through the template,
        in the tokenizer pool (never on the event loop)."""
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "prompt: give either prompt or messages", param="prompt")
        tokenizer, loop = self.served.tokenizer, asyncio.get_running_loop()
        if req.prompt is not None:
            return await loop.run_in_executor(self._executor, functools.partial(
                tokenizer.encode, req.prompt, add_bos=req.add_special_tokens))
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return await loop.run_in_executor(self._executor, tokenizer.apply_chat_template, messages)
        except ValueError as exc:
            raise from_engine_error(exc, "messages") from None

    async def detokenize(self, token_ids: list[int]) -> str:
        vocab = self.served.info.vocab_size
        for i, token in enumerate(token_ids):
            if token >= vocab:
                raise APIError(400, f"tokens[{i}]: {token} is outside the vocabulary (size {vocab})",
                               param=f"tokens[{i}]")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.served.tokenizer.decode,
                                                                token_ids)

    def check_model(self, req) -> None:
        if req.model != self.served.name:
            raise APIError(400, f"model: unknown model {req.model!r}; this server serves {self.served.name!r}",
                           param="model")

    def _job(self, req, chat: bool, prompts: list[Prompt], max_tokens: int, logprobs: bool, top: int,
             prompt_field: str, echo: bool = False):
        stop = req.stop or ()  # SamplingParams turns one string into a one-item tuple
        # echo with logprobs covers the prompt tokens too, with as many alternatives as the output's
        prompt_logprobs = max(req.prompt_logprobs or 0, top) if echo and logprobs else req.prompt_logprobs
        controls = req.logit_controls()
        choices = []
        for p in range(len(prompts)):
            for i in range(req.n):
                seed = None if req.seed is None else (req.seed + i) % SEED_LIMIT
                try:
                    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                                            top_p=req.top_p, seed=seed, stop=stop, ignore_eos=req.ignore_eos,
                                            stop_token_ids=tuple(req.stop_token_ids or ()), logprobs=logprobs,
                                            top_logprobs=top, prompt_logprobs=prompt_logprobs, **controls)
                except ValueError as exc:
                    raise from_engine_error(exc, prompt_field) from None
                choices.append((p, params))
        options = req.stream_options
        include_usage = bool(options and options.include_usage)
        continuous_usage = bool(options and options.continuous_usage_stats)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{self._id_bits.getrandbits(128):032x}"
        return Job(chat, request_id, self.served.name, int(time.time()), prompts, choices, req.priority, req.stream,
                   include_usage, continuous_usage, logprobs, prompt_field, top_logprobs=top, echo=echo,
                   prompt_logprobs=req.prompt_logprobs)

    # ------------------------------------------------------------------ admission

    @contextlib.contextmanager
    def admit(self, num_requests: int):
        """Reserve engine slots for a request's choices, or refuse with 429 when the queue is full (400 when
        it could never fit, even on an idle server: retrying would not help)."""
        if num_requests > self._max_in_flight:
            raise APIError(400, f"n: the request needs {num_requests} engine requests (prompts × n), more than this "
                                f"server holds at once ({self._max_in_flight}: --max-num-seqs plus "
                                "--max-queued-requests); send fewer prompts or a smaller n", param="n")
        if self.closing:
            raise self.shutting_down()
        if self.in_flight + num_requests > self._max_in_flight:
            raise APIError(429, f"the server is at capacity ({self.in_flight} requests in flight); retry later",
                           headers={"Retry-After": self._retry_after})
        self.in_flight += num_requests
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= num_requests
            if not self.in_flight:
                self._idle.set()

    def shutting_down(self) -> APIError:
        return APIError(503, "the server is shutting down; send the request again (to another replica)",
                        headers={"Retry-After": self._retry_after})

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no admitted request is left (True) or ``timeout`` seconds pass (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True

    def end_all(self) -> None:
        """Shutdown's grace is over: end every request still running (streams get a final error event and
        ``[DONE]``, others a 503) and refuse to start the ones still being prepared."""
        self._ended = True
        self.served.engine.abort_all(ShuttingDownError("the server shut down before this request finished"))

    # ------------------------------------------------------------------ running a job

    async def run(self, job: Job, http_request: web.Request, arrival: float) -> web.StreamResponse:
        engine = self.served.engine
        if self._ended:  # admitted before the shutdown, prepared (tokenized) after its grace ran out
            raise self.shutting_down()
        streams = []
        submit_time = time.monotonic()
        try:
            for k, (p, params) in enumerate(job.choices):
                streams.append(engine.add_request(job.prompts[p], params, request_id=f"{job.request_id}-{k}",
                                                  priority=job.priority, coalesce=True, deltas=True,
                                                  prompt_text=job.prompt_texts[p] if job.prompt_texts else None))
        except (ValueError, EngineDeadError) as exc:
            for k in range(len(streams)):  # never iterated, so closing them would not abort them
                engine.abort(f"{job.request_id}-{k}")
            raise _engine_failure(exc, job.prompt_field) from None
        choices = [Choice(k, self.metrics.tracker(arrival), submit_time) for k in range(len(job.choices))]
        # deltas carry their engine request id; the choice is found from it (one generator level less per
        # token than yielding (index, delta) pairs)
        index = {f"{job.request_id}-{k}": choices[k] for k in range(len(choices))}
        events = _merge(streams)
        try:
            first = await anext(events)  # before any byte is sent: an engine-side refusal is still a 400
            if job.stream:
                return await self._stream(job, choices, index, first, events, http_request)
            self._record(index[first.request_id], first)
            async for out in events:
                self._record(index[out.request_id], out)
            _check_finished(choices)
            return web.Response(body=responses.full_response(job, choices, self.served.tokenizer).encode(),
                                content_type="application/json")
        except (ValueError, RequestFailedError, EngineDeadError, ShuttingDownError) as exc:
            raise _engine_failure(exc, job.prompt_field) from None
        finally:
            await events.aclose()

    async def _stream(self, job: Job, choices: list[Choice], index: dict[str, Choice], first: RequestDelta, events,
                      http_request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http_request)
        try:
            await self._stream_events(job, choices, index, first, events, response)
        except ConnectionResetError:  # noticed on a write: the client went away; ``run`` aborts its requests
            logger.info("%s: the client disconnected during the stream", job.request_id)
        return response

    async def _stream_events(self, job: Job, choices: list[Choice], index: dict[str, Choice], first: RequestDelta,
                             events, response) -> None:
        encoder = responses.ChunkEncoder(job, self.served.tokenizer, choices)
        try:
            out = first
            while True:
                choice = index[out.request_id]
                self._record(choice, out)
                chunk = encoder.chunk(choice, out.new_text)
                if chunk:
                    await response.write(chunk)
                    if self._stream_interval and not out.finished:
                        # let tokens pile up: the stream then hands them over as one delta
                        await asyncio.sleep(self._stream_interval)
                try:
                    out = await anext(events)
                except StopAsyncIteration:
                    break
            _check_finished(choices)
            if job.include_usage:
                await response.write(encoder.usage())
        except (ValueError, RequestFailedError, EngineDeadError, ShuttingDownError) as exc:
            await response.write(_engine_failure(exc, job.prompt_field).sse_event())
        except APIError as exc:
            await response.write(exc.sse_event())
        await response.write(responses.DONE)
        await response.write_eof()

    def _record(self, choice: Choice, delta: RequestDelta) -> None:
        choice.add(delta)
        out = choice.output
        now = time.monotonic()
        choice.tracker.on_output(out.num_tokens, out.queue_time, now)
        if out.finished:
            choice.tracker.on_finish(len(out.prompt_token_ids), out.finish_reason, now)


# Prefixes measured before a long text is tokenized whole, in characters per context token (common text
# runs 3-5 characters a token, so the first catches most of what is too long, at twice the context's size).
PREFIX_CHARS_PER_TOKEN = (2, 8)
# Tokens a cut can add to a prefix (the cut word's fragment may tokenize into more pieces than the word).
PREFIX_SLACK = 16


def _prefix_over(encode, text: str, limit: int) -> tuple[int, int] | None:
    """``(prefix characters, its tokens)`` of the first prefix over ``limit`` tokens, if one is."""
    for per_token in PREFIX_CHARS_PER_TOKEN:
        cut = per_token * limit
        if len(text) <= cut:
            return None
        count = len(encode(text[:cut], add_bos=False))
        if count > limit + PREFIX_SLACK:
            return cut, count
    return None


def _check_finished(choices: list[Choice]) -> None:
    for c in choices:
        if c.output.finish_reason not in responses.FINISH_REASONS:
            raise APIError(500, f"the engine ended choice {c.index} with finish_reason {c.output.finish_reason!r}")


def _engine_failure(exc: Exception, prompt_field: str) -> APIError:
    if isinstance(exc, ValueError):
        return from_engine_error(exc, prompt_field)
    if isinstance(exc, ShuttingDownError):
        return APIError(503, f"{exc}; send it again (to another replica)")
    return APIError(500, f"the engine failed this request: {exc}")


def _merge(streams: list[AsyncIterator[RequestDelta]]) -> AsyncIterator[RequestDelta]:
    """Deltas of all streams as they come; closing this closes (aborts) them all."""
    if len(streams) == 1:  # the common case: the stream itself, no task and no extra generator
        return streams[0]
    return _merge_several(streams)


async def _merge_several(streams: list[AsyncIterator[RequestDelta]]) -> AsyncIterator[RequestDelta]:
    # What each stream sent and was not handed on yet, as one delta (or its failure): a consumer that
    # fell behind gets it in one piece, as a single stream does with ``coalesce``.
    latest: dict[int, RequestDelta | Exception] = {}
    wake = asyncio.Event()

    async def pump(index, stream):
        async with contextlib.aclosing(stream):
            try:
                async for delta in stream:
                    waiting = latest.get(index)
                    latest[index] = delta if waiting is None else waiting.merged(delta)
                    wake.set()
            except Exception as exc:
                latest[index] = exc
                wake.set()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            await wake.wait()
            wake.clear()
            ready = sorted(latest.items())
            latest.clear()
            for _, item in ready:
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
