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


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32 (first index of the maximum), ~4× faster on XLA:CPU.

    XLA:CPU runs argmax as a slow variadic (value, index) reduce; a max then a min over the
    matching indices are two fast plain reductions (2.3 ms instead of 10 ms for 64 × 32000).
    A row holding NaN maps to the last index instead of the NaN's, still a valid token id.
    """
    size = x.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), iota, size), axis=-1)
    return jnp.minimum(first, size - 1)


def _thresholds(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row, the smallest logit that top-k then top-p keep (top-p over the top-k renormalised).

    The most likely token always survives, so a row never ends up with nothing to sample.
    """
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (rank == 0)
    num_kept = jnp.sum(keep, axis=-1)
    return jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)[:, 0]


def sample(
    logits: jax.Array,
    keys: jax.Array,
    steps: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """logits [B, V]; keys typed [B]; steps int [B]; per-row params [B] → token ids int32 [B].

    Gumbel-max over the vocabulary in its original order, restricted to the logits at or above
    the row's top-k/top-p threshold. A row's draw depends only on its own logits, key and step,
    never on the other rows. The sort that top-k/top-p need (slow on CPU for a 32k vocabulary)
    and the noise run only when some row needs them (``lax.cond``); skipping them changes no
    row's result.
    """
    logits = logits.astype(jnp.float32)
    greedy = first_argmax(logits)
    sampling = temperature > 0
    scaled = logits / jnp.where(sampling, temperature, 1.0)[:, None]
    filtered = sampling & ((top_k > 0) | (top_p < 1))
    no_threshold = jnp.full(temperature.shape, -jnp.inf, jnp.float32)
    threshold = jax.lax.cond(
        jnp.any(filtered),
        lambda: jnp.where(filtered, _thresholds(scaled, top_k, top_p), -jnp.inf),
        lambda: no_threshold,
    )

    def draw():
        step_keys = jax.vmap(jax.random.fold_in)(keys, steps.astype(jnp.uint32))
        noise = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[-1:], jnp.float32))(step_keys)
        candidates = jnp.where(scaled >= threshold[:, None], scaled + noise, -jnp.inf)
        return first_argmax(candidates)

    sampled = jax.lax.cond(jnp.any(sampling), draw, lambda: greedy)
    return jnp.where(sampling, sampled, greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of ``tokens`` [B] under the unfiltered distribution of ``logits`` [B, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
