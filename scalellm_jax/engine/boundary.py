"""What crosses between the engine and its callers, as plain data.

Requests go in as ``EngineRequest``; every step comes out as one ``RequestDelta`` per request that
got tokens or finished, holding only what is new since its previous delta; ``EngineInfo`` describes
the engine once and ``EngineStats`` its queues and KV cache after each step. None of them refers to
the engine's own objects, so a transport could carry them between processes: today they cross a call
(``LLMEngine.step_deltas``) or a thread (``AsyncEngine``). vLLM v1 splits its engine the same way
(``EngineCoreRequest`` in, ``EngineCoreOutput`` deltas out, the frontend's ``OutputProcessor``
accumulating); here the detokenizer and stop strings stay on the engine's side, so deltas carry
their text too.

Whole outputs are accumulated on the caller's side (``outputs.OutputAccumulator``), by whoever needs
them: ``LLM.generate``, ``LLMEngine.step``, ``AsyncEngine``'s cumulative streams and the server's
non-streamed responses. A streamed response sends the deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalellm_jax.engine.request import SamplingParams, validate_prompt


@dataclass(frozen=True)
class EngineRequest:
    """One generation request as the engine takes it in."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    # The text the caller tokenized, when it had one (the length predictor reads it instead of
    # decoding the ids back); None when the caller gave token ids alone.
    prompt_text: str | None = None
    priority: int = 0  # lower runs first under the priority policies (vLLM's convention)
    arrival_time: float | None = None  # time.monotonic() at arrival; None: when the engine takes it in


@dataclass(frozen=True)
class RequestDelta:
    """What one request gained in one step (or at its abort): only the new part of its output.

    ``new_logprobs`` and ``new_top_logprobs`` are None unless the request asked for them. Fields
    that do not grow ride along: ``prompt_token_ids`` and ``prompt_logprobs`` in the request's
    first delta only (None afterwards), ``num_cached_tokens`` and ``scheduled_time`` in every one.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str  # never retracted: the engine holds back the tail a stop string could still claim
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", "error"; None while unfinished
    new_logprobs: tuple[float, ...] | None = None
    # per new token, its most likely alternatives ((id, logprob), ...) best first
    new_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None  # the first delta only
    # the first delta only, when asked: per prompt token, None for the first, then (logprob, alternatives)
    prompt_logprobs: tuple | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (at first admission)
    scheduled_time: float | None = None  # time.monotonic() of the step that first scheduled the request

    def merged(self, later: RequestDelta) -> RequestDelta:
        """This delta followed by ``later`` (same request) as one: for a consumer that fell behind."""
        return RequestDelta(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_text=self.new_text + later.new_text,
            finished=later.finished,
            finish_reason=later.finish_reason,
            new_logprobs=_joined(self.new_logprobs, later.new_logprobs),
            new_top_logprobs=_joined(self.new_top_logprobs, later.new_top_logprobs),
            prompt_token_ids=self.prompt_token_ids if self.prompt_token_ids is not None else later.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
            num_cached_tokens=later.num_cached_tokens,
            scheduled_time=self.scheduled_time if self.scheduled_time is not None else later.scheduled_time,
        )


def _joined(a: tuple | None, b: tuple | None) -> tuple | None:
    if a is None:
        return b
    return a if b is None else a + b


@dataclass(frozen=True)
class EngineInfo:
    """The engine as its callers see it, fixed once it is built (what the server reads, never the engine)."""

    max_num_seqs: int  # requests running at once
    max_model_len: int  # context: prompt plus output tokens
    vocab_size: int
    page_size: int  # tokens per KV page
    has_tokenizer: bool  # needed for stop strings and output text
    eos_token_id: int | None
    simulated_device: str | None = None  # the steps run on a simulated device (random output tokens)

    def check_request(self, prompt_token_ids, params: SamplingParams) -> None:
        """Raise ``ValueError`` naming the field if this request can never be served (pure: any thread)."""
        if params.stop and not self.has_tokenizer:
            raise ValueError("stop: stop strings need an engine with a tokenizer")
        outside = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if outside:
            raise ValueError(f"logit_bias: token {outside[0]} is outside the vocabulary [0, {self.vocab_size})")
        validate_prompt(prompt_token_ids, self.max_model_len, self.vocab_size)


@dataclass(frozen=True)
class EngineStats:
    """Queue sizes, KV cache use and preemptions after a step."""

    num_running: int
    num_waiting: int  # new and preempted
    num_swapped: int  # preempted, with their KV in host swap space
    kv_cache_usage: float  # fraction of the usable KV pages in use
    num_preemptions: int  # since start
    kv_pages_in_use: int = 0  # usable KV pages held by requests (0 once every request ended)
    kv_pages_cached: int = 0  # pages in the prefix cache, held or not (those not held are reclaimable)
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache at admission, since start
    prefix_cache_hits: int = 0  # of those, tokens found cached (their prefill skipped)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of looked-up tokens found in the prefix cache (0 before any lookup)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
