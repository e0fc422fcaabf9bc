"""The platform's compile choices: GPU kernels for a GPU, and on CPU the dot library by model dtype
(XLA's Eigen dots for few-token float32 steps, YNNPACK for the rest)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from scalellm_jax.engine.step_program import CPU_FEW_TOKEN_OPTIONS, PlatformChoices


def test_a_gpu_gets_pallas_and_ragged_experts_and_no_cpu_options():
    choices = PlatformChoices.for_platform("gpu", dtype=jnp.float32)
    assert (choices.kernels, choices.moe_impl, choices.few_token_options) == ("pallas", "ragged", ())
    assert not choices.few(1)


def test_float32_on_cpu_runs_few_token_steps_on_eigen_and_large_steps_on_ynnpack():
    choices = PlatformChoices.for_platform("cpu", dtype=jnp.float32)
    assert (choices.kernels, choices.moe_impl) == ("xla", "chunked")
    assert choices.few_token_options == CPU_FEW_TOKEN_OPTIONS
    assert choices.few(1) and choices.few(choices.few_tokens) and not choices.few(choices.few_tokens + 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, None])
def test_bfloat16_models_and_unknown_dtypes_keep_one_program_per_step(dtype):
    choices = PlatformChoices.for_platform("cpu", dtype=dtype)
    assert choices.few_token_options == () and not choices.few(1)

