"""LLMEngine: the synchronous step loop (schedule → execute → postprocess) with continuous batching.

Requests join at the next ``step`` and leave the step they finish; every step is one jitted call
on a bucketed batch and one device→host transfer of the sampled token ids and their logprobs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from scalellm_jax.config import EngineConfig
from scalellm_jax.engine.kv_manager import KVManager
from scalellm_jax.engine.policies import AliseConfig, LengthEstimates, make_policy
from scalellm_jax.engine.request import (
    KVLocation,
    Request,
    RequestStatus,
    SamplingParams,
    clamp_max_tokens,
    validate_prompt,
)
from scalellm_jax.engine.resolved import ResolvedConfig, resolve
from scalellm_jax.engine.runner import ModelRunner
from scalellm_jax.engine.scheduler import Scheduler
from scalellm_jax.engine.simulated_device import SimulatedDevice, SimulatedRunner
from scalellm_jax.engine.step_costs import StepCostModel
from scalellm_jax.engine.step_program import PlatformChoices
from scalellm_jax.loader import Model
from scalellm_jax.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step: all output tokens so far, and whether it finished.

    ``text`` only ever grows from one output to the next (while unfinished it holds back the
    tail a stop string could still claim), so a streaming client can send ``text[len(sent):]``.
    ``queue_time`` (seconds from submission until first scheduled) is set by ``AsyncEngine`` on a
    request's first output.
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
    # likely); the request's own list, complete once the first output token exists (when asked)
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (at first admission)


@dataclasses.dataclass(frozen=True)
class EngineStats:
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


class LLMEngine:
    def __init__(
        self, model: Model, config: EngineConfig | ResolvedConfig | None = None, *, tokenizer=None,
        interpret: bool = False,
        lengths: LengthEstimates | None = None, simulated: SimulatedDevice | None = None,
    ):
        """``config``: the engine options, or their ``resolve``d form (``LLM`` resolves them before loading).
        ``lengths``: output-length estimates for the ``alise`` policy (default: the learned predictor).
        ``simulated``: run on a simulated device instead (``simulated_device``; ``model`` needs no params)."""
        self.model = model
        self.tokenizer = tokenizer  # optional: needed for stop strings and output text
        self.simulated = simulated
        resolved = self.resolved = self._resolve(model, config or EngineConfig(), simulated)
        self.config = config = resolved.engine
        self.max_model_len = resolved.max_model_len
        self.memory_plan = resolved.memory
        if simulated is not None:
            logger.warning("%s", simulated.describe())
        logger.info("%s", self.memory_plan.describe())
        if simulated is None:
            choices = PlatformChoices.for_platform(jax.default_backend(), config.attention_kernels, model.dtype)
            self.runner = ModelRunner(model, resolved, choices=choices, interpret=interpret)
            kernels = choices.kernels
        else:
            self.runner = SimulatedRunner(simulated, resolved)
            kernels = f"simulated {simulated.device}"
        self.kv = KVManager.for_engine(resolved)
        self.step_costs = StepCostModel(decode_buckets=self.runner.seq_buckets)
        alise = AliseConfig(aging_rate=config.aging_rate)
        if config.scheduling_policy == "alise" and lengths is None:
            from scalellm_jax.engine.predicted_lengths import PredictedLengths  # loads the sentence encoder

            lengths = PredictedLengths.build(tokenizer, warm_start=config.length_predictor_data)
        policy = make_policy(config.scheduling_policy, lengths=lengths, costs=self.step_costs, alise=alise)
        self.scheduler = Scheduler.for_engine(resolved, self.kv, policy)
        self._seeds = np.random.default_rng(config.seed)
        self._pending: list[tuple[Request, int, bool]] = []  # step outputs still to build
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}  # per unfinished request with output text
        self._finished_preemptions = 0  # preemptions of requests no longer in the scheduler
        self._ids = itertools.count()
        logger.info(
            "engine: %d KV pages of %d tokens, kernels=%s, max_model_len=%d, prefix caching %s",
            resolved.num_pages, config.page_size, kernels, self.max_model_len,
            "on" if config.enable_prefix_caching else "off",
        )

    @staticmethod
    def _resolve(model: Model, config: EngineConfig | ResolvedConfig,
                 simulated: SimulatedDevice | None) -> ResolvedConfig:
        """``config`` as given when already resolved (for this model and mesh), else resolved now for them."""
        if simulated is not None:
            tp, ep = simulated.tp, simulated.ep
        else:
            mesh_shape = dict(model.mesh.shape) if model.mesh is not None else {}
            tp, ep = mesh_shape.get("tensor", 1), mesh_shape.get("expert", 1)
        if isinstance(config, ResolvedConfig):
            if (config.model, config.dtype, config.tp, config.ep) != (model.config, np.dtype(model.dtype), tp, ep):
                raise ValueError("config: resolved for another model, dtype or mesh than the one given")
            return config
        if simulated is None:
            return resolve(config, model.config, dtype=model.dtype, tp=tp, ep=ep)
        return resolve(config, model.config, dtype=model.dtype, tp=tp, ep=ep,
                       budget_bytes=simulated.budget_bytes(config.gpu_memory_utilization),
                       swap_page_bytes=simulated.swap_page_bytes(config.page_size, config.kv_cache_dtype,
                                                                 config.swap_compression))

    def warmup(self, progress: bool = True) -> None:
        self.runner.warmup(progress)

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Validate and queue a request; ``ValueError`` (naming the field) leaves the engine untouched."""
        params = sampling_params or SamplingParams()
        self.check_request(prompt_token_ids, params)
        params = clamp_max_tokens(params, len(prompt_token_ids), self.max_model_len)
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._seeds.integers(2**32)))
        request = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            priority=priority,
            eos_token_id=self.model.config.eos_token_id,
        )
        self.scheduler.add_request(request)
        return request.request_id

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` naming the field if this request can never be served."""
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need an engine with a tokenizer")
        vocab = self.model.config.vocab_size
        outside = [token for token, _ in params.logit_bias if token >= vocab]
        if outside:
            raise ValueError(f"logit_bias: token {outside[0]} is outside the vocabulary [0, {vocab})")
        validate_prompt(prompt_token_ids, self.max_model_len, vocab)

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self._finish(request_id, RequestStatus.FINISHED_ABORTED)
        return None if request is None else self._output(request)

    def _finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request outside the step's own bookkeeping (abort, stop string, failure)."""
        request = self.scheduler.abort(request_id, status)
        self.runner.drop_swapped(request_id)  # it may have been swapped out since its last step
        return request

    def has_unfinished(self) -> bool:
        """Requests still running or waiting, or outputs not yet returned by ``step``."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ------------------------------------------------------------------ the step

    def step(self, on_outputs: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """Run one step; returns outputs for the requests that got a token or finished.

        Outputs trail the device by one step: step N's outputs (detokenization, stop strings, the
        output objects) are built in the call that runs step N+1, while the device computes it.
        A request stopped by a stop string in step N may already be in step N+1's batch; that
        extra work is discarded (``update`` skips finished requests).

        ``on_outputs``, if given, receives those outputs as soon as they are built, before this
        call waits for the device, and the call returns ``[]``. A server uses it so that a client
        sees a finished request (and can send its next one) a device step earlier, in time for
        the next step's schedule.
        """
        plan = self.scheduler.schedule()
        self.runner.swap(plan.swap_out, plan.swap_in)  # preempted KV out to host, resumed KV back in
        dispatched = None
        start = time.perf_counter()
        if plan.scheduled:
            dispatched = self.runner.execute(self.runner.prepare(plan.scheduled, self.kv))
        self.runner.finish_swaps()  # swap-outs land in host memory while the device runs the step
        outputs = self._emit_pending()  # host work for step N-1, overlapping the device's step N
        if on_outputs is not None:
            if outputs:
                on_outputs(outputs)
            outputs = []
        if dispatched is None:
            return outputs
        tokens, logprobs = np.asarray(dispatched.tokens), np.asarray(dispatched.logprobs)  # the step's transfer
        decode_rows = sum(1 for s in plan.scheduled if s.num_new_tokens == 1)
        self.step_costs.observe(prefill_tokens=plan.num_batched_tokens - decode_rows, decode_rows=decode_rows,
                                seconds=time.perf_counter() - start)
        sampled = {
            s.request_id: (int(tokens[i]), float(logprobs[i]) if s.request.sampling_params.logprobs else None)
            for i, s in enumerate(plan.scheduled)
            if s.needs_sample
        }
        _record_prompt_logprobs(plan.scheduled, dispatched)
        finished = {r.request_id for r in self.scheduler.update(plan, sampled)}
        _record_top_logprobs(plan.scheduled, dispatched)
        self._pending = [
            (s.request, s.request.num_output_tokens, s.request_id in finished)
            for s in plan.scheduled
            if s.request_id in finished or (s.needs_sample and s.request.status is RequestStatus.RUNNING)
        ]
        return outputs

    def _emit_pending(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, []
        outputs = []
        for request, num_tokens, finished in pending:
            if not finished and request.status.is_finished:
                continue  # aborted since: its final output was already reported
            outputs.append(self._output(request, num_tokens))
        return outputs

    def _output(self, request: Request, num_tokens: int | None = None) -> RequestOutput:
        """The output for ``request`` as of its first ``num_tokens`` output tokens (default: all)."""
        token_ids = request.output_token_ids[:num_tokens]
        text = ""
        if self.tokenizer is not None:
            try:
                text = self._text(request, token_ids)
            except Exception:  # a detokenizer failure fails this request, not the engine
                logger.exception("detokenizing %s failed", request.request_id)
                self._detokenizers.pop(request.request_id, None)
                self._finish(request.request_id, RequestStatus.FINISHED_ERROR)
                request.status = RequestStatus.FINISHED_ERROR
        if request.status.is_finished:
            self._finished_preemptions += request.num_preemptions
        params = request.sampling_params
        logprobs = request.output_logprobs[:num_tokens] if params.logprobs else None
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(token_ids),
            logprobs=logprobs,
            top_logprobs=request.output_top_logprobs[:num_tokens] if params.top_logprobs else None,
            prompt_logprobs=request.prompt_logprobs,
            finished=request.status.is_finished,
            finish_reason=request.finish_reason,
            text=text,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _text(self, request: Request, token_ids: list[int]) -> str:
        """Feed the request's new tokens to its detokenizer; a completed stop string finishes it."""
        detok = self._detokenizers.get(request.request_id)
        params = request.sampling_params
        if detok is None:
            detok = IncrementalDetokenizer(self.tokenizer, params.stop, include_stop=params.include_stop_str_in_output,
                                           skip_special_tokens=params.skip_special_tokens,
                                           min_tokens=params.min_tokens)
            self._detokenizers[request.request_id] = detok
        if (request.stopped_by_token() and len(token_ids) == request.num_output_tokens
                and not params.include_stop_str_in_output):
            token_ids = token_ids[:-1]  # EOS or a stop token id has no text (vLLM's rule)
        detok.add(token_ids[detok.num_tokens:])
        if detok.stopped and not request.status.is_finished:
            self._finish(request.request_id, RequestStatus.FINISHED_STOPPED)
        if request.status.is_finished:
            detok.finish()
            if detok.stopped and request.status is RequestStatus.FINISHED_LENGTH:
                request.status = RequestStatus.FINISHED_STOPPED  # the last character completed a stop string
            del self._detokenizers[request.request_id]
        return detok.text(finished=request.status.is_finished)

    def stats(self) -> EngineStats:
        """Queue sizes, KV cache usage and preemptions (call from the thread that steps the engine)."""
        running, waiting = self.scheduler.running, self.scheduler.waiting
        kv = self.kv
        live_preemptions = sum(r.num_preemptions for r in running) + sum(r.num_preemptions for r in waiting)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            num_swapped=sum(1 for r in waiting if r.kv is KVLocation.HOST),
            kv_cache_usage=1.0 - kv.num_free_pages / kv.num_usable_pages,
            num_preemptions=self._finished_preemptions + live_preemptions,
            kv_pages_in_use=kv.num_usable_pages - kv.num_free_pages,
            kv_pages_cached=kv.num_cached_pages,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
        )


def _record_top_logprobs(scheduled, out) -> None:
    """Each newly sampled token's alternatives, for the requests that asked (read from the device only then)."""
    wanted = [(i, s.request) for i, s in enumerate(scheduled)
              if s.needs_sample and s.request.sampling_params.top_logprobs
              and len(s.request.output_top_logprobs) == s.request.num_output_tokens - 1]
    if not wanted:
        return
    values, ids = np.asarray(out.top_logprobs), np.asarray(out.top_ids)
    for i, request in wanted:
        n = request.sampling_params.top_logprobs
        request.output_top_logprobs.append(list(zip(ids[i, :n].tolist(), values[i, :n].tolist(), strict=True)))


def _record_prompt_logprobs(scheduled, out) -> None:
    """Each prompt position's logprob (and alternatives) the step computed, into its request's list (by
    position: a chunk that runs again after a preemption writes the same entries)."""
    arrays = None
    offset = 0
    for s in scheduled:
        request, n = s.request, s.num_new_tokens
        k = request.sampling_params.prompt_logprobs
        last = min(s.start + n, request.num_prompt_tokens - 1)
        if k is not None and last > s.start and request.prompt_logprobs is not None:
            if arrays is None:
                arrays = [np.asarray(a) for a in (out.prompt_logprobs, out.prompt_top_logprobs, out.prompt_top_ids)]
            lp, top_lp, top_ids = arrays
            for j in range(last - s.start):
                alternatives = list(zip(top_ids[offset + j, :k].tolist(), top_lp[offset + j, :k].tolist(), strict=True))
                request.prompt_logprobs[s.start + j + 1] = (float(lp[offset + j]), alternatives)
        offset += n

