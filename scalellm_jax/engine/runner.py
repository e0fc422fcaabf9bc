"""ModelRunner: device state (params, per-layer KV pools) and the bucketed, jitted step functions.

A step's batch is flattened to tokens and padded up to a shape bucket so that serving compiles
nothing after warmup:

* **mixed** steps (any prefill chunk in the batch): ``num_tokens`` rounded up to a bucket
  (≥ 16, ≤ ``max_num_batched_tokens``); the sequence axis is always ``max_num_seqs`` rows, because
  padding rows cost nothing in the ragged kernel (zero new tokens, zero kv length).
* **decode** steps (one token per sequence): ``num_seqs`` rounded up to a bucket, through the
  decode kernel.

Buckets are powers of two, plus 1.5× powers of two from 16 rows and from 128 tokens
(``step_buckets``): without them 33 running sequences pay for 64 (a CPU decode step at 64 rows
costs nearly twice one at 32), and a 257-token step for 512. ``EngineConfig.decode_buckets`` /
``token_buckets`` replace them with a few chosen sizes (plus the largest) where compiling every
bucket at warmup takes too long (a 32-layer Mixtral step: tens of seconds each on a GPU).

The KV pools are donated to every step, so XLA updates them in place. Sampling happens inside the
step: only token ids and (when asked) logprobs come back to the host.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from scalellm_jax.engine.buckets import bucket_for, pow2_buckets
from scalellm_jax.engine.history_slots import HistorySlots
from scalellm_jax.engine.kv_swap import KVSwapper, page_bytes
from scalellm_jax.engine.logit_controls import NO_SLOT, TokenHistory, history_shapes, write_rows
from scalellm_jax.engine.resolved import ResolvedConfig
from scalellm_jax.engine.scheduler import ScheduledRequest, SwapOp
from scalellm_jax.engine.step_program import (
    PlatformChoices,
    StepBatch,
    StepOutput,
    StepShapes,
    pool_shapes,
    step_functions,
)
from scalellm_jax.loader import Model
from scalellm_jax.model.paged import kv_pool_spec

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: Model, resolved: ResolvedConfig, *, choices: PlatformChoices, interpret: bool = False):
        """Pools, shape buckets and swap from ``resolved`` (see ``resolved.resolve``); ``choices``: the platform's
        kernels and step programs (``PlatformChoices.for_platform``)."""
        config = resolved.engine
        page_size, num_pages, max_pages_per_seq = config.page_size, resolved.num_pages, resolved.max_pages_per_seq
        max_num_seqs, swap_compression = config.max_num_seqs, resolved.swap_compression
        c = model.config
        self.model = model
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = max_pages_per_seq
        self.max_num_seqs = max_num_seqs
        self.shapes = StepShapes(max_num_seqs, config.max_num_batched_tokens, max_pages_per_seq,
                                 decode_sizes=config.decode_buckets, token_sizes=config.token_buckets)
        self.token_buckets = self.shapes.token_buckets
        self.seq_buckets = self.shapes.seq_buckets
        self.choices = choices
        self._functions = step_functions(c, model.dtype, choices, mesh=model.mesh, interpret=interpret)
        self.pools = self._allocate_pools(config.kv_cache_dtype)
        self.slots = HistorySlots(max_num_seqs, c.vocab_size)
        self.history = self._allocate_history()
        # a partial of its own: jit shares one cache per function, and num_compilations counts this runner's
        self._write_rows = jax.jit(functools.partial(write_rows), donate_argnums=(0,))
        self.swapper = None
        if swap_compression is not None:
            self.swapper = KVSwapper(num_pages, pow2_buckets(1, max_pages_per_seq),
                                     compress=swap_compression == "int8")

    def swap_page_bytes(self, compression: str = "none") -> int:
        """Host bytes of one swapped page (all layers) under ``compression``."""
        return page_bytes(self.pools, compression == "int8")

    def _allocate_pools(self, kv_cache_dtype: str):
        """A ``LayerKV`` per layer, its arrays sharded over KV heads on the tensor axis under a mesh
        (``kv_pool_spec``)."""
        c = self.model.config
        mesh = self.model.mesh
        sharding = NamedSharding(mesh, kv_pool_spec(c.num_kv_heads, mesh)) if mesh is not None else None
        # zeros, never empty: unused pages must not hold NaN that could reach an output
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=sharding),
                            pool_shapes(c, self.num_pages, self.page_size, self.model.dtype, kv_cache_dtype))

    def _allocate_history(self):
        """The logit controls' token history: one zeroed row per slot, replicated under a mesh."""
        mesh = self.model.mesh
        sharding = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        shapes = history_shapes(self.slots.num_slots, self.model.config.vocab_size)
        return TokenHistory(*(jnp.zeros(a.shape, a.dtype, device=sharding) for a in shapes))

    # ------------------------------------------------------------------ host side

    def prepare(self, scheduled: list[ScheduledRequest], kv) -> StepBatch:
        """Flatten the scheduled requests into padded numpy arrays for one step."""
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        decode_only = num_tokens == len(scheduled)  # one token per row
        if decode_only:
            rows = n_tok = bucket_for(len(scheduled), self.seq_buckets)
        else:
            rows, n_tok = self.max_num_seqs, bucket_for(num_tokens, self.token_buckets)
        batch = self._empty(decode_only, n_tok, rows)
        self.slots.release_idle()
        controls = batch.controls
        offset = 0
        for i, s in enumerate(scheduled):
            request, n = s.request, s.num_new_tokens
            end = offset + n
            batch.tokens[offset:end] = request.token_ids(s.start, s.start + n)
            batch.positions[offset:end] = np.arange(s.start, s.start + n)
            batch.slot_mapping[offset:end] = kv.slot_mapping(request.request_id, s.start, s.start + n)
            kv.page_table_row(request.request_id, batch.page_table[i])
            batch.kv_lengths[i] = s.start + n
            batch.cu_q_lens[i + 1 :] = end
            batch.logits_index[i] = end - 1
            params = request.sampling_params
            batch.temperature[i] = params.temperature
            batch.top_k[i] = min(params.top_k, self.model.config.vocab_size)  # larger is the same as off
            batch.top_p[i] = params.top_p
            batch.min_p[i] = params.min_p
            if params.adjusts_logits and s.needs_sample:
                controls.slot[i] = self.slots.slot(request)
                controls.presence[i], controls.frequency[i] = params.presence_penalty, params.frequency_penalty
                controls.repetition[i] = params.repetition_penalty
                controls.suppress_stop[i] = request.num_output_tokens < params.min_tokens
            batch.seeds[i] = params.seed  # the engine fills in a seed for every request
            batch.steps[i] = request.num_output_tokens
            batch.want_logprobs[i] = params.logprobs
            batch.want_top[i] = params.top_logprobs > 0
            if params.prompt_logprobs is not None and s.start < request.num_prompt_tokens - 1:
                # position q predicts prompt token q + 1
                last = min(s.start + n, request.num_prompt_tokens - 1)
                batch.prompt_targets[offset:offset + last - s.start] = request.prompt_token_ids[s.start + 1:last + 1]
            offset = end
        batch.history_writes = self.slots.take_writes()
        return batch

    def _empty(self, decode_only: bool, num_tokens: int, rows: int) -> StepBatch:
        return StepBatch.empty(decode_only, num_tokens, rows, self.max_pages_per_seq)

    # ------------------------------------------------------------------ device side

    def execute(self, batch: StepBatch) -> StepOutput:
        """Dispatch one step; returns its device arrays (token ids, logprobs, ...) without waiting."""
        fn = self._functions[batch.decode_only, self.choices.few(len(batch.tokens))]
        if batch.history_writes is not None:
            self.history = self._write_rows(self.history, *batch.history_writes)
        out, self.pools, self.history = fn(*batch.args(self.model.params, self.pools, self.history))
        return out

    def swap(self, swap_out: list[SwapOp], swap_in: list[SwapOp]) -> None:
        """Dispatch a step's swap-outs, then its swap-ins (before the step itself)."""
        if (swap_out or swap_in) and self.swapper is None:
            raise RuntimeError("the scheduler planned a swap but this runner has no swap space")
        for op in swap_out:
            self.swapper.swap_out(self.pools, op.request_id, op.pages)
        for op in swap_in:
            self.pools = self.swapper.swap_in(self.pools, op.request_id, op.pages)

    def finish_swaps(self) -> None:
        """Land dispatched swap-outs in host memory (call after dispatching the step: it overlaps)."""
        if self.swapper is not None:
            self.swapper.finish_transfers()

    def drop_swapped(self, request_id: str) -> None:
        if self.swapper is not None:
            self.swapper.drop(request_id)

    def warmup(self, progress: bool = True) -> None:
        """Compile every bucket once (all-padding batches write nothing and read nothing)."""
        shapes = self.shapes.warmup()
        for decode_only, num_tokens, rows in tqdm(shapes, desc="compiling step buckets", disable=not progress):
            jax.block_until_ready(self.execute(self._empty(decode_only, num_tokens, rows)))
        vocab = self.model.config.vocab_size
        for n in self.slots.write_buckets:  # padding rows only: they write nowhere
            self.history = self._write_rows(self.history, np.full(n, NO_SLOT, np.int32), np.zeros((n, vocab), np.int32),
                                            np.zeros((n, vocab), np.float32))
        if self.swapper is not None:
            self.pools = self.swapper.warmup(self.pools)
        writes = self._write_rows._cache_size()
        logger.info("warmup compiled %d step and swap shapes and %d logit-history writes: decode buckets %s, "
                    "mixed buckets %s", self.num_compilations() - writes, writes, list(self.seq_buckets),
                    list(self.token_buckets))

    def num_compilations(self) -> int:
        """Distinct compiled step (and swap) executables so far (flat after warmup means no recompiles)."""
        swaps = self.swapper.num_compilations() if self.swapper is not None else 0
        steps = sum(fn._cache_size() for fn in self._functions.values())
        return steps + self._write_rows._cache_size() + swaps
