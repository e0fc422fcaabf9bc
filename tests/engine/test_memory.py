"""The startup memory plan: per-device bytes from shapes, and a one-line refusal when it cannot fit; the budget
as a fraction of total device memory whatever XLA's allocator was told."""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax._src import xla_bridge

import scalellm_jax
from scalellm_jax.config import ConfigError, EngineConfig, ModelConfig, preset
from scalellm_jax.engine import llm as llm_module
from scalellm_jax.engine.memory import (
    GIB,
    allocator_fraction,
    configure_allocator,
    device_budget_bytes,
    page_bytes_per_device,
    plan_memory,
    weights_bytes_per_device,
)

MIXTRAL = preset("mixtral-8x7b")
MIXTRAL_8X22B = preset("mixtral-8x22b")
H200_BYTES = 151_397_597_184  # device_memory_size in shared/gpu/h200.txtpb (141 GiB)
FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


class FakeGPU:
    """A device whose allocator was capped at ``fraction`` of an H200, as XLA's BFC allocator reports it."""

    def __init__(self, fraction: float, total: int = H200_BYTES):
        self.limit = int(total * fraction)

    def memory_stats(self):
        return {"bytes_limit": self.limit, "bytes_in_use": 0}


class FakeCPU:
    def memory_stats(self):
        return None


@pytest.fixture
def clean_env(monkeypatch):
    """No allocator variables set, JAX backends not started; whatever a test sets is undone after it."""
    for name in (*FRACTION_VARS, "XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    return monkeypatch


def h200_plan(config, utilization=0.9, *, tp=1, ep=1, fraction=None):
    """The plan on an H200 whose allocator is capped at ``fraction`` (default: what the environment says)."""
    engine = EngineConfig(gpu_memory_utilization=utilization)
    budget = device_budget_bytes(FakeGPU(allocator_fraction() if fraction is None else fraction), utilization)
    return plan_memory(config, engine, dtype=np.dtype("bfloat16"), tp=tp, ep=ep, budget_bytes=budget,
                       max_pages_per_seq=-(-config.max_position_embeddings // engine.page_size))


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
                       budget_bytes=int(0.9 * 141 * 10**9), max_pages_per_seq=2048)
    assert plan.weights_bytes + plan.kv_bytes + plan.workspace_bytes <= plan.budget_bytes
    assert plan.num_pages > 2048
    assert "memory plan per device" in plan.describe()


def test_refuses_with_one_line_saying_what_is_missing_and_what_would_fit():
    with pytest.raises(ConfigError) as info:
        plan_memory(MIXTRAL, EngineConfig(), dtype=np.dtype("bfloat16"), budget_bytes=72 * GIB,
                    max_pages_per_seq=2048)
    message = str(info.value)
    assert "\n" not in message
    assert "does not fit" in message and "GiB missing" in message
    assert "expert_parallel_size=2" in message and "tensor_parallel_size=2" in message


def test_cpu_without_a_memory_limit_uses_the_default_pool():
    plan = plan_memory(MIXTRAL, EngineConfig(max_num_seqs=4), dtype=np.dtype("float32"), budget_bytes=None,
                       max_pages_per_seq=100)
    assert plan.budget_bytes is None and plan.num_pages == 1 + 4 * 64


def test_mixtral_8x7b_on_one_h200_gets_tens_of_gib_of_kv_once_the_allocator_is_configured(clean_env):
    assert configure_allocator(0.9) and os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.9"
    plan = h200_plan(MIXTRAL)
    assert plan.budget_bytes == pytest.approx(0.9 * H200_BYTES, abs=1)
    assert plan.kv_bytes >= 30 * GIB  # ~40; the allocator's default cap × 0.9 left ~8
    assert plan.weights_bytes + plan.kv_bytes + plan.workspace_bytes <= plan.budget_bytes


@pytest.mark.parametrize(("tp", "ep", "min_kv_gib"), [(2, 1, 80), (1, 2, 80), (1, 8, 110), (2, 4, 110)])
def test_mixtral_8x7b_on_h200_meshes(clean_env, tp, ep, min_kv_gib):
    plan = h200_plan(MIXTRAL, tp=tp, ep=ep, fraction=0.9)
    assert plan.weights_bytes < 45 * GIB
    assert min_kv_gib * GIB <= plan.kv_bytes <= plan.budget_bytes - plan.weights_bytes - plan.workspace_bytes


@pytest.mark.parametrize(("tp", "ep", "suggested", "not_suggested"), [
    (1, 1, "expert_parallel_size=4", "expert_parallel_size=2"),  # the smallest that fits, not the next doubling
    (2, 1, "tensor_parallel_size=4", "kv_cache_dtype"),  # int8 KV alone would not make it fit
    (1, 2, "tensor_parallel_size=2", "expert_parallel_size=8"),  # ep 2 x tp 2 (4 devices) fits
])
def test_mixtral_8x22b_does_not_fit_on_one_or_two_h200s(clean_env, tp, ep, suggested, not_suggested):
    with pytest.raises(ConfigError) as info:
        h200_plan(MIXTRAL_8X22B, tp=tp, ep=ep, fraction=0.9)
    message = str(info.value)
    assert "\n" not in message and "does not fit" in message and suggested in message
    assert not_suggested not in message


@pytest.mark.parametrize(("tp", "ep", "min_kv_gib"), [(4, 1, 60), (1, 4, 50), (8, 1, 90), (1, 8, 85), (2, 4, 85)])
def test_mixtral_8x22b_fits_on_four_or_eight_h200s(clean_env, tp, ep, min_kv_gib):
    plan = h200_plan(MIXTRAL_8X22B, tp=tp, ep=ep, fraction=0.9)
    assert min_kv_gib * GIB <= plan.kv_bytes <= plan.budget_bytes - plan.weights_bytes - plan.workspace_bytes


def test_budget_is_a_fraction_of_total_memory_not_of_the_allocators_cap(clean_env):
    # The default cap (0.75) is in force: a backend started before configure_allocator could run.
    assert allocator_fraction() == 0.75
    assert device_budget_bytes(FakeGPU(0.75), 0.5) == pytest.approx(0.5 * H200_BYTES, abs=1)
    clean_env.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert device_budget_bytes(FakeGPU(0.9), 0.9) == FakeGPU(0.9).limit
    assert device_budget_bytes(FakeGPU(0.9), 0.6) == pytest.approx(0.6 * H200_BYTES, abs=1)
    assert device_budget_bytes(FakeCPU(), 0.9) is None  # CPU: no limit, the engine's default pool


def test_a_lower_cap_in_force_caps_the_budget_with_a_warning_naming_the_fix(clean_env, caplog):
    with caplog.at_level(logging.WARNING, logger="scalellm_jax.engine.memory"):
        budget = device_budget_bytes(FakeGPU(0.75), 0.9)
    assert budget == FakeGPU(0.75).limit  # all the allocator gives, not 0.75 × 0.9 of the device
    assert "XLA_CLIENT_MEM_FRACTION=0.9" in caplog.text
    kv = h200_plan(MIXTRAL, fraction=0.75).kv_bytes
    assert 15 * GIB < kv < 30 * GIB


@pytest.mark.parametrize(("env", "fraction"), [
    ({}, 0.75),
    ({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, 0.75),  # grows on demand, up to the same cap
    ({"XLA_CLIENT_MEM_FRACTION": "0.8"}, 0.8),
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}, 0.95),  # the deprecated name, still read
    ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, 1.0),  # no pool, no cap
])
def test_allocator_fraction_in_force(clean_env, env, fraction):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert allocator_fraction() == fraction


