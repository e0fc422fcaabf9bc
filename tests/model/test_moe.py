import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalellm_jax.model import dense_moe_reference, grouped_experts, route
from scalellm_jax.model.moe import grouped_experts_chunked


def random_moe(num_tokens, hidden, inter, experts, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(np.random.randint(2**31)), 5)
    x = jax.random.normal(keys[0], (num_tokens, hidden), dtype)
    router = jax.random.normal(keys[1], (hidden, experts), dtype)
    w_gate = 0.2 * jax.random.normal(keys[2], (experts, hidden, inter), dtype)
    w_up = 0.2 * jax.random.normal(keys[3], (experts, hidden, inter), dtype)
    w_down = 0.2 * jax.random.normal(keys[4], (experts, inter, hidden), dtype)
    return x, router, w_gate, w_up, w_down


@pytest.mark.parametrize("num_tokens, experts, top_k", [(1, 4, 2), (17, 8, 2), (9, 6, 1), (5, 3, 3)])
def test_grouped_experts_equal_dense_reference(num_tokens, experts, top_k):
    x, router, w_gate, w_up, w_down = random_moe(num_tokens, 16, 24, experts)
    weights, ids = route(x, router, top_k)
    got = grouped_experts(x, weights, ids, w_gate, w_up, w_down)
    expected = dense_moe_reference(x, router, w_gate, w_up, w_down, top_k)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_routing_is_softmax_topk_renormalised():
    x, router, *_ = random_moe(7, 16, 8, 8)
    weights, ids = route(x, router, 2)
    probs = np.asarray(jax.nn.softmax(x @ router, axis=-1), np.float64)
    top = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.asarray(ids), top)
    chosen = np.take_along_axis(probs, top, axis=-1)
    np.testing.assert_allclose(np.asarray(weights), chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("num_tokens, experts, top_k",
                         [(1, 4, 2), (3, 8, 2), (4, 8, 2), (64, 8, 2), (33, 6, 1), (5, 3, 3), (300, 8, 2)])
def test_chunked_experts_equal_ragged(num_tokens, experts, top_k):
    x, router, w_gate, w_up, w_down = random_moe(num_tokens, 16, 24, experts)
    weights, ids = route(x, router, top_k)
    got = grouped_experts_chunked(x, weights, ids, w_gate, w_up, w_down)
    expected = grouped_experts(x, weights, ids, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_all_tokens_on_one_expert():
    x, router, w_gate, w_up, w_down = random_moe(40, 16, 24, 4)
    ids = jnp.zeros((40, 2), jnp.int32).at[:, 1].set(3)
    weights = jnp.full((40, 2), 0.5)
    got = grouped_experts_chunked(x, weights, ids, w_gate, w_up, w_down)
    expected = grouped_experts(x, weights, ids, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 64, 200])
def test_chunked_experts_skewed_routing_and_foreign_ids(num_tokens):
    """Overflow past an expert's capacity and ids meaning "another shard's expert" (== E) stay exact."""
    experts = 4
    x, router, w_gate, w_up, w_down = random_moe(num_tokens, 16, 24, experts)
    rng = np.random.default_rng(num_tokens)
    ids = rng.choice(experts + 1, size=(num_tokens, 2), p=[0.6, 0.1, 0.05, 0.05, 0.2]).astype(np.int32)
    weights = jnp.asarray(rng.random((num_tokens, 2)), jnp.float32)
    got = grouped_experts_chunked(x, weights, jnp.asarray(ids), w_gate, w_up, w_down)
    mask = ids < experts
    expected = grouped_experts(x, jnp.where(mask, weights, 0.0), jnp.asarray(np.where(mask, ids, experts)),
                               w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
