"""Per-device memory plan: weights, KV pool and workspace for a mesh and ``gpu_memory_utilization``.

Computed from shapes alone (no allocation), so the engine can refuse to start with one line that
says how much is missing and what would make it fit, instead of failing deep inside XLA with an
out-of-memory error after minutes of loading.

``gpu_memory_utilization`` is a fraction of the device's total memory, as in vLLM. XLA's GPU allocator
caps its pool at ``XLA_CLIENT_MEM_FRACTION`` (formerly ``XLA_PYTHON_CLIENT_MEM_FRACTION``) of the total,
0.75 when unset, so the entry points (``LLM``, the server CLI) call :func:`configure_allocator` before JAX
starts, and the engine derives its budget from whatever cap is in force (:func:`device_budget_bytes`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np

from scalellm_jax.config import ConfigError, EngineConfig, ModelConfig
from scalellm_jax.engine.logit_controls import history_bytes
from scalellm_jax.parallel import kv_head_shards, weight_shards
from scalellm_jax.weights import iter_weights

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int  # per device
    workspace_bytes: int  # per device: activations and logits of the largest step, a rough bound
    page_bytes: int  # per device, one KV page across all layers (K and V, scales if int8)
    num_pages: int
    budget_bytes: int | None  # gpu_memory_utilization × total device memory (or the allocator's cap); None on CPU

    @property
    def kv_bytes(self) -> int:
        return self.page_bytes * self.num_pages

    def describe(self) -> str:
        budget = "unknown" if self.budget_bytes is None else f"{self.budget_bytes / GIB:.2f} GiB"
        return (
            f"memory plan per device: weights {self.weights_bytes / GIB:.2f} GiB, "
            f"KV pool {self.kv_bytes / GIB:.2f} GiB ({self.num_pages} pages), "
            f"workspace {self.workspace_bytes / GIB:.2f} GiB; budget {budget}"
        )


def weights_bytes_per_device(config: ModelConfig, itemsize: int, tp: int, ep: int) -> int:
    """Bytes of parameters one device holds: every declared weight (``scalellm_jax.weights``) divided by the
    parts ``scalellm_jax.parallel`` splits it into."""
    return itemsize * sum(math.prod(weight.shape(config)) // weight_shards(weight, config, tp, ep)
                          for _, weight, _ in iter_weights(config))


def page_bytes_per_device(config: ModelConfig, page_size: int, kv_itemsize: int, tp: int) -> int:
    heads = config.num_kv_heads // kv_head_shards(config, tp)
    values = 2 * heads * page_size * config.head_dim * kv_itemsize
    scales = 2 * heads * page_size * 4 if kv_itemsize == 1 else 0
    return config.num_layers * (values + scales)


def workspace_bytes(config: ModelConfig, engine: EngineConfig, itemsize: int) -> int:
    """Activations of the largest step (a few hidden-sized buffers per token, the routed expert rows)
    plus the float32 logits and sampling buffers of every row, and the logit controls' token history."""
    tokens = engine.max_num_batched_tokens
    c = config
    activations = tokens * (6 * c.hidden_size + 3 * c.num_experts_per_tok * c.intermediate_size) * max(itemsize, 4)
    logits = 4 * engine.max_num_seqs * c.vocab_size * 4
    return int(activations + logits + history_bytes(engine.max_num_seqs, c.vocab_size))


def plan_memory(
    config: ModelConfig,
    engine: EngineConfig,
    *,
    dtype,
    tp: int = 1,
    ep: int = 1,
    budget_bytes: int | None,
    max_pages_per_seq: int,
    default_pages_per_seq: int = 64,
) -> MemoryPlan:
    """The plan within ``budget_bytes`` (from :func:`device_budget_bytes`; None: no limit known, a default pool).

    Raises ``ConfigError`` (one line: what is missing, what would fit) when it cannot fit.
    """
    itemsize = np.dtype(dtype).itemsize
    kv_itemsize = 1 if engine.kv_cache_dtype == "int8" else itemsize
    weights = weights_bytes_per_device(config, itemsize, tp, ep)
    workspace = workspace_bytes(config, engine, itemsize)
    page = page_bytes_per_device(config, engine.page_size, kv_itemsize, tp)
    min_pages = max_pages_per_seq + 1  # one full-length sequence plus the reserved null page
    if engine.num_pages is not None:
        num_pages = engine.num_pages
    elif budget_bytes is None:
        num_pages = 1 + engine.max_num_seqs * min(max_pages_per_seq, default_pages_per_seq)
    else:
        num_pages = (budget_bytes - weights - workspace) // page
    if budget_bytes is not None:
        needed = weights + workspace + page * max(num_pages, min_pages)
        if num_pages < min_pages or needed > budget_bytes:
            missing = needed - budget_bytes if needed > budget_bytes else page * (min_pages - num_pages)
            suggestion = _suggestion(config, engine, itemsize, tp, ep, budget_bytes, min_pages)
            raise ConfigError(
                f"the model does not fit: {needed / GIB:.2f} GiB per device needed "
                f"(weights {weights / GIB:.2f}, KV {page * max(num_pages, min_pages) / GIB:.2f}, "
                f"workspace {workspace / GIB:.2f}) but {budget_bytes / GIB:.2f} GiB available, "
                f"{missing / GIB:.2f} GiB missing; {suggestion}"
            )
    return MemoryPlan(weights, workspace, page, int(num_pages), budget_bytes)


