"""The platform's compile choices: GPU kernels for a GPU whatever the host, and on CPU the dot library
by model dtype and the host's vector extensions (Eigen for few-token float32 steps only without AVX-512)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from scalellm_jax.cpu_features import cpu_model_and_flags, vector_extensions
from scalellm_jax.engine.step_program import CPU_FEW_TOKEN_OPTIONS, PlatformChoices

AVX2 = frozenset({"fma", "avx", "avx2", "sse4_2"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}


def test_a_gpu_gets_pallas_and_ragged_experts_and_no_cpu_options_whatever_the_host():
    choices = PlatformChoices.for_platform("gpu", dtype=jnp.float32, cpu_flags=AVX2)
    assert (choices.kernels, choices.moe_impl, choices.few_token_options) == ("pallas", "ragged", ())
    assert not choices.few(1)


def test_float32_on_an_avx2_host_runs_few_token_steps_on_eigen_and_large_steps_on_ynnpack():
    choices = PlatformChoices.for_platform("cpu", dtype=jnp.float32, cpu_flags=AVX2)
    assert (choices.kernels, choices.moe_impl) == ("xla", "chunked")
    assert choices.few_token_options == CPU_FEW_TOKEN_OPTIONS
    assert choices.few(1) and choices.few(choices.few_tokens) and not choices.few(choices.few_tokens + 1)


@pytest.mark.parametrize(("dtype", "flags"), [(jnp.float32, AVX512), (jnp.bfloat16, AVX2), (jnp.bfloat16, AVX512),
                                              (None, AVX2)])
def test_avx512_hosts_bfloat16_models_and_unknown_dtypes_keep_one_program_per_step(dtype, flags):
    choices = PlatformChoices.for_platform("cpu", dtype=dtype, cpu_flags=flags)
    assert choices.few_token_options == () and not choices.few(1)


def test_the_host_flags_are_read_from_cpuinfo_and_default_the_choice():
    model, flags = cpu_model_and_flags()
    expected = () if "avx512f" in flags else CPU_FEW_TOKEN_OPTIONS  # unreadable flags: as without AVX-512
    assert PlatformChoices.for_platform("cpu", dtype=jnp.float32).few_token_options == expected
    assert set(vector_extensions(flags)) <= flags
    assert all(f.startswith(("avx", "amx")) or f in ("fma", "f16c") for f in vector_extensions(flags))
