"""The runner's KV pools: a LayerKV per layer (scales only for int8 KV), donated whole to every step and
swap-in so that XLA updates them in place, and measured the way the memory plan counts a page."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import EngineConfig, ModelConfig
from scalellm_jax.engine.memory import page_bytes_per_device
from scalellm_jax.engine.resolved import resolve
from scalellm_jax.engine.runner import ModelRunner
from scalellm_jax.engine.scheduler import SwapOp
from scalellm_jax.engine.step_program import PlatformChoices
from scalellm_jax.model.kv_pool import LayerKV

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
)
PAGE, PAGES = 4, 12


@pytest.fixture(scope="module")
def model():
    return scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")


def runner(model, kv_cache_dtype, swap_compression):
    engine = EngineConfig(page_size=PAGE, num_pages=PAGES, max_model_len=4 * PAGE, max_num_seqs=2,
                          max_num_batched_tokens=16, decode_buckets=(2,), token_buckets=(16,),
                          kv_cache_dtype=kv_cache_dtype, swap_space_gb=0.0 if swap_compression is None else 1.0,
                          swap_compression=swap_compression or "none")
    resolved = resolve(engine, CONFIG, dtype=model.dtype, budget_bytes=None)
    assert resolved.max_pages_per_seq == 4
    return ModelRunner(model, resolved, choices=PlatformChoices.for_platform("cpu"))


@pytest.mark.parametrize("kv_cache_dtype, swap_compression", [("auto", "none"), ("auto", "int8"), ("int8", "none")])
def test_pools_are_one_layer_kv_per_layer_donated_to_steps_and_swap_ins(model, kv_cache_dtype, swap_compression):
    r = runner(model, kv_cache_dtype, swap_compression)
    quantized = kv_cache_dtype == "int8"
    assert len(r.pools) == CONFIG.num_layers
    for layer in r.pools:
        assert isinstance(layer, LayerKV) and layer.quantized == quantized
        assert layer.k_pages.shape == layer.v_pages.shape == (CONFIG.num_kv_heads, PAGES, PAGE, CONFIG.head_dim)
        assert layer.k_pages.dtype == (np.int8 if quantized else np.float32)
        if quantized:
            assert layer.k_scales.shape == layer.v_scales.shape == (CONFIG.num_kv_heads, PAGES, PAGE)
    structure = jax.tree.structure(r.pools)
    assert len(jax.tree.leaves(r.pools)) == CONFIG.num_layers * (4 if quantized else 2)

    for decode_only, num_tokens, rows in r.shapes.warmup():
        before = jax.tree.leaves(r.pools)
        jax.block_until_ready(r.execute(r._empty(decode_only, num_tokens, rows)))
        assert all(a.is_deleted() for a in before)  # every pool array (scales too) updated in place
        assert jax.tree.structure(r.pools) == structure

    r.swap([SwapOp("a", (3, 5), 8)], [])
    r.finish_swaps()
    before = jax.tree.leaves(r.pools)
    r.swap([], [SwapOp("a", (7, 2), 8)])
    jax.block_until_ready(r.pools)
    assert all(a.is_deleted() for a in before) and jax.tree.structure(r.pools) == structure


@pytest.mark.parametrize("kv_cache_dtype, compression, kv_itemsize", [
    ("auto", "none", 4), ("auto", "int8", 1), ("int8", "none", 1), ("int8", "int8", 1)])
def test_swap_page_bytes_agree_with_the_memory_plan(model, kv_cache_dtype, compression, kv_itemsize):
    r = runner(model, kv_cache_dtype, None)
    assert r.swap_page_bytes(compression) == page_bytes_per_device(CONFIG, PAGE, kv_itemsize, tp=1)
