"""Sparse mixture-of-experts block (Mixtral): router softmax → top-k → renormalise → SwiGLU experts.

Tokens are grouped by expert and run through ``jax.lax.ragged_dot`` (grouped matmul), so each
expert's weights are read once per step and no FLOPs go to experts a token was not routed to —
unlike the "run every expert on every token" formulation, which costs num_experts/top_k times the
FLOPs in prefill. ``dense_moe_reference`` is that simple formulation, kept for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from scalellm_jax.config import ModelConfig


def route(x: jax.Array, router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Hugging Face routing: logits in the model dtype, softmax in float32, top-k, renormalise.

    x [N, H], router [H, E] → (weights float32 [N, k], expert ids int32 [N, k]).
    """
    logits = x @ router
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped_experts(
    x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Apply the routed SwiGLU experts. x [N, H]; weights/experts [N, k]; w_* [E, ...] → [N, H]."""
    n, top_k = experts.shape
    num_experts = w_gate.shape[0]
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of_row = order // top_k
    rows = x[token_of_row]
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(rows, w_up, group_sizes, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    down = jax.lax.ragged_dot(hidden, w_down, group_sizes, preferred_element_type=jnp.float32)
    unsorted = jnp.zeros_like(down).at[order].set(down)
    combined = jnp.sum(unsorted.reshape(n, top_k, -1) * weights[..., None], axis=1)
    return combined.astype(x.dtype)


def dense_moe_reference(x, router, w_gate, w_up, w_down, top_k):
    """Every expert on every token, masked by the routing weights (test oracle only)."""
    weights, experts = route(x, router, top_k)
    dense_w = jnp.zeros((x.shape[0], w_gate.shape[0]), jnp.float32)
    dense_w = dense_w.at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    gate = jnp.einsum("nh,ehi->eni", x, w_gate, preferred_element_type=jnp.float32)
    up = jnp.einsum("nh,ehi->eni", x, w_up, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    down = jnp.einsum("eni,eih->enh", hidden, w_down, preferred_element_type=jnp.float32)
    return jnp.einsum("enh,ne->nh", down, dense_w).astype(x.dtype)


class SparseMoE(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        router = self.param("router", init, (c.hidden_size, c.num_experts), self.dtype)
        w_gate = self.param("w_gate", init, (c.num_experts, c.hidden_size, c.intermediate_size), self.dtype)
        w_up = self.param("w_up", init, (c.num_experts, c.hidden_size, c.intermediate_size), self.dtype)
        w_down = self.param("w_down", init, (c.num_experts, c.intermediate_size, c.hidden_size), self.dtype)
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = route(flat, router, c.num_experts_per_tok)
        out = grouped_experts(flat, weights, experts, w_gate, w_up, w_down)
        return out.reshape(x.shape)