def test_configure_allocator_leaves_a_started_backend_and_a_users_choice_alone(clean_env, caplog):
    clean_env.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    assert not configure_allocator(0.9)
    assert not any(name in os.environ for name in FRACTION_VARS)
    with caplog.at_level(logging.WARNING, logger="scalellm_jax.engine.memory"):
        device_budget_bytes(FakeGPU(0.75), 0.9)  # the engine then warns that the cap in force is lower
    assert "before importing jax" in caplog.text

    clean_env.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    clean_env.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # setting the newer name too would make jaxlib raise
    assert not configure_allocator(0.9)
    assert "XLA_CLIENT_MEM_FRACTION" not in os.environ and os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


def test_llm_configures_the_allocator_before_building_the_model(clean_env):
    class Stop(Exception):
        pass

    seen = []

    def random(*args, **kwargs):
        seen.append(os.environ.get("XLA_CLIENT_MEM_FRACTION"))
        raise Stop

    clean_env.setattr(llm_module.Model, "random", staticmethod(random))
    with pytest.raises(Stop):
        llm_module.LLM("tiny", gpu_memory_utilization=0.8)
    assert seen == ["0.8"]


def test_server_cli_configures_the_allocator_before_jax_starts():
    script = """
import os
from jax._src import xla_bridge
from scalellm_jax.server import __main__ as cli

async def serve(args, config, options):  # instead of loading: report what the loading thread would start under
    print(os.environ.get("XLA_CLIENT_MEM_FRACTION"), xla_bridge.backends_are_initialized())
    return 0

cli.serve = serve
raise SystemExit(cli.main(["--gpu-memory-utilization", "0.8", "--log-level", "ERROR"]))
"""
    env = {k: v for k, v in os.environ.items() if k not in FRACTION_VARS} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.8", "False"]
