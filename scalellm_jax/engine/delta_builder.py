"""The engine's side of its output boundary: each request's new tokens, logprobs and text, per step.

A request's output lists live on its ``Request``; this remembers how much of them each request has
already reported, so a step's delta costs its new tokens only (copying whole outputs every step was
O(n²) over an answer). Text comes from the request's incremental detokenizer, which is also where stop
strings are found: a completed one finishes the request through ``finish``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from scalellm_jax.engine.boundary import RequestDelta
from scalellm_jax.engine.request import Request, RequestStatus
from scalellm_jax.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


class _Progress:
    """What one request has reported so far."""

    __slots__ = ("reported", "tokens", "text", "detokenizer", "scheduled_time")

    def __init__(self):
        self.reported = False  # its first delta (which carries the prompt) was built
        self.tokens = 0  # output tokens (and their logprobs) already in a delta
        self.text = 0  # characters of text already in a delta
        self.detokenizer: IncrementalDetokenizer | None = None
        self.scheduled_time: float | None = None


class DeltaBuilder:
    """``finish(request_id, status)`` ends a request outside the step's own bookkeeping (a stop string,
    a detokenizer failure)."""

    def __init__(self, tokenizer, finish: Callable[[str, RequestStatus], object]):
        self.tokenizer = tokenizer  # None: no text (and no stop strings)
        self._finish = finish
        self._progress: dict[str, _Progress] = {}  # per request that has not had its final delta

    def start(self, request_id: str) -> None:
        self._progress[request_id] = _Progress()

    def scheduled(self, requests, now: float) -> None:
        """Note when each of ``requests`` (``ScheduledRequest``) was first scheduled."""
        progress = self._progress
        for s in requests:
            p = progress.get(s.request_id)
            if p is not None and p.scheduled_time is None:
                p.scheduled_time = now

    def delta(self, request: Request, num_tokens: int | None = None) -> RequestDelta:
        """What ``request`` gained since its last delta, up to its first ``num_tokens`` output tokens
        (default: all); the request's final delta when it finished (its progress is then forgotten)."""
        rid = request.request_id
        p = self._progress.get(rid)
        if p is None:  # a request that was never started here (not expected): report from scratch
            p = _Progress()
        end = request.num_output_tokens if num_tokens is None else num_tokens
        text = ""
        if self.tokenizer is not None:
            try:
                text = self._text(request, p, end)
            except Exception:  # a detokenizer failure fails this request, not the engine
                logger.exception("detokenizing %s failed", rid)
                self._finish(rid, RequestStatus.FINISHED_ERROR)
                request.status = RequestStatus.FINISHED_ERROR
        params = request.sampling_params
        start, p.tokens = p.tokens, end
        first, p.reported = not p.reported, True
        finished = request.status.is_finished
        if finished:
            self._progress.pop(rid, None)
        return RequestDelta(
            request_id=rid,
            new_token_ids=tuple(request.output_token_ids[start:end]),
            new_text=text,
            finished=finished,
            finish_reason=request.finish_reason,
            new_logprobs=tuple(request.output_logprobs[start:end]) if params.logprobs else None,
            new_top_logprobs=(tuple(tuple(a) for a in request.output_top_logprobs[start:end])
                              if params.top_logprobs else None),
            prompt_token_ids=tuple(request.prompt_token_ids) if first else None,
            prompt_logprobs=tuple(request.prompt_logprobs) if first and request.prompt_logprobs is not None else None,
            num_cached_tokens=request.num_cached_tokens,
            scheduled_time=p.scheduled_time,
        )

    def forget(self, request_id: str) -> None:
        self._progress.pop(request_id, None)

    def _text(self, request: Request, p: _Progress, end: int) -> str:
        """Feed the request's new tokens to its detokenizer; a completed stop string finishes it.
        Returns the text not yet reported."""
        params = request.sampling_params
        detok = p.detokenizer
        if detok is None:
            detok = p.detokenizer = IncrementalDetokenizer(
                self.tokenizer, params.stop, include_stop=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens, min_tokens=params.min_tokens)
        stop = end
        if (request.stopped_by_token() and end == request.num_output_tokens
                and not params.include_stop_str_in_output):
            stop = end - 1  # EOS or a stop token id has no text (vLLM's rule)
        if stop > detok.num_tokens:
            detok.add(request.output_token_ids[detok.num_tokens:stop])
        if detok.stopped and not request.status.is_finished:
            self._finish(request.request_id, RequestStatus.FINISHED_STOPPED)
        finished = request.status.is_finished
        if finished:
            detok.finish()
            if detok.stopped and request.status is RequestStatus.FINISHED_LENGTH:
                request.status = RequestStatus.FINISHED_STOPPED  # the last character completed a stop string
        text = detok.text(finished=finished)
        new, p.text = text[p.text:], len(text)
        return new
