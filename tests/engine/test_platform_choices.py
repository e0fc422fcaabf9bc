"""The platform's compile choices: GPU kernels for a GPU, and on CPU the dot library by the host's
extensions and the model's dtype (XLA's Eigen dots for few-token float32 steps on AVX2-only x86,
YNNPACK, XLA's default, everywhere else)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from scalellm_jax.cpu_features import host_cpu
from scalellm_jax.engine.step_program import CPU_FEW_TOKEN_OPTIONS, PlatformChoices

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


def test_a_gpu_gets_pallas_and_ragged_experts_and_no_cpu_options():
    choices = PlatformChoices.for_platform("gpu", dtype=jnp.float32, cpu_flags=AVX2)
    assert (choices.kernels, choices.moe_impl, choices.few_token_options) == ("pallas", "ragged", ())
    assert not choices.few(1)


def test_float32_on_an_avx2_cpu_runs_few_token_steps_on_eigen_and_large_steps_on_ynnpack():
    choices = PlatformChoices.for_platform("cpu", dtype=jnp.float32, cpu_flags=AVX2)
    assert (choices.kernels, choices.moe_impl) == ("xla", "chunked")
    assert choices.few_token_options == CPU_FEW_TOKEN_OPTIONS
    assert choices.few(1) and choices.few(choices.few_tokens) and not choices.few(choices.few_tokens + 1)


@pytest.mark.parametrize("flags", [AVX512, frozenset(), frozenset({"fp", "asimd", "sve"})],
                         ids=["avx512", "unknown", "arm"])
def test_float32_elsewhere_keeps_xla_defaults(flags):
    choices = PlatformChoices.for_platform("cpu", dtype=jnp.float32, cpu_flags=flags)
    assert (choices.kernels, choices.moe_impl) == ("xla", "chunked")
    assert choices.few_token_options == () and not choices.few(1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, None])
def test_bfloat16_models_and_unknown_dtypes_keep_one_program_per_step(dtype):
    choices = PlatformChoices.for_platform("cpu", dtype=dtype, cpu_flags=AVX2)
    assert choices.few_token_options == () and not choices.few(1)


def test_by_default_the_choice_follows_this_host():
    flags = host_cpu()[1]
    expected = CPU_FEW_TOKEN_OPTIONS if "avx2" in flags and "avx512f" not in flags else ()
    assert PlatformChoices.for_platform("cpu", dtype=jnp.float32).few_token_options == expected
