"""On-device token sampling with per-row parameters (greedy, temperature, min-p, top-k, top-p, seed).

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


_ARGMAX_CHUNK = 128


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` for [B, V] as int32 (first index of the maximum), much faster on XLA:CPU.

    XLA:CPU runs argmax as a slow variadic (value, index) reduce, and a max plus a masked min over
    the whole row materialises a [B, V] index array; both cost more than the rest of sampling
    (``benchmarks.sampling``). Two levels instead: the maximum of every 128-wide chunk, the first chunk that holds
    the row's maximum, then the first matching index inside that one chunk. A row holding NaN
    still maps to a valid token id.
    """
    rows, vocab = x.shape
    chunks = -(-vocab // _ARGMAX_CHUNK)
    if chunks * _ARGMAX_CHUNK != vocab:
        x = jnp.pad(x, ((0, 0), (0, chunks * _ARGMAX_CHUNK - vocab)), constant_values=-jnp.inf)
    tiled = x.reshape(rows, chunks, _ARGMAX_CHUNK)
    chunk_max = jnp.max(tiled, axis=-1)  # [B, chunks]
    best = jnp.max(chunk_max, axis=-1, keepdims=True)
    chunk = jnp.min(jnp.where(chunk_max == best, jnp.arange(chunks), chunks - 1), axis=-1)
    inside = jnp.take_along_axis(tiled, chunk[:, None, None], axis=1)[:, 0]  # [B, 128]
    offset = jnp.min(jnp.where(inside == best, jnp.arange(_ARGMAX_CHUNK), _ARGMAX_CHUNK - 1), axis=-1)
    return jnp.minimum(chunk * _ARGMAX_CHUNK + offset, vocab - 1).astype(jnp.int32)


# Top-k/top-p thresholds: only the rows that filter are worked on, gathered FILTER_ROWS at a time, so a
# batch pays for its filtering rows, not for its width. Each row's threshold comes from its CANDIDATES
# largest logits (``lax.top_k``: a partial selection, not a sort of the vocabulary); rows whose filter reaches
# past them (top_k > CANDIDATES, or a top-p mass they do not cover: flat distributions) are solved exactly
# by a radix select over the whole row.
CANDIDATES = 64
FILTER_ROWS = 4


_RADIX_LEVELS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of the order key, highest digits first


def _smallest_passing(x: jax.Array, weights: jax.Array, limit: jax.Array) -> jax.Array:
    """Per row of ``x`` [R, V]: the smallest value v of the row with ``sum(weights[x > v]) < limit`` (weights
    >= 0), or -inf when every value passes. Keeping ``x >= result`` keeps exactly the passing values.

    A radix select over the floats' order keys, as GPU top-k kernels do: per level, a histogram of the weight
    per digit among the values that share the digits chosen so far, then the highest digit whose bin makes
    the weight above reach ``limit``. Three passes over the row (11 + 11 + 10 bits), exact whatever the values."""
    rows, vocab = x.shape
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))  # unsigned order = float order
    row = jnp.arange(rows)[:, None]
    matched = jnp.ones(x.shape, bool)
    above = jnp.zeros((rows,), jnp.float32)  # weight of the values above the bins still searched
    prefix = jnp.zeros((rows,), jnp.uint32)
    found = None
    for shift, width in _RADIX_LEVELS:
        digit = ((key >> shift) & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
        hist = jnp.zeros((rows, 1 << width), jnp.float32).at[row, digit].add(jnp.where(matched, weights, 0.0))
        at_or_above = jnp.cumsum(hist[:, ::-1], axis=-1)[:, ::-1]  # weight in this digit's bin and higher ones
        reach = above[:, None] + at_or_above >= limit[:, None]  # true up to the answer's digit
        if found is None:
            found = reach[:, 0]  # else: every value passes
        bins = jnp.arange(1 << width)
        # rounding (bins summed in another order than their parent) can leave no bin that reaches: take the
        # lowest bin with weight, where the answer then is
        lowest = jnp.min(jnp.where(hist > 0, bins, (1 << width) - 1), axis=-1)
        chosen = jnp.where(jnp.any(reach, axis=-1), jnp.max(jnp.where(reach, bins, 0), axis=-1), lowest)
        above = above + jnp.take_along_axis(at_or_above - hist, chosen[:, None], axis=-1)[:, 0]
        matched &= digit == chosen[:, None]
        prefix |= chosen.astype(jnp.uint32) << shift
    value_bits = jnp.where(prefix >> 31 == 1, prefix & jnp.uint32(0x7FFFFFFF), ~prefix)
    return jnp.where(found, jax.lax.bitcast_convert_type(value_bits, jnp.float32), -jnp.inf)


def _gathered(need: jax.Array, solve) -> jax.Array:
    """[B]: ``solve(row indices [R]) -> [R]`` on the rows in ``need``, FILTER_ROWS at a time (not at all when
    no row needs it); -inf on the other rows."""
    rows = need.shape[0]

    def chunk(state):
        done, out = state
        idx = jnp.nonzero(need & ~done, size=min(FILTER_ROWS, rows), fill_value=rows)[0]
        out = out.at[idx].set(solve(jnp.minimum(idx, rows - 1)), mode="drop")
        return done.at[idx].set(True, mode="drop"), out

    start = (jnp.zeros_like(need), jnp.full((rows,), -jnp.inf, jnp.float32))
    return jax.lax.while_loop(lambda s: jnp.any(need & ~s[0]), chunk, start)[1]


def filter_thresholds(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, floor: jax.Array) -> jax.Array:
    """Per row, the smallest logit that top-k then top-p keep (top-p over the kept logits renormalised); every
    logit at or above it is kept, ties included; -inf where nothing filters. ``floor`` [B]: logits below it
    go first (min_p's cut; -inf: none). The most likely token always survives. ``top_k`` <= 0: off;
    ``top_p`` >= 1: off."""
    vocab = scaled.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    by_rank = _gathered((k < vocab) | (top_p < 1),
                        lambda idx: _row_thresholds(scaled[idx], k[idx], top_p[idx], floor[idx]))
    return jnp.maximum(by_rank, floor)


def min_p_floor(scaled: jax.Array, min_p: jax.Array) -> jax.Array:
    """[B]: the logit below which a token's probability is under ``min_p`` × the top token's (-inf: off)."""
    return jax.lax.cond(
        jnp.any(min_p > 0),
        lambda: jnp.where(min_p > 0, jnp.max(scaled, axis=-1) + jnp.log(jnp.maximum(min_p, 1e-30)), -jnp.inf),
        lambda: jnp.full(min_p.shape, -jnp.inf, jnp.float32),
    )


def _row_thresholds(x: jax.Array, k: jax.Array, top_p: jax.Array, floor: jax.Array) -> jax.Array:
    """``filter_thresholds`` for the rows ``x`` [R, V], with ``k`` in 1..V (V: off)."""
    vocab = x.shape[-1]
    c = min(CANDIDATES, vocab)
    # [R, c], descending. The barrier keeps the top-k's only user a slice of its first c values: XLA:CPU then
    # runs a partial selection; with other users it lowers top_k to a sort of the whole row.
    top = jax.lax.optimization_barrier(jax.lax.top_k(x, c)[0])
    peak = top[:, 0]

    # top-k: the k-th largest logit (kept by value: ties with it stay), by count past the candidates
    kth = jnp.take_along_axis(top, jnp.clip(k - 1, 0, c - 1)[:, None], axis=1)[:, 0]
    far = (k > c) & (k < vocab)
    t_k = jax.lax.cond(jnp.any(far), lambda: jnp.where(far, _smallest_passing(x, jnp.ones_like(x), k), kth),
                       lambda: kth)
    t_k = jnp.maximum(jnp.where(k >= vocab, -jnp.inf, t_k), floor)

    # top-p over the renormalised top-k: the last candidate kept while the mass above it is below top_p;
    # past the candidates, by mass
    z = jnp.sum(jnp.where(x >= t_k[:, None], jnp.exp(x - peak[:, None]), 0.0), axis=-1)
    probs = jnp.where(top >= t_k[:, None], jnp.exp(top - peak[:, None]), 0.0) / z[:, None]
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (top >= t_k[:, None]) & ((mass_before < top_p[:, None]) | (jnp.arange(c) == 0))
    t_p = jnp.min(jnp.where(keep, top, jnp.inf), axis=-1)
    far = (top_p < 1) & (k > c) & (jnp.sum(probs, axis=-1) < top_p)

    def by_mass():
        mass = jnp.where(x >= t_k[:, None], jnp.exp(x - peak[:, None]), 0.0) / z[:, None]
        return jnp.where(far, _smallest_passing(x, mass, top_p), t_p)

    t_p = jnp.where(top_p < 1, jax.lax.cond(jnp.any(far), by_mass, lambda: t_p), -jnp.inf)
    return jnp.maximum(t_k, t_p)


def sample(
    logits: jax.Array,
    keys: jax.Array,
    steps: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array | None = None,
    *,
    adjust=None,
    thresholds=filter_thresholds,
) -> jax.Array:
    """logits [B, V]; keys typed [B]; steps int [B]; per-row params [B] → token ids int32 [B].
    ``min_p`` [B] (None: off everywhere) applies before top-k and top-p, as in vLLM.
    ``adjust``: ``(rows [B] bool, fn)``: ``fn(logits)`` applies those rows' logit controls, before
    everything else (greedy rows included); None: no row has any.
    ``thresholds``: how the top-k/top-p cut-offs are found (another method, for benchmarks).

    Gumbel-max over the vocabulary in its original order, restricted to the logits at or above
    the row's top-k/top-p threshold; greedy rows take the plain argmax. A row's draw depends only
    on its own logits, key and step, never on the other rows. The controls, the thresholds and the
    noise run only when some row needs them (``lax.cond``); skipping them changes no row's result.
    Each branch makes its own [B, V] arrays, so skipping one never copies the logits.
    """
    logits = logits.astype(jnp.float32)
    sampling = temperature > 0
    adjusted = jnp.zeros_like(sampling) if adjust is None else adjust[0]
    min_p = jnp.zeros_like(top_p) if min_p is None else min_p
    filtered = sampling & ((top_k > 0) | (top_p < 1) | (min_p > 0))

    def draw():  # all of it inside the cond: a plain greedy batch pays for the argmax alone
        divisor = jnp.where(sampling, temperature, 1.0)[:, None]  # greedy rows: their logits exactly
        if adjust is None:
            scaled = logits / divisor
        else:
            scaled = jax.lax.cond(jnp.any(adjusted), lambda: adjust[1](logits) / divisor, lambda: logits / divisor)

        def cut():
            floor = min_p_floor(scaled, jnp.where(filtered, min_p, 0.0))
            return thresholds(scaled, jnp.where(filtered, top_k, 0), jnp.where(filtered, top_p, 1.0), floor)

        def random():
            threshold = jax.lax.cond(jnp.any(filtered), cut,
                                     lambda: jnp.full(temperature.shape, -jnp.inf, jnp.float32))
            step_keys = jax.vmap(jax.random.fold_in)(keys, steps.astype(jnp.uint32))
            noise = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[-1:], jnp.float32))(step_keys)
            noisy = jnp.where(sampling[:, None], scaled + noise, scaled)
            return first_argmax(jnp.where(scaled >= threshold[:, None], noisy, -jnp.inf))

        return jax.lax.cond(jnp.any(sampling), random, lambda: first_argmax(scaled))

    return jax.lax.cond(jnp.any(sampling | adjusted), draw, lambda: first_argmax(logits))


def logprobs_and_top(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From one log-softmax of ``logits`` [N, V]: the log-probability of ``tokens`` [N], and the ``k`` largest
    log-probabilities with their token ids, best first (a token among them has exactly its own value there)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(logp, k)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], values, ids.astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of ``tokens`` [B] under the unfiltered distribution of ``logits`` [B, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
