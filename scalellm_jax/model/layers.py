"""Small building blocks shared by the Mixtral layers: declared parameters, RMSNorm and rotary embeddings.

Both follow Hugging Face's numerics on purpose (normalise in float32, cast back before the
weight multiply; rotary frequencies in float32 and cos/sin cast to the activation dtype), so
float32 logits match ``transformers`` to ~1e-6 and bfloat16 ones round the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from scalellm_jax import weights
from scalellm_jax.config import ModelConfig
from scalellm_jax.parallel import placed_shape

_INITIALIZERS = {"normal": nn.initializers.normal(0.02), "ones": nn.initializers.ones, "zeros": nn.initializers.zeros}


def declared_params(module: nn.Module, config: ModelConfig, dtype, mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Create (or fetch) every parameter ``scalellm_jax.weights`` declares for ``module`` (by its scope name), in
    its shape on ``mesh`` (padded axes padded: ``parallel.placed_shape``)."""
    return {
        w.name: module.param(w.name, _INITIALIZERS[w.init], placed_shape(w, config, mesh), dtype)
        for w in weights.weights_of(module.name, config)
    }


class RMSNorm(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = declared_params(self, self.config, self.dtype)["scale"]
        eps = self.config.rms_norm_eps
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return scale * normed.astype(x.dtype)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for ``positions`` (any int shape) → ``positions.shape + (head_dim,)``."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [..., tokens, heads, head_dim] with cos/sin [..., tokens, head_dim] (half-split layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]
