"""LLMEngine: the synchronous step loop (schedule → execute → postprocess) with continuous batching.

Requests join at the next ``step`` and leave the step they finish; every step is one jitted call
on a bucketed batch and one device→host transfer of the sampled token ids and their logprobs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import jax
import numpy as np

from scalellm_jax.config import EngineConfig
from scalellm_jax.engine.kv_manager import KVManager
from scalellm_jax.engine.memory import device_memory_bytes, plan_memory
from scalellm_jax.engine.policies import make_policy
from scalellm_jax.engine.request import (
    Request,
    RequestStatus,
    SamplingParams,
    clamp_max_tokens,
    validate_prompt,
)
from scalellm_jax.engine.runner import ModelRunner
from scalellm_jax.engine.scheduler import Scheduler, SchedulerConfig
from scalellm_jax.loader import Model

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step: all output tokens so far, and whether it finished."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None
    text: str = ""


def default_kernels() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


class LLMEngine:
    def __init__(
        self, model: Model, config: EngineConfig | None = None, *, tokenizer=None, interpret: bool = False
    ):
        self.model = model
        self.tokenizer = tokenizer  # optional: needed for stop strings and output text
        self.config = config = config or EngineConfig()
        c = model.config
        self.max_model_len = min(config.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        max_pages_per_seq = -(-self.max_model_len // config.page_size)
        kernels = default_kernels() if config.attention_kernels == "auto" else config.attention_kernels
        mesh_shape = dict(model.mesh.shape) if model.mesh is not None else {}
        self.memory_plan = plan_memory(
            c, config, dtype=model.dtype, tp=mesh_shape.get("tensor", 1), ep=mesh_shape.get("expert", 1),
            device_bytes=device_memory_bytes(jax.devices()[0]), max_pages_per_seq=max_pages_per_seq,
        )
        logger.info("%s", self.memory_plan.describe())
        num_pages = self.memory_plan.num_pages
        self.kv = KVManager(num_pages, config.page_size, max_pages_per_seq)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
            ),
            self.kv,
            make_policy(config.scheduling_policy),
        )
        self.runner = ModelRunner(
            model, page_size=config.page_size, num_pages=num_pages, max_pages_per_seq=max_pages_per_seq,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            kernels=kernels, kv_cache_dtype=config.kv_cache_dtype, interpret=interpret,
        )
        self._seeds = np.random.default_rng(config.seed)
        self._pending: list[tuple[Request, int, bool]] = []  # step outputs still to build
        self._ids = itertools.count()
        logger.info(
            "engine: %d KV pages of %d tokens, kernels=%s, max_model_len=%d",
            num_pages, config.page_size, kernels, self.max_model_len,
        )

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
        validate_prompt(prompt_token_ids, self.max_model_len, self.model.config.vocab_size)

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort(request_id)
        return None if request is None else self._output(request)

    def has_unfinished(self) -> bool:
        """Requests still running or waiting, or outputs not yet returned by ``step``."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Run one step; returns outputs for the requests that got a token or finished.

        Outputs trail the device by one step: step N's outputs (detokenization, stop strings, the
        output objects) are built in the call that runs step N+1, while the device computes it.
        A request stopped by a stop string in step N may already be in step N+1's batch; that
        extra work is discarded (``update`` skips finished requests).
        """
        plan = self.scheduler.schedule()
        dispatched = None
        if plan.scheduled:
            dispatched = self.runner.execute(self.runner.prepare(plan.scheduled, self.kv))
        outputs = self._emit_pending()  # host work for step N-1, overlapping the device's step N
        if dispatched is None:
            return outputs
        tokens, logprobs = (np.asarray(a) for a in dispatched)  # the step's one device→host transfer
        sampled = {
            s.request_id: (int(tokens[i]), float(logprobs[i]) if s.request.sampling_params.logprobs else None)
            for i, s in enumerate(plan.scheduled)
            if s.needs_sample
        }
        finished = {r.request_id for r in self.scheduler.update(plan, sampled)}
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
            text = self.tokenizer.decode(token_ids)
            stops = [i for i in (text.find(stop) for stop in request.sampling_params.stop) if i >= 0]
            if stops:
                text = text[: min(stops)]
                if not request.status.is_finished:
                    self.scheduler.abort(request.request_id, RequestStatus.FINISHED_STOPPED)
        logprobs = request.output_logprobs[:num_tokens] if request.sampling_params.logprobs else None
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(token_ids),
            logprobs=logprobs,
            finished=request.status.is_finished,
            finish_reason=request.finish_reason,
            text=text,
        )
