"""Research API: jitted, static-shape batched generation with a dense KV cache.

Prompts of different lengths share one batch by *right* padding: every row's token at position p
lives in cache slot p, so rows need no position offsets and padding slots are always in the
future of any real query (the causal mask hides them until a real token overwrites them). The
prompt length and cache length are rounded up to buckets so nearby calls reuse one compilation.
The whole loop (prefill + ``while_loop`` decode with early exit once every row has stopped) is a
single jitted function: no host round trip per token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scalellm_jax.engine.request import SamplingParams
from scalellm_jax.engine.sampling import sample
from scalellm_jax.loader import Model, check_token_range
from scalellm_jax.model import DenseCacheAttention, Mixtral

_PAD = 0


def _bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (≥ minimum) so lengths share compilations."""
    return max(minimum, 1 << (n - 1).bit_length())


def _as_prompt_list(prompt_token_ids) -> list[list[int]]:
    if isinstance(prompt_token_ids, (np.ndarray, jax.Array)):
        array = np.asarray(prompt_token_ids)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise ValueError(f"prompt_token_ids must be [batch, seq], got shape {array.shape}")
        return [list(map(int, row)) for row in array]
    if not isinstance(prompt_token_ids, Sequence) or not prompt_token_ids:
        raise ValueError("prompt_token_ids must be a non-empty list of token id lists")
    if all(isinstance(t, (int, np.integer)) for t in prompt_token_ids):
        return [list(map(int, prompt_token_ids))]
    return [list(map(int, row)) for row in prompt_token_ids]


def generate(
    model: Model,
    prompt_token_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt; returns the new token ids per prompt.

    ``prompt_token_ids``: a list of token-id lists (any lengths) or an int array [batch, seq].
    A row stops after emitting ``eos_token_id`` (included in its output). Same seed → same tokens.
    """
    prompts = _as_prompt_list(prompt_token_ids)
    config = model.config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # the engine's checks, field-named
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(
                f"prompt {i}: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                f"model's context of {config.max_position_embeddings}"
            )
    lengths = np.array([len(p) for p in prompts], np.int32)
    prompt_len = _bucket(int(lengths.max()))
    tokens = np.full((len(prompts), prompt_len), _PAD, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
    check_token_range(tokens, config.vocab_size)
    cache_len = _bucket(prompt_len + max_new_tokens, 64)

    batch = len(prompts)
    out, counts = _generate_jit(
        model.module(DenseCacheAttention(config.sliding_window, config.head_dim**-0.5)),
        model.params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.full((batch,), temperature, jnp.float32),
        jnp.full((batch,), top_k, jnp.int32),
        jnp.full((batch,), top_p, jnp.float32),
        jax.random.split(jax.random.key(seed), batch),
        -1 if eos_token_id is None else int(eos_token_id),
        max_new_tokens=max_new_tokens,
        cache_len=cache_len,
    )
    out, counts = np.asarray(out), np.asarray(counts)
    return [out[i, : counts[i]].tolist() for i in range(batch)]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "cache_len"))
def _generate_jit(
    module: Mixtral, params, tokens, lengths, temperature, top_k, top_p, keys, eos_id, *,
    max_new_tokens: int, cache_len: int,
):
    c = module.config
    batch, prompt_len = tokens.shape
    cache_shape = (batch, cache_len, c.num_kv_heads, c.head_dim)
    caches = tuple(
        (jnp.zeros(cache_shape, module.dtype), jnp.zeros(cache_shape, module.dtype)) for _ in range(c.num_layers)
    )
    variables = {"params": params}

    def pick(logits, step):
        steps = jnp.full((batch,), step, jnp.int32)
        return sample(logits[:, 0], keys, steps, temperature, top_k, top_p)

    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits, caches = module.apply(variables, tokens, positions, caches, None, logits_index=(lengths - 1)[:, None])
    first = pick(logits, 0)
    out = jnp.full((batch, max_new_tokens), _PAD, jnp.int32).at[:, 0].set(first)
    done = first == eos_id
    counts = jnp.ones((batch,), jnp.int32)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, last, caches, done, out, counts = state
        pos = (lengths + step - 1)[:, None]
        logits, caches = module.apply(variables, last[:, None], pos, caches, None)
        token = jnp.where(done, _PAD, pick(logits, step))
        out = out.at[:, step].set(token)
        counts = counts + (~done).astype(jnp.int32)
        done = done | (token == eos_id)
        return step + 1, token, caches, done, out, counts

    state = (jnp.int32(1), first, caches, done, out, counts)
    _, _, _, _, out, counts = jax.lax.while_loop(cond, body, state)
    return out, counts
