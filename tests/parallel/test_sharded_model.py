"""Tensor/expert-parallel model on 8 fake CPU devices equals the single-device model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalellm_jax.config import ConfigError, preset
from scalellm_jax.parallel import ParallelConfig

SCRIPT = Path(__file__).with_name("sharded_check.py")
ROOT = Path(__file__).resolve().parents[2]


def run_on_8_devices(folder, ep, tp) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder), str(ep), str(tp)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
# Pure tensor parallel with KV heads that do not divide over it (replicated pools), pure expert
# parallel, and a mixed mesh whose KV pools shard over the tensor axis: every layout path, three
# subprocesses (about 30 s each) rather than four.
@pytest.mark.parametrize("ep, tp, kv_heads", [(1, 8, 2), (8, 1, 8), (4, 2, 8)])
def test_sharded_logits_and_generate_equal_single_device(make_hf_mixtral, ep, tp, kv_heads):
    folder, _ = make_hf_mixtral(
        num_attention_heads=8, num_key_value_heads=kv_heads, num_local_experts=8, intermediate_size=64,
        sliding_window=6,
    )
    result = run_on_8_devices(folder, ep, tp)
    assert result["devices"] == 8
    assert result["max_rel_err"] < 1e-5
    assert result["generate_equal"]
    assert result["engine_equal"]
    assert result["engine_mesh_shape"] == {"expert": ep, "tensor": tp}
    assert result["prefix_equal"] and result["prefix_hits"] >= 3 * 8  # the shared 11 tokens' 2 full pages, 3 times
    assert result["wq_shard_shape"] == [32, 8 // tp, 4]  # heads split over the tensor axis
    assert result["w_gate_shard_shape"] == [8 // ep, 32, 64 // tp]  # experts over expert, I over tensor
    # KV pools: split over the tensor axis by KV head when the heads divide, else replicated.
    kv_shards = tp if kv_heads % tp == 0 else 1
    assert result["kv_pool_shape"][0] == kv_heads
    assert result["kv_pool_shard_shape"][0] == kv_heads // kv_shards
    # int8 KV: pages and their scales split alike, and the same greedy tokens as on one device
    assert result["int8_engine_equal"]
    heads = kv_heads // kv_shards
    assert result["int8_shard_shapes"] == [[heads, 64, 4, 4]] * 2 + [[heads, 64, 4]] * 2


@pytest.mark.slow
def test_a_vocabulary_that_does_not_divide_the_tensor_axis_is_padded(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("awkward_shapes_check.py")), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["logits_shape"] == [3, 9, 300]  # the padded columns never come out
    assert all(err < 1e-5 for err in result["max_rel_err"].values()), result["max_rel_err"]
    assert result["lm_head_shape"] == [32, 304] and result["lm_head_shard_shape"] == [32, 38]
    assert result["padding_is_zero"]
    assert result["engine_equal"]


def test_impossible_splits_name_the_option():
    config = preset("tiny")  # 4 heads, 2 kv heads, 4 experts
    with pytest.raises(ConfigError, match="expert_parallel_size 8"):
        ParallelConfig(expert_parallel_size=8).check(config)
    with pytest.raises(ConfigError, match="tensor_parallel_size 8"):
        ParallelConfig(tensor_parallel_size=8).check(config)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        ParallelConfig(tensor_parallel_size=0)
    # one line: the option, the dimension and its size, the mesh axis, and what would work
    wide = config.replace(num_heads=12, num_kv_heads=4, intermediate_size=96, head_dim=8)
    with pytest.raises(ConfigError) as refused:
        ParallelConfig(tensor_parallel_size=3).check(wide)
    assert str(refused.value) == ("tensor_parallel_size 3 must divide num_kv_heads (4) or be a multiple of it "
                                  "(split over the tensor axis); tensor_parallel_size that work: 1, 2, 4, 12")
    with pytest.raises(ConfigError, match=r"expert_parallel_size 3 must divide num_experts \(4\) \(split over the "
                                          r"expert axis\); expert_parallel_size that work: 1, 2, 4"):
        ParallelConfig(expert_parallel_size=3).check(config)
