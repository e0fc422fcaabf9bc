"""The platform's compile choices: GPU kernels for a GPU, and on CPU the dot library by model dtype
(XLA's Eigen dots for few-token float32 steps, YNNPACK for the rest)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from scalellm_jax.cpu_features import cpu_model_and_flags, vector_extensions
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


def test_the_host_description_lists_only_vector_extensions_it_has():
    model, flags = cpu_model_and_flags()
    assert set(vector_extensions(flags)) <= flags
    assert all(f.startswith(("avx", "amx")) or f in ("fma", "f16c") for f in vector_extensions(flags))
    assert vector_extensions({"avx2", "fma", "sse4_2", "avx512_bf16", "amx_tile"}) == [
        "amx_tile", "avx2", "avx512_bf16", "fma"]