def _suggestion(config: ModelConfig, engine: EngineConfig, itemsize: int, tp: int, ep: int, budget: int,
                min_pages: int) -> str:
    """The smallest larger expert / tensor parallelism that fits, and int8 KV if that alone fits."""

    def fits(tp: int, ep: int, kv_itemsize: int) -> bool:
        page = page_bytes_per_device(config, engine.page_size, kv_itemsize, tp)
        need = weights_bytes_per_device(config, itemsize, tp, ep) + workspace_bytes(config, engine, itemsize)
        return need + page * max(engine.num_pages or 0, min_pages) <= budget

    kv_itemsize = 1 if engine.kv_cache_dtype == "int8" else itemsize
    options = []
    for name, scale, divides in (
        ("expert_parallel_size", lambda n: (tp, ep * n), lambda n: config.num_experts % (ep * n) == 0),
        ("tensor_parallel_size", lambda n: (tp * n, ep),
         lambda n: config.num_heads % (tp * n) == 0 and config.intermediate_size % (tp * n) == 0),
    ):
        n = next((n for n in (2, 4, 8, 16, 32, 64) if divides(n) and fits(*scale(n), kv_itemsize)), None)
        if n is not None:
            options.append(f"{name}={(ep if name.startswith('expert') else tp) * n}")
    if engine.kv_cache_dtype != "int8" and fits(tp, ep, 1):
        options.append("kv_cache_dtype='int8'")
    options.append("a smaller max_model_len or max_num_batched_tokens, or a higher gpu_memory_utilization")
    return "try " + ", ".join(options)


# XLA's GPU allocators (BFC, cuda_async) cap their pool at this fraction of the device's total memory, preallocated
# or not (XLA_PYTHON_CLIENT_PREALLOCATE=false only grows the pool on demand up to the same cap); jaxlib (0.10, 0.11)
# reads it from XLA_CLIENT_MEM_FRACTION or its deprecated name XLA_PYTHON_CLIENT_MEM_FRACTION (both set: an error).
DEFAULT_MEM_FRACTION = 0.75
_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def allocator_fraction() -> float:
    """The fraction of total device memory XLA's GPU allocator may take under the current environment."""
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return 1.0  # plain cudaMalloc: no pool, no cap
    for name in _FRACTION_VARS:
        if os.environ.get(name):
            return float(os.environ[name])
    return DEFAULT_MEM_FRACTION


def configure_allocator(utilization: float) -> bool:
    """Let XLA's GPU allocator take ``utilization`` of total device memory; returns whether it set it.

    Call before anything touches a JAX backend: the allocator reads the variable once, when JAX starts its
    backends. After that, or when the user set a fraction, the environment is left alone and
    :func:`device_budget_bytes` warns if the cap in force is below ``utilization``.
    """
    from jax._src import xla_bridge  # no public "have backends started?"; present in jax 0.10 and 0.11

    if xla_bridge.backends_are_initialized() or any(os.environ.get(name) for name in _FRACTION_VARS):
        return False
    os.environ["XLA_CLIENT_MEM_FRACTION"] = str(utilization)
    return True


def device_budget_bytes(device, utilization: float) -> int | None:
    """``utilization`` × the device's total memory, or the allocator's cap when that is lower (None on CPU).

    The total is not reported; it is the allocator's cap divided by the fraction in force.
    """
    limit = allocator_limit_bytes(device)
    if limit is None:
        return None
    fraction = allocator_fraction()
    total = limit / fraction
    if fraction < utilization:
        name = next((name for name in _FRACTION_VARS if os.environ.get(name)), "XLA_CLIENT_MEM_FRACTION")
        logger.warning(
            "XLA's allocator may use only %.2f GiB (%g of %.2f GiB), less than gpu_memory_utilization=%g, so the "
            "memory plan is capped there; JAX reads the fraction when it starts: set %s=%g in the environment "
            "before importing jax", limit / GIB, fraction, total / GIB, utilization, name, utilization,
        )
    return min(int(utilization * total), limit)


def allocator_limit_bytes(device) -> int | None:
    """The most XLA's allocator will hand out on ``device`` (None on CPU, where XLA reports no limit)."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit) if limit and not math.isinf(limit) else None
