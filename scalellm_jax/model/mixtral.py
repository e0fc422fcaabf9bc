"""The Flax Mixtral model: embeddings → N × (attention + sparse MoE) → final norm → lm_head.

``Mixtral.__call__(tokens, positions, caches, meta, logits_index)`` is a pure function of its
inputs; caching behaviour comes from the static ``backend`` (see ``attention.py``). Layers are a
Python list (unrolled under ``jit``) rather than ``nn.scan``: per-layer KV pools can then be
separate donated buffers updated in place, and the parameter tree maps 1:1 onto checkpoint tensors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from scalellm_jax.config import ModelConfig
from scalellm_jax.model.attention import Attention, AttentionBackend
from scalellm_jax.model.layers import RMSNorm, declared_params
from scalellm_jax.model.moe import SparseMoE


class DeclaredParams(nn.Module):
    """A scope that only holds the declared weights of its name (the embedding table, the LM head)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None  # the shapes on this mesh (the LM head's vocabulary padded to divide it)

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return declared_params(self, self.config, self.dtype, self.mesh)


class DecoderLayer(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    dtype: jnp.dtype = jnp.float32
    moe_impl: str = "auto"
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, positions, layer_cache, meta):
        c = self.config
        h = RMSNorm(c, self.dtype, name="attn_norm")(x)
        h, layer_cache = Attention(c, self.backend, self.dtype, name="attn")(h, positions, layer_cache, meta)
        x = x + h
        h = RMSNorm(c, self.dtype, name="mlp_norm")(x)
        x = x + SparseMoE(c, self.dtype, self.moe_impl, self.mesh, name="moe")(h)
        return x, layer_cache


class Mixtral(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    dtype: jnp.dtype = jnp.float32
    moe_impl: str = "auto"  # see moe.resolve_moe_impl
    mesh: Mesh | None = None  # tensor/expert parallel mesh (see scalellm_jax.parallel)

    def setup(self):
        c = self.config
        self.embed = DeclaredParams(c, self.dtype)
        self.layers = [
            DecoderLayer(c, self.backend, self.dtype, self.moe_impl, self.mesh) for _ in range(c.num_layers)
        ]
        self.final_norm = RMSNorm(c, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = DeclaredParams(c, self.dtype, self.mesh)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        caches: tuple[Any, ...] | None = None,
        meta: Any = None,
        logits_index: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, tuple[Any, ...] | None]:
        """tokens/positions [B, T] → (logits [B, T or n, V], new caches[, final hidden states [B, T, H]]).

        ``logits_index`` [B, n] selects which token positions get logits, so prefill pays the
        vocabulary projection only for the tokens that are sampled. ``return_hidden``: also the
        normalized hidden states of every position, which ``project`` turns into logits when some
        are wanted after all (prompt logprobs).
        """
        x = jnp.take(self.embed()["embedding"], tokens, axis=0)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, None if caches is None else caches[i], meta)
            new_caches.append(layer_cache)
        hidden = x = self.final_norm(x)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[..., None], axis=1)
        caches = None if caches is None else tuple(new_caches)
        if return_hidden:
            return self.project(x), caches, hidden
        return self.project(x), caches

    def project(self, hidden: jax.Array) -> jax.Array:
        """Normalized hidden states [..., H] → logits [..., V] (the LM head)."""
        # XLA:CPU runs a bfloat16 vector × matrix product of the vocabulary's width an order of
        # magnitude slower than the same product with two rows (a one-sequence decode step, see
        # benchmarks/results/bf16_single_row-*.json), so a single row goes through as two.
        single = hidden.ndim >= 2 and hidden.size == hidden.shape[-1] and hidden.dtype == jnp.bfloat16
        rows = jnp.concatenate([hidden, hidden]) if single else hidden
        if self.config.tie_word_embeddings:
            logits = jnp.dot(rows, self.embed()["embedding"].T)
        else:
            kernel = self.lm_head()["kernel"]
            logits = jax.lax.dot_general(rows, kernel, (((rows.ndim - 1,), (0,)), ((), ())))
            if kernel.shape[1] != self.config.vocab_size:  # padded to divide the tensor axis: never sampled
                logits = logits[..., : self.config.vocab_size]
        return logits[:1] if single else logits
