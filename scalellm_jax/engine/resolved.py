"""The engine's options settled once, against the model and the device, before any weight loads.

``resolve`` runs every check that needs more than one option (the engine's against the model's config and the
mesh, the memory plan against the device's budget) and derives what the runner, the KV manager and the scheduler
are built from. ``LLM`` (and the server through it) calls it before loading, so a bad flag or a model that does not
fit fails in seconds, not after the weights load; the result is then passed whole to ``LLMEngine``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from scalellm_jax.config import EngineConfig, ModelConfig
from scalellm_jax.engine.kv_swap import page_bytes
from scalellm_jax.engine.memory import MemoryPlan, device_budget_bytes, plan_memory
from scalellm_jax.engine.step_program import pool_shapes
from scalellm_jax.loader import check_options_against_model
from scalellm_jax.parallel import ParallelConfig


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    engine: EngineConfig
    model: ModelConfig
    dtype: np.dtype  # of the weights and activations
    tp: int  # tensor- and expert-parallel sizes of the mesh the model runs on
    ep: int
    max_model_len: int  # prompt plus output tokens of one request
    max_pages_per_seq: int
    memory: MemoryPlan  # per-device weights, KV pool and workspace; its num_pages is the pool's size
    swap_page_bytes: int  # host bytes of one swapped page (all layers) under swap_compression

    @property
    def num_pages(self) -> int:
        return self.memory.num_pages

    @property
    def swap_compression(self) -> str | None:
        """None: no host swap (preempted requests recompute); else how swapped pages are stored."""
        return self.engine.swap_compression if self.engine.swap_space_gb > 0 else None

    @property
    def num_host_pages(self) -> int:
        return int(self.engine.swap_space_gb * 2**30) // self.swap_page_bytes

    @property
    def exact_swap(self) -> bool:
        """Swapped pages come back bit for bit (int8 swap rounds them, so they are never shared as a cached prefix)."""
        return self.engine.swap_compression != "int8"


def resolve(engine: EngineConfig, model: ModelConfig, *, dtype, tp: int = 1, ep: int = 1,
            budget_bytes: int | None | str = "device", swap_page_bytes: int | None = None) -> ResolvedConfig:
    """Check ``engine`` against ``model`` on a (``ep``, ``tp``) mesh and plan the device's memory.

    ``budget_bytes``: "device" (``gpu_memory_utilization`` of the first local device; None on CPU), or the
    budget itself (a simulated device's). ``swap_page_bytes``: a simulated device's own figure; by default the
    real pools' (``kv_swap.page_bytes``). Raises ``ConfigError`` naming the option.
    """
    check_options_against_model(model, engine, ParallelConfig(tensor_parallel_size=tp, expert_parallel_size=ep))
    dtype = np.dtype(dtype)
    max_model_len = engine.max_model_len or model.max_position_embeddings
    max_pages_per_seq = -(-max_model_len // engine.page_size)
    if budget_bytes == "device":
        budget_bytes = device_budget_bytes(jax.local_devices()[0], engine.gpu_memory_utilization)
    memory = plan_memory(model, engine, dtype=dtype, tp=tp, ep=ep, budget_bytes=budget_bytes,
                         max_pages_per_seq=max_pages_per_seq)
    if swap_page_bytes is None:
        one_page = pool_shapes(model, 1, engine.page_size, dtype, engine.kv_cache_dtype)
        swap_page_bytes = page_bytes(one_page, engine.swap_compression == "int8")
    return ResolvedConfig(engine, model, dtype, tp, ep, max_model_len, max_pages_per_seq, memory, swap_page_bytes)
