"""LLMEngine: the synchronous step loop (schedule → execute → postprocess) with continuous batching.

Requests join at the next ``step`` and leave the step they finish; every step is one jitted call
on a bucketed batch and one device→host transfer of the sampled token ids and their logprobs.
What goes in and out is plain data (``boundary``): ``EngineRequest`` in, per step one
``RequestDelta`` per request with new tokens out (``step_deltas``), and ``info`` describes the
engine; ``step`` folds the deltas into whole outputs for callers that want those.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from scalellm_jax.config import ConfigError, EngineConfig
from scalellm_jax.engine import lockstep
from scalellm_jax.engine.boundary import EngineInfo, EngineRequest, EngineStats, RequestDelta
from scalellm_jax.engine.delta_builder import DeltaBuilder
from scalellm_jax.engine.kv_manager import KVManager
from scalellm_jax.engine.outputs import OutputAccumulator, RequestOutput
from scalellm_jax.engine.policies import AliseConfig, LengthEstimates, make_policy
from scalellm_jax.engine.request import KVLocation, Request, RequestStatus, SamplingParams, clamp_max_tokens
from scalellm_jax.engine.resolved import ResolvedConfig, resolve
from scalellm_jax.engine.runner import ModelRunner
from scalellm_jax.engine.scheduler import Scheduler
from scalellm_jax.engine.simulated_device import SimulatedDevice, SimulatedRunner
from scalellm_jax.engine.step_costs import StepCostModel
from scalellm_jax.engine.step_program import PlatformChoices
from scalellm_jax.loader import Model

logger = logging.getLogger(__name__)

__all__ = ["EngineStats", "LLMEngine", "RequestOutput"]  # the first and last: importable from here, as before


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
        self._deltas = DeltaBuilder(tokenizer, self._finish)  # new tokens, logprobs and text per step
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
            runner = ModelRunner(model, resolved, choices=choices, interpret=interpret)
            # under jax.distributed: process 0 leads, the others repeat its device work (``follow``)
            self.runner = lockstep.for_processes(runner, _description(
                resolved, kernels=choices.kernels, moe_impl=choices.moe_impl,
                few_token_options=choices.few_token_options))
            kernels = choices.kernels
        else:
            kernels = f"simulated {simulated.device}"
            if simulated.hosts != jax.process_count():
                raise ConfigError(f"simulated_device: the simulated devices span {simulated.hosts} hosts but "
                                  f"{jax.process_count()} processes run the engine")
            self.runner = lockstep.for_processes(SimulatedRunner(simulated, resolved),
                                                 _description(resolved, kernels=kernels))
        self.kv = KVManager.for_engine(resolved)
        self.step_costs = StepCostModel(decode_buckets=self.runner.seq_buckets)
        alise = AliseConfig(aging_rate=config.aging_rate)
        if config.scheduling_policy == "alise" and lengths is None:
            from scalellm_jax.engine.predicted_lengths import PredictedLengths  # loads the sentence encoder

            lengths = PredictedLengths.build(tokenizer, warm_start=config.length_predictor_data)
        policy = make_policy(config.scheduling_policy, lengths=lengths, costs=self.step_costs, alise=alise)
        self.scheduler = Scheduler.for_engine(resolved, self.kv, policy)
        self.info = EngineInfo(
            max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len, vocab_size=resolved.model.vocab_size,
            page_size=config.page_size, has_tokenizer=tokenizer is not None, eos_token_id=resolved.model.eos_token_id,
            simulated_device=simulated.device if simulated is not None else None,
        )
        self._seeds = np.random.default_rng(config.seed)
        self._pending: list[tuple[Request, int, bool]] = []  # step deltas still to build
        self._accumulators: dict[str, OutputAccumulator] = {}  # ``step``'s whole outputs, per unfinished request
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

    @property
    def tokenizer(self):
        """Optional: needed for stop strings and output text (the detokenizers use it)."""
        return self._deltas.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._deltas.tokenizer = tokenizer

    def warmup(self, progress: bool = True) -> None:
        """Compile every step shape; on a multi-process leader, on every process. A follower's is a no-op:
        the leader's warmup reaches it through ``follow``."""
        if not isinstance(self.runner, lockstep.FollowerRunner):
            self.runner.warmup(progress)

    # ------------------------------------------------------------------ several processes

    @property
    def keepalive_s(self) -> float | None:
        """How often an idle engine must call ``keepalive`` (a multi-process leader's); None: never."""
        return getattr(self.runner, "keepalive_s", None)

    def keepalive(self) -> None:
        self.runner.keepalive()

    def follow(self) -> int:
        """On a follower process of a multi-process engine: repeat process 0's device work until it closes
        its engine; returns the steps run. Raises ``lockstep.LockstepError`` when process 0 is lost."""
        if not isinstance(self.runner, lockstep.FollowerRunner):
            raise RuntimeError("follow: only a follower process (jax.process_index() > 0) follows")
        return self.runner.follow()

    def close(self) -> None:
        """Release the engine's followers (a multi-process leader's: they return from ``follow``); idempotent."""
        if isinstance(self.runner, lockstep.LeaderRunner):
            self.runner.close()

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> str:
        """Validate and queue a request (see ``add``); returns its id (``req-N`` unless given)."""
        return self.add(EngineRequest(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=tuple(prompt_token_ids), sampling_params=sampling_params or SamplingParams(),
            prompt_text=prompt_text, priority=priority, arrival_time=arrival_time,
        ))

    def add(self, new: EngineRequest) -> str:
        """Validate and queue a request; ``ValueError`` (naming the field) leaves the engine untouched."""
        params = new.sampling_params
        self.info.check_request(new.prompt_token_ids, params)
        params = clamp_max_tokens(params, len(new.prompt_token_ids), self.max_model_len)
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._seeds.integers(2**32)))
        request = Request(
            request_id=new.request_id,
            prompt_token_ids=list(new.prompt_token_ids),
            sampling_params=params,
            arrival_time=time.monotonic() if new.arrival_time is None else new.arrival_time,
            priority=new.priority,
            eos_token_id=self.model.config.eos_token_id,
            prompt_text=new.prompt_text,
        )
        self.scheduler.add_request(request)
        self._deltas.start(request.request_id)
        return request.request_id

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` naming the field if this request can never be served."""
        self.info.check_request(prompt_token_ids, params)

    def abort(self, request_id: str) -> RequestDelta | None:
        """End a request; its final delta (None if it is not in the engine any more)."""
        self._accumulators.pop(request_id, None)
        request = self._finish(request_id, RequestStatus.FINISHED_ABORTED)
        return None if request is None else self._delta(request)

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
        """``step_deltas``, folded into whole outputs: one per request that got a token or finished.

        The outputs' lists keep growing with later steps (``OutputAccumulator``): a step costs the new
        tokens only. ``on_outputs`` works as ``step_deltas``'s ``on_deltas``. Use either this or
        ``step_deltas`` on one engine, not both.
        """
        if on_outputs is None:
            return self._accumulate(self.step_deltas())
        self.step_deltas(on_deltas=lambda deltas: on_outputs(self._accumulate(deltas)))
        return []

    def _accumulate(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        outputs = []
        accumulators = self._accumulators
        for delta in deltas:
            accumulator = accumulators.get(delta.request_id)
            if accumulator is None:
                accumulator = accumulators[delta.request_id] = OutputAccumulator(delta.request_id)
            accumulator.add(delta)
            outputs.append(accumulator.output())
            if delta.finished:
                del accumulators[delta.request_id]
        return outputs

    def step_deltas(self, on_deltas: Callable[[list[RequestDelta]], None] | None = None) -> list[RequestDelta]:
        """Run one step; returns a delta for each request that got a token or finished.

        Deltas trail the device by one step: step N's (detokenization, stop strings, the delta
        objects) are built in the call that runs step N+1, while the device computes it. A request
        stopped by a stop string in step N may already be in step N+1's batch; that extra work is
        discarded (``update`` skips finished requests).

        ``on_deltas``, if given, receives those deltas as soon as they are built, before this call
        waits for the device, and the call returns ``[]``. A server uses it so that a client sees a
        finished request (and can send its next one) a device step earlier, in time for the next
        step's schedule.
        """
        now = time.monotonic()
        plan = self.scheduler.schedule()
        self._deltas.scheduled(plan.scheduled, now)
        self.runner.swap(plan.swap_out, plan.swap_in)  # preempted KV out to host, resumed KV back in
        dispatched = None
        start = time.perf_counter()
        if plan.scheduled:
            dispatched = self.runner.execute(self.runner.prepare(plan.scheduled, self.kv))
        self.runner.finish_swaps()  # swap-outs land in host memory while the device runs the step
        deltas = self._emit_pending()  # host work for step N-1, overlapping the device's step N
        if on_deltas is not None:
            if deltas:
                on_deltas(deltas)
            deltas = []
        if dispatched is None:
            return deltas
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
        return deltas

    def _emit_pending(self) -> list[RequestDelta]:
        pending, self._pending = self._pending, []
        deltas = []
        for request, num_tokens, finished in pending:
            if not finished and request.status.is_finished:
                continue  # aborted since: its final delta was already reported
            deltas.append(self._delta(request, num_tokens))
        return deltas

    def _delta(self, request: Request, num_tokens: int | None = None) -> RequestDelta:
        """``request``'s delta as of its first ``num_tokens`` output tokens (default: all)."""
        delta = self._deltas.delta(request, num_tokens)
        if delta.finished:
            self._finished_preemptions += request.num_preemptions
        return delta

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


def _description(resolved: ResolvedConfig, **choices) -> dict:
    """What must be equal on every process of a multi-process engine (``lockstep.check_same_engine``):
    the resolved options, and the platform ``choices`` (kernels and the like)."""
    return {
        **{f"engine.{k}": v for k, v in dataclasses.asdict(resolved.engine).items() if k != "seed"},
        **{f"model.{k}": v for k, v in dataclasses.asdict(resolved.model).items()},
        "dtype": str(resolved.dtype), "tp": resolved.tp, "ep": resolved.ep, "num_pages": resolved.num_pages,
        "max_pages_per_seq": resolved.max_pages_per_seq, **choices, "platform": jax.default_backend(),
        "jax": jax.__version__,
    }


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

