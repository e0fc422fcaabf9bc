"""The paged backend reproduces the full causal forward: chunked prefill + decode through KV pages."""

import jax.numpy as jnp
import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import ModelConfig
from scalellm_jax.model.kv_pool import LayerKV
from scalellm_jax.model.paged import PagedAttention, PagedMeta

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, sliding_window=7,
)
PAGE = 4


def run_step(model, backend, pools, seqs, page_tables, num_pages_per_seq):
    """seqs: list of (tokens of this step, start position). Returns logits of every token, new pools."""
    tokens = np.concatenate([t for t, _ in seqs]).astype(np.int32)
    positions = np.concatenate([np.arange(s, s + len(t)) for t, s in seqs]).astype(np.int32)
    slots = np.concatenate([
        [table[p // PAGE] * PAGE + p % PAGE for p in range(s, s + len(t))]
        for (t, s), table in zip(seqs, page_tables, strict=True)
    ]).astype(np.int32)
    table = np.zeros((len(seqs), num_pages_per_seq), np.int32)
    for i, pages in enumerate(page_tables):
        table[i, : len(pages)] = pages
    meta = PagedMeta(
        jnp.asarray(slots), jnp.asarray(table),
        jnp.asarray([s + len(t) for t, s in seqs], jnp.int32),
        jnp.asarray(np.cumsum([0] + [len(t) for t, _ in seqs]), jnp.int32),
    )
    logits, pools = model.module(backend).apply(
        model.variables, jnp.asarray(tokens)[None], jnp.asarray(positions)[None], pools, meta
    )
    return np.asarray(logits[0]), pools


@pytest.mark.parametrize("kernels", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_chunked_prefill_and_decode_match_full_forward(kernels):
    model = scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")
    rng = np.random.default_rng()
    lengths = [9, 14]
    full = [rng.integers(0, CONFIG.vocab_size, n) for n in lengths]
    num_pages, per_seq = 16, 4
    physical = rng.permutation(np.arange(1, num_pages))  # shuffled, page 0 unused
    page_tables = [list(physical[:per_seq]), list(physical[per_seq : 2 * per_seq])]
    shape = (CONFIG.num_kv_heads, num_pages, PAGE, CONFIG.head_dim)
    poison = jnp.full(shape, jnp.nan, jnp.float32)  # unused pages must never leak into outputs
    pools = tuple(LayerKV(poison, poison) for _ in range(CONFIG.num_layers))
    scale = CONFIG.head_dim**-0.5
    interpret = kernels == "pallas"
    mixed = PagedAttention(CONFIG.sliding_window, scale, kernels, decode_only=False, interpret=interpret)
    decode = PagedAttention(CONFIG.sliding_window, scale, kernels, decode_only=True, interpret=interpret)

    # Step 1: first chunks of both prompts; step 2: seq 0's next chunk mixed with seq 1's last prompt
    # token; step 3: a pure decode step through the decode kernel.
    got = [[], []]
    logits, pools = run_step(model, mixed, pools, [(full[0][:5], 0), (full[1][:13], 0)], page_tables, per_seq)
    got[0].append(logits[:5])
    got[1].append(logits[5:])
    logits, pools = run_step(model, mixed, pools, [(full[0][5:8], 5), (full[1][13:14], 13)], page_tables, per_seq)
    got[0].append(logits[:3])
    got[1].append(logits[3:])
    logits, pools = run_step(model, decode, pools, [(full[0][8:9], 8)], page_tables[:1], per_seq)
    got[0].append(logits)

    for i, seq in enumerate(full):
        expected = np.asarray(model.logits(seq[None]))[0]
        np.testing.assert_allclose(np.concatenate(got[i]), expected, rtol=2e-5, atol=2e-5)
