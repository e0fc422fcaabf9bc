"""Requests as the host-side engine sees them: sampling parameters, lifecycle status, token state.

Plain Python (no JAX) so the scheduler and KV manager can be tested without a device.

Token accounting follows vLLM v1: a request is one growing token sequence (prompt followed by the
outputs sampled so far) and ``num_computed_tokens`` counts how many of those tokens already have
their KV in the cache. The scheduler's only question per step is "how many of the
``num_pending_tokens`` do I run now?": a prompt chunk, a whole prompt, one decode token, or the
prompt plus outputs of a preempted request being recomputed are all the same thing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SEED_LIMIT = 2**32  # the device sampler turns seeds into uint32 PRNG keys
MAX_LOGPROBS = 20  # most likely alternatives per position (the step program's TOP_LOGPROBS)
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # |bias| per token (OpenAI's range)


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters (OpenAI-like names).

    ``temperature == 0`` means greedy, ``top_k == 0`` and ``top_p == 1`` turn those filters off.
    ``stop`` holds stop strings: they are only stored here; the engine's incremental detokenizer
    matches them, because a string can span several tokens. Every bad value raises ``ValueError``
    whose message starts with the field name, so API layers can pass it straight to the client.

    The logit controls follow vLLM's definitions and order: ``logit_bias`` is added, stop tokens are
    masked before ``min_tokens`` outputs, ``repetition_penalty`` divides positive (multiplies negative)
    logits of tokens in the prompt or the output, ``frequency_penalty`` × a token's output count and
    ``presence_penalty`` × (count > 0) are subtracted; then temperature, ``min_p`` (tokens below
    ``min_p`` × the top probability go), top-k and top-p. Greedy requests see the same adjusted logits.
    Logprobs are those of the model's unadjusted distribution (vLLM's default).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # each sampled token's logprob
    top_logprobs: int = 0  # with logprobs: also the this-many most likely tokens at each sampled position
    prompt_logprobs: int | None = None  # each prompt token's logprob (and the this-many most likely); None: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); a dict is accepted
    min_p: float = 0.0
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many tokens
    include_stop_str_in_output: bool = False  # the stop string (or stop token's text) ends the text
    skip_special_tokens: bool = True  # special tokens have no text in the output

    def __post_init__(self):
        # Accept lists (JSON bodies) but store tuples so the params stay hashable and immutable.
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,) if name == "stop" else value
            if not isinstance(value, tuple):
                try:
                    value = tuple(value)
                except TypeError:
                    raise ValueError(f"{name} must be a sequence, got {value!r}") from None
            object.__setattr__(self, name, value)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, numbers.Real) or not (0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, numbers.Real) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for token in self.stop_token_ids:
            if not _is_int(token) or token < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {token!r}")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop must contain non-empty strings, got {text!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        for name in ("ignore_eos", "logprobs", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("top_logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if not (value is None and name == "prompt_logprobs") and (not _is_int(value)
                                                                       or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit control reads the request's own token history or bias (a device slot)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """``{token: bias}`` or ``[(token, bias)]`` → sorted ``((token, bias), ...)`` (one entry per token)."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [tuple(item) for item in items]
    except TypeError:
        raise ValueError(f"logit_bias must map token ids to biases, got {value!r}") from None
    out = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"logit_bias must map token ids to biases, got item {pair!r}")
        token, bias = pair
        if not _is_int(token) or token < 0:
            raise ValueError(f"logit_bias: token ids must be non-negative integers, got {token!r}")
        if not _is_real(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: the bias of token {token} must be a number in "
                             f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}")
        if int(token) in out:
            raise ValueError(f"logit_bias: token {token} appears twice")
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # back in the waiting queue; where its KV is: ``Request.kv``
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style ``finish_reason`` ("stop", "length", "abort", "error"); None while unfinished."""
        return _FINISH_REASONS.get(self)


class KVLocation(enum.Enum):
    """Where a request's computed KV lives. RUNNING requests are always on DEVICE.

    A PREEMPTED request is DEVICE when it only gave up its batch seat (its pages stay, resuming
    is free), HOST when its pages were swapped to host memory, NONE when they were dropped and
    will be recomputed (``num_computed_tokens`` is then 0).
    """

    NONE = enum.auto()
    DEVICE = enum.auto()
    HOST = enum.auto()


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Request:
    """One generation request and its mutable progress.

    Compared by identity (``eq=False``): two requests with equal fields are still different
    requests, and the scheduler keeps them in lists it removes from.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    eos_token_id: int | None = None
    # The text the prompt was tokenized from, when the caller gave one (the length predictor reads it).
    prompt_text: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    # per output token, its alternatives [(token id, logprob)] best first (with sampling_params.top_logprobs)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # per prompt position (with sampling_params.prompt_logprobs): None for the first, then (logprob of the prompt
    # token, its alternatives [(token id, logprob)]); filled as the prompt's chunks run
    prompt_logprobs: list | None = None
    num_computed_tokens: int = 0
    # Prompt tokens whose KV came from the prefix cache at the first admission (usage's cached_tokens).
    num_cached_tokens: int = 0
    # While waiting without KV: the tokens the prefix cache held for it when last looked up (the
    # policy's estimate of its prefill work counts only the rest); 0 otherwise.
    cached_prefix_hint: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    kv: KVLocation = KVLocation.NONE
    # Time spent waiting (not running) so far, for aging; ``queued_at`` is when the current wait began.
    waited_s: float = 0.0
    queued_at: float | None = None

    def __post_init__(self):
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        if self.sampling_params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    def waited(self, now: float) -> float:
        """Total seconds spent waiting, including the current wait if it is queued."""
        return self.waited_s + (now - self.queued_at if self.queued_at is not None else 0.0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs (a new list; the model input for positions 0..num_tokens-1)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without copying the whole sequence (one call per row per step)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one token is pending: a prompt (or a preempted request's recompute) in progress.

        Exactly one pending token means the request decodes: its newest token goes through the
        model and the next one is sampled. A fresh one-token prompt therefore counts as decoding,
        which is what it is for the attention kernels (one query, no earlier KV).
        """
        return self.num_pending_tokens > 1

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token: int, logprob: float | None = None) -> None:
        """Record a sampled token (and its logprob when the engine computed one)."""
        self.output_token_ids.append(int(token))
        if logprob is not None:
            self.output_logprobs.append(float(logprob))

    def stop_tokens(self) -> tuple[int, ...]:
        """The tokens that end this request: its ``stop_token_ids``, and EOS unless ``ignore_eos``."""
        params = self.sampling_params
        if params.ignore_eos or self.eos_token_id is None:
            return tuple(params.stop_token_ids)
        return (*params.stop_token_ids, self.eos_token_id)

    def is_stop_token(self, token: int) -> bool:
        """One of ``stop_tokens()`` (checked per generated token, so without building the tuple)."""
        params = self.sampling_params
        return (not params.ignore_eos and token == self.eos_token_id) or token in params.stop_token_ids

    def stopped_by_token(self) -> bool:
        """Finished because its last token was a stop token (not by a stop string or a limit)."""
        return (self.status is RequestStatus.FINISHED_STOPPED and bool(self.output_token_ids)
                and self.is_stop_token(self.output_token_ids[-1]))

    def check_stop(self) -> RequestStatus | None:
        """The finished status the newest output token causes, or None to keep generating.

        EOS (unless ``ignore_eos``) and ``stop_token_ids`` win over the length limit, so a request
        whose last allowed token is EOS reports "stop". The context limit (``max_model_len``) is
        the scheduler's job; stop strings are the detokenizer's.
        """
        if not self.output_token_ids:
            return None
        if self.is_stop_token(self.output_token_ids[-1]):
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.sampling_params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None


def validate_prompt(prompt_token_ids: Sequence[int], max_model_len: int, vocab_size: int) -> None:
    """Reject prompts the engine can never serve, with a ``ValueError`` naming ``prompt_token_ids``.

    A prompt must leave room for at least one output token inside the model's context.
    """
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("prompt_token_ids must not be empty")
    ids = np.asarray(prompt_token_ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError("prompt_token_ids must be a flat sequence of integers")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"prompt_token_ids[{i}] = {int(ids[i])} is outside the vocabulary [0, {vocab_size}) "
            f"({bad.size} bad ids)"
        )
    if n + 1 > max_model_len:
        raise ValueError(
            f"prompt_token_ids: prompt has {n} tokens; the model's context is {max_model_len} "
            "(at least one token must be left for the output)"
        )


def clamp_max_tokens(params: SamplingParams, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """``params`` with ``max_tokens`` cut to what fits in the context after the prompt.

    The engine clamps instead of rejecting (a client asking for "up to N tokens" gets as many as
    fit, finishing with "length"), after ``validate_prompt`` guaranteed at least one fits.
    """
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ValueError(f"prompt has {num_prompt_tokens} tokens; the model's context is {max_model_len}")
    if params.max_tokens <= room:
        return params
    return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
