"""Per-device memory plan: weights, KV pool and workspace for a mesh and ``gpu_memory_utilization``.

Computed from shapes alone (no allocation), so the engine can refuse to start with one line that
says how much is missing and what would make it fit, instead of failing deep inside XLA with an
out-of-memory error after minutes of loading.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from scalellm_jax.config import ConfigError, EngineConfig, ModelConfig
from scalellm_jax.parallel import kv_head_shards

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int  # per device
    workspace_bytes: int  # per device: activations and logits of the largest step, a rough bound
    page_bytes: int  # per device, one KV page across all layers (K and V, scales if int8)
    num_pages: int
    budget_bytes: int | None  # gpu_memory_utilization × device memory; None when unknown (CPU)

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
    """Bytes of parameters one device holds under the sharding rules of ``scalellm_jax.parallel``."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads / tp + 2 * c.num_kv_heads / kv_head_shards(c, tp))
    experts = 3 * c.num_experts * c.hidden_size * c.intermediate_size / (tp * ep)
    per_layer = attn + experts + c.hidden_size * c.num_experts + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size / tp
    return int(itemsize * (c.num_layers * per_layer + embed + head + c.hidden_size))


def page_bytes_per_device(config: ModelConfig, page_size: int, kv_itemsize: int, tp: int) -> int:
    heads = config.num_kv_heads // kv_head_shards(config, tp)
    values = 2 * heads * page_size * config.head_dim * kv_itemsize
    scales = 2 * heads * page_size * 4 if kv_itemsize == 1 else 0
    return config.num_layers * (values + scales)


def workspace_bytes(config: ModelConfig, engine: EngineConfig, itemsize: int) -> int:
    """Activations of the largest step (a few hidden-sized buffers per token, the routed expert rows)
    plus the float32 logits and sampling buffers of every row."""
    tokens = engine.max_num_batched_tokens
    c = config
    activations = tokens * (6 * c.hidden_size + 3 * c.num_experts_per_tok * c.intermediate_size) * max(itemsize, 4)
    logits = 4 * engine.max_num_seqs * c.vocab_size * 4
    return int(activations + logits)


def plan_memory(
    config: ModelConfig,
    engine: EngineConfig,
    *,
    dtype,
    tp: int = 1,
    ep: int = 1,
    device_bytes: int | None,
    max_pages_per_seq: int,
    default_pages_per_seq: int = 64,
) -> MemoryPlan:
    """The plan; raises ``ConfigError`` (one line: what is missing, what would fit) when it cannot fit."""
    itemsize = np.dtype(dtype).itemsize
    kv_itemsize = 1 if engine.kv_cache_dtype == "int8" else itemsize
    weights = weights_bytes_per_device(config, itemsize, tp, ep)
    workspace = workspace_bytes(config, engine, itemsize)
    page = page_bytes_per_device(config, engine.page_size, kv_itemsize, tp)
    budget = None if device_bytes is None else int(device_bytes * engine.gpu_memory_utilization)
    min_pages = max_pages_per_seq + 1  # one full-length sequence plus the reserved null page
    if engine.num_pages is not None:
        num_pages = engine.num_pages
    elif budget is None:
        num_pages = 1 + engine.max_num_seqs * min(max_pages_per_seq, default_pages_per_seq)
    else:
        num_pages = (budget - weights - workspace) // page
    if budget is not None:
        needed = weights + workspace + page * max(num_pages, min_pages)
        if num_pages < min_pages or needed > budget:
            missing = needed - budget if needed > budget else page * (min_pages - num_pages)
            raise ConfigError(
                f"the model does not fit: {needed / GIB:.2f} GiB per device needed "
                f"(weights {weights / GIB:.2f}, KV {page * max(num_pages, min_pages) / GIB:.2f}, "
                f"workspace {workspace / GIB:.2f}) but {budget / GIB:.2f} GiB available, "
                f"{missing / GIB:.2f} GiB missing; {_suggestion(config, tp, ep, engine)}"
            )
    return MemoryPlan(weights, workspace, page, int(num_pages), budget)


def _suggestion(config: ModelConfig, tp: int, ep: int, engine: EngineConfig) -> str:
    options = []
    if config.num_experts % (ep * 2) == 0:
        options.append(f"expert_parallel_size={ep * 2}")
    if config.num_heads % (tp * 2) == 0 and config.intermediate_size % (tp * 2) == 0:
        options.append(f"tensor_parallel_size={tp * 2}")
    if engine.kv_cache_dtype != "int8":
        options.append("kv_cache_dtype='int8'")
    options.append("a smaller max_model_len or max_num_batched_tokens, or a higher gpu_memory_utilization")
    return "try " + ", ".join(options)


def device_memory_bytes(device) -> int | None:
    """Total memory of an accelerator (None on CPU, where XLA reports no limit)."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit) if limit and not math.isinf(limit) else None
