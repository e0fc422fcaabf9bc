"""The native MoE probe (``benchmarks.native_moe``) computes what the engine's experts compute."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalellm_jax.model.moe import grouped_experts, route

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the native MoE probe needs g++")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tokens, hidden, inter, experts, top_k", [
    (1, 32, 48, 4, 2), (7, 40, 24, 6, 3), (64, 64, 100, 8, 2), (130, 96, 130, 8, 2),
])
def test_native_experts_match_ragged_dot(dtype, tokens, hidden, inter, experts, top_k):
    from benchmarks.native_moe import native_moe

    keys = jax.random.split(jax.random.key(np.random.randint(2**31)), 5)
    x = jax.random.normal(keys[0], (tokens, hidden)).astype(dtype)
    router = jax.random.normal(keys[1], (hidden, experts)).astype(dtype)
    w_gate, w_up = (0.2 * jax.random.normal(k, (experts, hidden, inter)).astype(dtype) for k in keys[2:4])
    w_down = 0.2 * jax.random.normal(keys[4], (experts, inter, hidden)).astype(dtype)
    weights, ids = route(x, router, top_k)
    foreign = np.random.default_rng().random(ids.shape) < 0.2  # another shard's experts: no contribution
    ids = jnp.where(foreign, experts, ids)
    got = jax.jit(native_moe)(x, weights, ids, w_gate, w_up, w_down)
    want = grouped_experts(x, jnp.where(foreign, 0.0, weights), jnp.minimum(ids, experts - 1), w_gate, w_up, w_down)
    assert got.dtype == x.dtype and got.shape == x.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tolerance = 1e-5 if dtype == "float32" else 3e-2
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_loading_the_kernel_leaves_subnormal_floats_alone():
    """The library must not set flush-to-zero for the process (as g++'s -ffast-math link would)."""
    from benchmarks.native_moe import register

    register()
    tiny = np.float32(1e-40)  # subnormal in float32
    assert tiny > 0 and tiny * np.float32(1.5) > 0
