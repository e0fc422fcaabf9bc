"""Whole outputs on the caller's side of the engine boundary: ``RequestOutput`` and its accumulator.

The engine sends deltas (``boundary.RequestDelta``); ``OutputAccumulator`` folds one request's deltas
into its whole output at a cost proportional to each delta, not to the output so far.
"""

from __future__ import annotations

import dataclasses

from scalellm_jax.engine.boundary import RequestDelta


@dataclasses.dataclass
class RequestOutput:
    """A request's whole output so far (all its output tokens), and whether it finished.

    ``text`` only ever grows from one output to the next (while unfinished the engine holds back the
    tail a stop string could still claim), so a streaming client can send ``text[len(sent):]``.
    ``queue_time`` (seconds from submission until first scheduled) is set by ``AsyncEngine`` on a
    request's first output. Outputs built by an ``OutputAccumulator`` share its lists, which keep
    growing as later deltas arrive (a cumulative output costs no copy): copy them to keep a snapshot.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None
    text: str = ""
    queue_time: float | None = None
    # per output token, its top_logprobs most likely tokens [(id, logprob)], best first (when asked)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # per prompt token: None for the first, then (its logprob, [(id, logprob)] of the prompt_logprobs most
    # likely); complete once the first output token exists (when asked)
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (at first admission)


class OutputAccumulator:
    """One request's whole output, folded from its deltas.

    ``submit_time`` (``time.monotonic()`` when the caller submitted the request): the first output then
    carries ``queue_time``, from submission until the engine first scheduled the request.
    """

    __slots__ = ("request_id", "prompt_token_ids", "token_ids", "logprobs", "top_logprobs", "prompt_logprobs",
                 "text", "finished", "finish_reason", "num_cached_tokens", "_submit_time", "_scheduled_time",
                 "_reported")

    def __init__(self, request_id: str, submit_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids: list[int] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = None
        self.top_logprobs: list[list[tuple[int, float]]] | None = None
        self.prompt_logprobs: list | None = None
        self.text = ""
        self.finished = False
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0
        self._submit_time = submit_time
        self._scheduled_time: float | None = None
        self._reported = False  # an output was built (only the first carries queue_time)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def queue_time(self) -> float | None:
        """Seconds from submission until the engine first scheduled the request (None until known)."""
        if self._submit_time is None or self._scheduled_time is None:
            return None
        return max(0.0, self._scheduled_time - self._submit_time)

    def add(self, delta: RequestDelta) -> None:
        """Fold in the request's next delta (O(its new tokens))."""
        if delta.prompt_token_ids is not None:
            self.prompt_token_ids = list(delta.prompt_token_ids)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = list(delta.prompt_logprobs)
        self.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.new_logprobs)
        if delta.new_top_logprobs is not None:
            if self.top_logprobs is None:
                self.top_logprobs = []
            self.top_logprobs.extend(list(alternatives) for alternatives in delta.new_top_logprobs)
        if delta.new_text:
            self.text += delta.new_text
        self.finished, self.finish_reason = delta.finished, delta.finish_reason
        self.num_cached_tokens = delta.num_cached_tokens
        if self._scheduled_time is None:
            self._scheduled_time = delta.scheduled_time

    def output(self) -> RequestOutput:
        """The whole output so far; its lists are this accumulator's own (they keep growing)."""
        queue_time = None if self._reported else self.queue_time
        self._reported = True
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids, token_ids=self.token_ids,
            logprobs=self.logprobs, finished=self.finished, finish_reason=self.finish_reason, text=self.text,
            queue_time=queue_time, top_logprobs=self.top_logprobs, prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=self.num_cached_tokens,
        )
