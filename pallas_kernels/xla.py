"""Blockwise jnp attention over paged KV: the ``xla`` backend for CPU (and any non-GPU) serving.

Same signatures and results as the references, but with cost proportional to the tokens actually
in the cache: a ``while_loop`` walks KV blocks of ``pages_per_block`` pages up to the longest
sequence of the step (a traced bound, so no recompilation), keeping a flash-style online softmax.
The references gather every page-table entry (``max_pages_per_seq`` of them) per sequence, which
makes a serving step cost O(max_model_len) regardless of the real lengths.

Masked keys get exactly zero weight and V rows of masked keys are zeroed before the matmul, so NaN
in unused pages never reaches an output; rows that see no key return zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as C
from pallas_kernels.kv_cache import write_kv  # the same scatter on every backend
from pallas_kernels.reference import token_positions

_NEG = -1e30


def _gather_block(pages, scales, block_table):
    """pages [kvh, P, ps, d], block_table [n, ppb] → float32 [kvh, n, ppb * ps, d] (dequantised)."""
    kvh, _, page_size, d = pages.shape
    n, ppb = block_table.shape
    block = pages[:, block_table].astype(jnp.float32)  # [kvh, n, ppb, ps, d]
    if scales is not None:
        block = block * scales[:, block_table][..., None]
    return block.reshape(kvh, n, ppb * page_size, d)


def _attend_blocks(q, k_pages, v_pages, k_scales, v_scales, tables, q_pos, kv_len, lo_tok, hi_tok,
                   *, scale, sliding_window, pages_per_block):
    """Online-softmax attention of rows ``q`` [n, kvh, g, d] over their own paged KV.

    tables [n, max_pages] (each row's page table), q_pos [n] (the query's absolute position; keys
    at positions > q_pos are masked), kv_len [n] (keys at positions >= kv_len are masked; 0 for
    padding rows). Only blocks overlapping [lo_tok, hi_tok) are visited.
    """
    n, kvh, g, d = q.shape
    page_size = k_pages.shape[2]
    block_tokens = pages_per_block * page_size
    max_pages = tables.shape[1]
    padded = C.cdiv(max_pages, pages_per_block) * pages_per_block
    tables = jnp.pad(jnp.clip(tables, 0, k_pages.shape[1] - 1), ((0, 0), (0, padded - max_pages)))
    q = q.astype(jnp.float32) * scale

    def body(j, carry):
        m, denom, acc = carry
        block_table = jax.lax.dynamic_slice_in_dim(tables, j * pages_per_block, pages_per_block, axis=1)
        k = _gather_block(k_pages, k_scales, block_table)  # [kvh, n, bt, d]
        v = _gather_block(v_pages, v_scales, block_table)
        pos = j * block_tokens + jnp.arange(block_tokens)
        valid = (pos[None, :] < kv_len[:, None]) & (pos[None, :] <= q_pos[:, None])  # [n, bt]
        if sliding_window is not None:
            valid &= pos[None, :] > (q_pos - sliding_window)[:, None]
        s = jnp.einsum("nkgd,knbd->nkgb", q, k, precision=jax.lax.Precision.HIGHEST)
        s = jnp.where(valid[:, None, None, :], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(valid[:, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        v = jnp.where(valid[None, :, :, None], v, 0.0)
        pv = jnp.einsum("nkgb,knbd->nkgd", p, v, precision=jax.lax.Precision.HIGHEST)
        return m_new, denom * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

    init = (jnp.full((n, kvh, g), _NEG, jnp.float32), jnp.zeros((n, kvh, g), jnp.float32),
            jnp.zeros((n, kvh, g, d), jnp.float32))
    first = jnp.maximum(lo_tok, 0) // block_tokens
    last = C.cdiv(jnp.maximum(hi_tok, 0), block_tokens)
    _, denom, acc = jax.lax.fori_loop(first, last, body, init)
    return acc / jnp.where(denom > 0, denom, 1.0)[..., None]


def _window_start(q_pos, active, sliding_window):
    """First key position any active row can see (0 without a sliding window)."""
    if sliding_window is None:
        return jnp.int32(0)
    return jnp.min(jnp.where(active, q_pos - sliding_window + 1, jnp.iinfo(jnp.int32).max))


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "interpret", "pages_per_block"))
def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scale: float, k_scales=None,
                           v_scales=None, sliding_window: int | None = None, interpret: bool = False,
                           pages_per_block: int = 8):
    """``pallas_kernels.paged_decode_attention`` in blockwise jnp (``interpret`` is ignored)."""
    del interpret
    C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_seqs, num_heads, head_dim = q.shape
    kvh = k_pages.shape[0]
    q_pos = lengths - 1
    lo = _window_start(q_pos, lengths > 0, sliding_window)
    out = _attend_blocks(
        q.reshape(num_seqs, kvh, num_heads // kvh, head_dim), k_pages, v_pages, k_scales, v_scales,
        page_table, q_pos, lengths, lo, jnp.max(lengths), scale=scale, sliding_window=sliding_window,
        pages_per_block=pages_per_block,
    )
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "interpret", "pages_per_block"))
def ragged_prefill_attention(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *, scale: float,
                             k_scales=None, v_scales=None, sliding_window: int | None = None,
                             interpret: bool = False, pages_per_block: int = 8):
    """``pallas_kernels.ragged_prefill_attention`` in blockwise jnp (``interpret`` is ignored).

    Each query token walks its own sequence's pages (gathered per token), so the work is
    tokens × their visible keys, never tokens × every sequence's keys.
    """
    del interpret
    C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_tokens, num_heads, head_dim = q.shape
    kvh = k_pages.shape[0]
    seq, pos, valid = token_positions(kv_lengths, cu_q_lens, num_tokens)
    kv_len = jnp.where(valid, kv_lengths[seq], 0)
    lo = _window_start(pos, valid, sliding_window)
    out = _attend_blocks(
        q.reshape(num_tokens, kvh, num_heads // kvh, head_dim), k_pages, v_pages, k_scales, v_scales,
        page_table[seq], pos, kv_len, lo, jnp.max(kv_len), scale=scale, sliding_window=sliding_window,
        pages_per_block=pages_per_block,
    )
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


__all__ = ["paged_decode_attention", "ragged_prefill_attention", "write_kv"]
