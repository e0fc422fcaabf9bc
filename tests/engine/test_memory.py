"""The startup memory plan: per-device bytes from shapes, and a one-line refusal when it cannot fit."""

import jax
import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import ConfigError, EngineConfig, ModelConfig, preset
from scalellm_jax.engine.memory import GIB, page_bytes_per_device, plan_memory, weights_bytes_per_device

MIXTRAL = preset("mixtral-8x7b")


def test_weight_bytes_match_the_real_parameter_tree():
    config = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4, num_experts=4, num_experts_per_tok=2)
    model = scalellm_jax.Model.random(config, dtype="float32")
    actual = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(model.params))
    assert weights_bytes_per_device(config, 4, tp=1, ep=1) == actual


def test_mixtral_8x7b_bf16_is_about_87_gib_and_splits_over_the_mesh():
    full = weights_bytes_per_device(MIXTRAL, 2, tp=1, ep=1)
    assert 86 * GIB < full < 88 * GIB  # 46.7B parameters in bfloat16
    assert weights_bytes_per_device(MIXTRAL, 2, tp=2, ep=4) < full / 7
    # one 16-token page of K and V for 32 layers, 8 kv heads of 128, bf16
    assert page_bytes_per_device(MIXTRAL, 16, 2, tp=1) == 32 * 2 * 8 * 16 * 128 * 2
    assert page_bytes_per_device(MIXTRAL, 16, 1, tp=1) == 32 * (2 * 8 * 16 * 128 + 2 * 8 * 16 * 4)


def test_fits_on_an_h200_and_sizes_the_pool_from_what_is_left():
    plan = plan_memory(MIXTRAL, EngineConfig(max_model_len=32768), dtype=np.dtype("bfloat16"),
                       device_bytes=141 * 10**9, max_pages_per_seq=2048)
    assert plan.weights_bytes + plan.kv_bytes + plan.workspace_bytes <= plan.budget_bytes
    assert plan.num_pages > 2048
    assert "memory plan per device" in plan.describe()


def test_refuses_with_one_line_saying_what_is_missing_and_what_would_fit():
    with pytest.raises(ConfigError) as info:
        plan_memory(MIXTRAL, EngineConfig(), dtype=np.dtype("bfloat16"), device_bytes=80 * GIB,
                    max_pages_per_seq=2048)
    message = str(info.value)
    assert "\n" not in message
    assert "does not fit" in message and "GiB missing" in message
    assert "expert_parallel_size=2" in message and "tensor_parallel_size=2" in message


def test_cpu_without_a_memory_limit_uses_the_default_pool():
    plan = plan_memory(MIXTRAL, EngineConfig(max_num_seqs=4), dtype=np.dtype("float32"), device_bytes=None,
                       max_pages_per_seq=100)
    assert plan.budget_bytes is None and plan.num_pages == 1 + 4 * 64
