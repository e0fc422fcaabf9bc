"""What the engine compiles: the jitted step functions, their shape buckets and their arguments.

One definition serves the ``ModelRunner`` (which compiles and runs these programs on the local
devices) and ``benchmarks.gpu_compile_check`` (which compiles the same programs for an H200 on a
CPU machine). The platform-dependent implementation choices are made here, from a platform name
passed in, never from the compiling host's backend: a compile for a GPU on a CPU host must get
the GPU choices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scalellm_jax.config import ModelConfig
from scalellm_jax.cpu_features import host_cpu
from scalellm_jax.engine.buckets import step_buckets
from scalellm_jax.engine.logit_controls import NO_SLOT, RowControls, apply_controls, controlled_rows, record_tokens
from scalellm_jax.engine.request import MAX_LOGPROBS
from scalellm_jax.engine.sampling import logprobs_and_top, row_keys, sample, token_logprobs
from scalellm_jax.model import Mixtral
from scalellm_jax.model.kv_pool import LayerKV
from scalellm_jax.model.paged import PagedAttention, PagedMeta

# XLA:CPU hands dots to YNNPACK by default. On an x86 CPU with AVX2 but not AVX-512, against float32
# weights, a step of few tokens (weights streamed from memory, few rows each) runs faster on XLA's own
# Eigen dots. With AVX-512, YNNPACK is faster at every step size; so it is for many tokens, and for
# bfloat16 weights (which Eigen converts slowly). Elsewhere (other ISAs) nothing was measured and XLA's
# default stays. Measured on AVX-512 in benchmarks/results/cpu_choices_ab-20261204-173000.json (decode
# steps and whole offline runs, alternating); on AVX2 in commit 21b6900's message (no result file kept).
CPU_FEW_TOKEN_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)
CPU_FEW_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class PlatformChoices:
    """Attention kernels (``pallas`` | ``xla``), MoE implementation (``ragged`` | ``chunked``), and the
    compiler options of steps of at most ``few_tokens`` tokens (none: every step compiles alike)."""

    kernels: str
    moe_impl: str
    few_token_options: tuple[tuple[str, str], ...] = ()
    few_tokens: int = 0

    @classmethod
    def for_platform(cls, platform: str, kernels: str = "auto", dtype=None,
                     cpu_flags: frozenset[str] | None = None) -> PlatformChoices:
        """GPU: our Pallas kernels and ``ragged_dot`` experts; elsewhere the blockwise jnp attention
        and the capacity-batched experts (XLA:CPU lowers ``ragged_dot`` densely). On a CPU with AVX2
        and without AVX-512 (``cpu_flags``: the host's by default) and a float32 model (``dtype``),
        steps of few tokens use XLA's own dots (``CPU_FEW_TOKEN_OPTIONS``)."""
        gpu = platform in ("gpu", "cuda", "rocm")
        if kernels == "auto":
            kernels = "pallas" if gpu else "xla"
        few = platform == "cpu" and dtype is not None and jnp.dtype(dtype) == jnp.float32
        if few:
            flags = host_cpu()[1] if cpu_flags is None else cpu_flags
            few = "avx2" in flags and "avx512f" not in flags
        return cls(kernels=kernels, moe_impl="ragged" if gpu else "chunked",
                   few_token_options=CPU_FEW_TOKEN_OPTIONS if few else (), few_tokens=CPU_FEW_TOKENS if few else 0)

    def few(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` tokens runs the few-token program."""
        return bool(self.few_token_options) and num_tokens <= self.few_tokens


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The shape buckets of the two step programs (see ``runner`` for why these buckets).

    mixed steps: ``num_tokens`` in ``token_buckets`` with ``max_num_seqs`` rows; decode steps:
    ``num_seqs`` in ``seq_buckets`` rows of one token each.

    ``decode_sizes`` / ``token_sizes`` (``EngineConfig.decode_buckets`` / ``token_buckets``) replace the
    default buckets with these sizes plus the largest default (``max_num_seqs`` rows, ``max_num_batched_tokens``
    tokens), so every batch still fits one: fewer executables to compile, at the cost of padding up to the
    next kept size. None: the defaults.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_pages_per_seq: int
    decode_sizes: tuple[int, ...] | None = None
    token_sizes: tuple[int, ...] | None = None

    @functools.cached_property
    def token_buckets(self) -> tuple[int, ...]:
        if self.token_sizes is not None:
            return _kept("token_sizes", self.token_sizes, self.max_num_batched_tokens)
        return step_buckets(min(16, self.max_num_batched_tokens), self.max_num_batched_tokens, fine_from=128)

    @functools.cached_property
    def seq_buckets(self) -> tuple[int, ...]:
        if self.decode_sizes is not None:
            return _kept("decode_sizes", self.decode_sizes, self.max_num_seqs)
        return step_buckets(1, self.max_num_seqs, fine_from=16)

    def warmup(self) -> list[tuple[bool, int, int]]:
        """``(decode_only, num_tokens, rows)`` of every executable serving can run."""
        return [(True, n, n) for n in self.seq_buckets] + [(False, n, self.max_num_seqs) for n in self.token_buckets]


def _kept(name: str, sizes, largest: int) -> tuple[int, ...]:
    """``sizes`` and ``largest``, sorted and unique (sizes must lie in [1, largest])."""
    bad = [n for n in sizes if not 1 <= n <= largest]
    if bad:
        raise ValueError(f"StepShapes.{name}: {bad} outside [1, {largest}]")
    return tuple(sorted({*sizes, largest}))


@dataclasses.dataclass
class StepBatch:
    """Host-side (numpy) inputs of one step, already padded to its bucket."""

    decode_only: bool
    tokens: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    page_table: np.ndarray
    kv_lengths: np.ndarray
    cu_q_lens: np.ndarray
    logits_index: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray
    controls: RowControls  # numpy [rows] each: the logit controls' history slot and penalties
    want_logprobs: np.ndarray  # [rows]: the sampled token's logprob
    want_top: np.ndarray  # [rows]: the TOP_LOGPROBS most likely tokens too
    prompt_targets: np.ndarray  # [tokens]: the next prompt token, for prompt logprobs; -1: not wanted
    # history rows to write before the step (requests taking a slot): (slots, marks, bias); None: none
    history_writes: tuple | None = None

    @classmethod
    def empty(cls, decode_only: bool, num_tokens: int, rows: int, max_pages_per_seq: int) -> StepBatch:
        """An all-padding batch: it writes nothing and reads nothing."""
        return cls(
            decode_only=decode_only,
            tokens=np.zeros(num_tokens, np.int32),
            positions=np.zeros(num_tokens, np.int32),
            slot_mapping=np.full(num_tokens, -1, np.int32),
            page_table=np.zeros((rows, max_pages_per_seq), np.int32),
            kv_lengths=np.zeros(rows, np.int32),
            cu_q_lens=np.zeros(rows + 1, np.int32),
            logits_index=np.zeros(rows, np.int32),
            temperature=np.zeros(rows, np.float32),
            top_k=np.zeros(rows, np.int32),
            top_p=np.ones(rows, np.float32),
            min_p=np.zeros(rows, np.float32),
            seeds=np.zeros(rows, np.uint32),
            steps=np.zeros(rows, np.int32),
            controls=RowControls(slot=np.full(rows, NO_SLOT, np.int32), presence=np.zeros(rows, np.float32),
                                 frequency=np.zeros(rows, np.float32), repetition=np.ones(rows, np.float32),
                                 suppress_stop=np.zeros(rows, bool)),
            want_logprobs=np.zeros(rows, bool),
            want_top=np.zeros(rows, bool),
            prompt_targets=np.full(num_tokens, -1, np.int32),
        )

    def args(self, params, pools, history) -> tuple:
        """The positional arguments of a step function for this batch (``history``: the ``TokenHistory``)."""
        meta = PagedMeta(self.slot_mapping, self.page_table, self.kv_lengths, self.cu_q_lens)
        return (params, pools, history, self.tokens, self.positions, meta, self.logits_index, self.temperature,
                self.top_k, self.top_p, self.min_p, self.seeds, self.steps, self.controls, self.want_logprobs,
                self.want_top, self.prompt_targets)


TOP_LOGPROBS = MAX_LOGPROBS  # alternatives a step returns per position when asked
PROMPT_LOGPROBS_CHUNK = 256  # prompt positions projected onto the vocabulary at a time


class StepOutput(NamedTuple):
    """What a step returns besides the KV pools (device arrays; the host reads only what was asked for)."""

    tokens: jax.Array  # [rows] sampled ids
    logprobs: jax.Array  # [rows] their logprobs (zeros unless some row wants them)
    top_logprobs: jax.Array  # [rows, TOP_LOGPROBS]
    top_ids: jax.Array  # [rows, TOP_LOGPROBS]
    prompt_logprobs: jax.Array  # [tokens] logprob of each position's next prompt token
    prompt_top_logprobs: jax.Array  # [tokens, TOP_LOGPROBS]
    prompt_top_ids: jax.Array  # [tokens, TOP_LOGPROBS]


def _prompt_logprobs(module, params, hidden, targets, k):
    """Per position, the logprob of ``targets`` [T] and the TOP_LOGPROBS best, from the hidden states [T, H],
    PROMPT_LOGPROBS_CHUNK positions at a time: never all [T, V] logits at once."""
    chunk = min(PROMPT_LOGPROBS_CHUNK, hidden.shape[0])
    pad = -hidden.shape[0] % chunk
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, hidden.shape[-1])
    t = jnp.pad(targets, (0, pad), constant_values=-1).reshape(-1, chunk)

    def one(args):
        hc, tc = args
        logits = module.apply({"params": params}, hc, method="project")
        return logprobs_and_top(logits, jnp.maximum(tc, 0), k)

    lp, top_lp, top_ids = jax.lax.map(one, (h, t))
    n = hidden.shape[0]
    return lp.reshape(-1)[:n], top_lp.reshape(-1, k)[:n], top_ids.reshape(-1, k)[:n]


def _step(module, params, pools, history, tokens, positions, meta, logits_index, temperature, top_k, top_p, min_p,
          seeds, steps, controls, want_logprobs, want_top, prompt_targets):
    logits, pools, hidden = module.apply(
        {"params": params}, tokens[None], positions[None], pools, meta, logits_index=logits_index[None],
        return_hidden=True,
    )
    logits = logits[0]
    adjust = (controlled_rows(history, controls), lambda x: apply_controls(x, history, controls))
    next_tokens = sample(logits, row_keys(seeds), steps, temperature, top_k, top_p, min_p, adjust=adjust)
    history = record_tokens(history, controls.slot, next_tokens)
    rows, n = next_tokens.shape[0], tokens.shape[0]
    k = min(TOP_LOGPROBS, logits.shape[-1])
    # A log-softmax over the vocabulary for every row costs ~10% of a CPU decode step: each output only
    # when some row (or prompt position) asks for it.
    logprobs, top_lp, top_ids = jax.lax.cond(
        jnp.any(want_top),
        lambda: logprobs_and_top(logits, next_tokens, k),
        lambda: (jax.lax.cond(jnp.any(want_logprobs), lambda: token_logprobs(logits, next_tokens),
                              lambda: jnp.zeros((rows,), jnp.float32)),
                 jnp.zeros((rows, k), jnp.float32), jnp.zeros((rows, k), jnp.int32)),
    )
    prompt = jax.lax.cond(
        jnp.any(prompt_targets >= 0),
        lambda: _prompt_logprobs(module, params, hidden[0], prompt_targets, k),
        lambda: (jnp.zeros((n,), jnp.float32), jnp.zeros((n, k), jnp.float32), jnp.zeros((n, k), jnp.int32)),
    )
    return StepOutput(next_tokens, logprobs, top_lp, top_ids, *prompt), pools, history


def step_functions(config: ModelConfig, dtype, choices: PlatformChoices, *, mesh=None, interpret: bool = False):
    """``{(decode_only, few): jitted step}``, ``few`` only True where ``choices`` has few-token options
    (see :meth:`PlatformChoices.few`); the KV pools and the token history (arguments 1 and 2) are donated."""
    scale = config.head_dim**-0.5
    functions = {}
    for decode_only in (False, True):
        backend = PagedAttention(config.sliding_window, scale, choices.kernels, decode_only=decode_only,
                                 interpret=interpret, mesh=mesh)
        module = Mixtral(config, backend, dtype, moe_impl=choices.moe_impl, mesh=mesh)
        for few in (False, True) if choices.few_token_options else (False,):
            options = dict(choices.few_token_options) if few else None
            functions[decode_only, few] = jax.jit(functools.partial(_step, module), donate_argnums=(1, 2),
                                                  compiler_options=options)
    return functions


def pool_shapes(config: ModelConfig, num_pages: int, page_size: int, dtype,
                kv_cache_dtype: str) -> tuple[LayerKV, ...]:
    """Per layer, a ``LayerKV`` of ``jax.ShapeDtypeStruct``: K and V pages, and int8 scales."""
    shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
    if kv_cache_dtype == "int8":
        pages, scales = jax.ShapeDtypeStruct(shape, jnp.int8), jax.ShapeDtypeStruct(shape[:3], jnp.float32)
        layer = LayerKV(pages, pages, scales, scales)
    else:
        layer = LayerKV(jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape, dtype))
    return tuple(layer for _ in range(config.num_layers))
