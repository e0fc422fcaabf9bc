"""Grouped-query attention with a pluggable KV-cache backend.

The Flax ``Attention`` module owns the projections and rotary embeddings; *where keys and values
live* (no cache, a dense per-sequence cache, paged pools) is a backend: a frozen, hashable object
(static under ``jit``) called as ``backend(q, k, v, positions, layer_cache, meta)`` that returns
``(out, new_layer_cache)``. This is the single switch the architecture asks for: the research
``generate`` uses :class:`DenseCacheAttention`, ``Model.logits`` uses :class:`CausalAttention`,
and the serving engine plugs in paged backends without touching the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn

from scalellm_jax.config import ModelConfig
from scalellm_jax.model.layers import apply_rotary, declared_params, rotary_cos_sin

_MASKED = -1e30  # finite, so a fully masked row can never produce NaN through exp(-inf - -inf)


class AttentionBackend(Protocol):
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, layer_cache: Any, meta: Any
    ) -> tuple[jax.Array, Any]: ...


def causal_window_mask(q_positions: jax.Array, kv_positions: jax.Array, sliding_window: int | None) -> jax.Array:
    """[B, T] × [B, S] positions → [B, T, S] bool: kv visible to the query (causal + optional window)."""
    q = q_positions[:, :, None]
    kv = kv_positions[:, None, :]
    mask = kv <= q
    if sliding_window is not None:
        mask &= kv > q - sliding_window
    return mask


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention, GQA by grouping query heads per kv head (no kv repeat in memory).

    q [B, T, H, D]; k, v [B, S, KV, D]; mask [B, T, S] → [B, T, H, D]. Scores and softmax in
    float32; probabilities cast to the value dtype before the second matmul, as Hugging Face does.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class CausalAttention:
    """No cache: every query attends to the keys of the same call (full causal forward)."""

    sliding_window: int | None
    scale: float

    def __call__(self, q, k, v, positions, layer_cache, meta):
        mask = causal_window_mask(positions, positions, self.sliding_window)
        return masked_attention(q, k, v, mask, self.scale), layer_cache


@dataclasses.dataclass(frozen=True)
class DenseCacheAttention:
    """A static-shape cache per sequence: ``layer_cache = (k [B, S, KV, D], v [B, S, KV, D])``.

    A token at position p is stored in slot p, so slot indices double as kv positions. Slots that
    hold nothing yet (or hold padding written by a right-padded prefill) are always at positions
    greater than the current query's, so the causal mask alone keeps them out.
    """

    sliding_window: int | None
    scale: float

    def __call__(self, q, k, v, positions, layer_cache, meta):
        k_cache, v_cache = layer_cache
        rows = jnp.arange(q.shape[0])[:, None]
        k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
        slots = jnp.broadcast_to(jnp.arange(k_cache.shape[1]), (q.shape[0], k_cache.shape[1]))
        mask = causal_window_mask(positions, slots, self.sliding_window)
        out = masked_attention(q, k_cache, v_cache, mask, self.scale)
        return out, (k_cache, v_cache)


class Attention(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Any, meta: Any):
        c = self.config
        p = declared_params(self, c, self.dtype)
        wq, wk, wv, wo = p["wq"], p["wk"], p["wv"], p["wo"]
        q = jnp.einsum("bth,hnd->btnd", x, wq)
        k = jnp.einsum("bth,hnd->btnd", x, wk)
        v = jnp.einsum("bth,hnd->btnd", x, wv)
        cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out, layer_cache = self.backend(q, k, v, positions, layer_cache, meta)
        # One [tokens, heads·d] × [heads·d, hidden] matmul: as an einsum over (n, d), XLA:CPU
        # transposed wo on every call to match the activation (it showed in decode-step profiles).
        b, t = out.shape[:2]
        return (out.reshape(b, t, -1) @ wo.reshape(-1, c.hidden_size)), layer_cache
