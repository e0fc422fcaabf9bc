"""On-device token sampling with per-row parameters (greedy, temperature, top-k, top-p, seed).

Every row carries its own parameters and its own PRNG key, and the randomness for a row depends
only on (its key, its step), so a request's tokens do not change with whatever else is batched
next to it. ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those
filters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seeds: jax.Array) -> jax.Array:
    """int [B] seeds → typed PRNG keys [B]."""
    return jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sort each row descending and mask what top-k / top-p exclude.

    logits [B, V] float32 (already temperature-scaled) → (masked sorted logits, sorted token ids).
    The most likely token always survives, so a row never ends up with nothing to sample.
    """
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (rank == 0)
    return jnp.where(keep, sorted_logits, -jnp.inf), order


def sample(
    logits: jax.Array,
    keys: jax.Array,
    steps: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """logits [B, V]; keys typed [B]; steps int [B]; per-row params [B] → token ids int32 [B]."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    masked, order = filter_logits(logits / safe_temperature[:, None], top_k, top_p)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps.astype(jnp.uint32))
    choice = jax.vmap(jax.random.categorical)(step_keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of ``tokens`` [B] under the unfiltered distribution of ``logits`` [B, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
