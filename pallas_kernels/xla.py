"""Blockwise jnp attention over paged KV: the ``xla`` backend for CPU (and any non-GPU) serving.

Same signatures and results as the references, but with cost proportional to the tokens actually
in the cache: a ``while_loop`` (traced trip count, so no recompilation) walks the (row, key block)
pairs each row can see, blocks of ``pages_per_block`` pages, keeping a flash-style online softmax.
The references gather every page-table entry (``max_pages_per_seq`` of them) per sequence, which
makes a serving step cost O(max_model_len) regardless of the real lengths.

Masked keys get exactly zero weight and V rows of masked keys are zeroed before the matmul, so NaN
in unused pages never reaches an output; rows that see no key return zeros. Lengths are clipped to a
page-table row's capacity as in the kernels (``_common.clip_lengths``).
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


def _attend_blocks(q, k_pages, v_pages, k_scales, v_scales, tables, q_pos, kv_len, *, scale, sliding_window,
                   pages_per_block):
    """Online-softmax attention of rows ``q`` [n, kvh, m, d] over their own paged KV.

    A row is a sequence's slice of queries: ``m`` query vectors per KV head, all reading the
    same page table (decode: the row's query heads; prefill: a tile of tokens × heads).
    tables [n, max_pages] (each row's page table), q_pos [n, m] (each query's absolute position,
    -1 for none; keys after it are masked), kv_len [n] (keys at positions >= kv_len are masked;
    0 for padding rows).

    The work is a flat list of (row, key block) items holding only the blocks each row can see
    (from its window start to its last query), walked ``n`` items per iteration; each item's
    partial softmax is merged into its row's running one. A batch of mostly short rows next to
    one long one thus costs what its rows need, where looping every row over the longest row's
    blocks cost up to 4× that at decode.
    """
    n, kvh, m, d = q.shape
    page_size = k_pages.shape[2]
    block_tokens = pages_per_block * page_size
    max_pages = tables.shape[1]
    padded = C.cdiv(max_pages, pages_per_block) * pages_per_block
    tables = jnp.pad(jnp.clip(tables, 0, k_pages.shape[1] - 1), ((0, 0), (0, padded - max_pages)))
    q = q.astype(jnp.float32) * scale

    # Each row's visible blocks [lo, hi), and where its items start in the flat list.
    hi = C.cdiv(jnp.clip(jnp.minimum(kv_len, jnp.max(q_pos, axis=1) + 1), 0, None), block_tokens)
    lo = jnp.zeros_like(hi)
    if sliding_window is not None:
        first = jnp.min(jnp.where(q_pos >= 0, q_pos - sliding_window + 1, jnp.iinfo(jnp.int32).max), axis=1)
        lo = jnp.minimum(jnp.clip(first, 0, None) // block_tokens, hi)
    ends = jnp.cumsum(hi - lo)
    starts = ends - (hi - lo)
    total = ends[-1]

    def body(i, carry):
        m_run, denom, acc = carry
        item = i * n + jnp.arange(n)
        live = item < total
        row = jnp.minimum(jnp.searchsorted(ends, item, side="right"), n - 1)
        block = lo[row] + item - starts[row]
        block_table = tables[row[:, None], block[:, None] * pages_per_block + jnp.arange(pages_per_block)]
        k = _gather_block(k_pages, k_scales, block_table)  # [kvh, n, bt, d]
        v = _gather_block(v_pages, v_scales, block_table)
        pos = block[:, None] * block_tokens + jnp.arange(block_tokens)  # [n, bt]
        in_seq = live[:, None] & (pos < kv_len[row][:, None])
        row_pos = q_pos[row]
        valid = in_seq[:, None, :] & (pos[:, None, :] <= row_pos[:, :, None])  # [n, m, bt]
        if sliding_window is not None:
            valid &= pos[:, None, :] > (row_pos - sliding_window)[:, :, None]
        s = jnp.einsum("nkmd,knbd->nkmb", q[row], k, precision=jax.lax.Precision.HIGHEST)
        s = jnp.where(valid[:, None], s, _NEG)
        m_item = jnp.max(s, axis=-1)
        p = jnp.where(valid[:, None], jnp.exp(s - m_item[..., None]), 0.0)
        v = jnp.where(in_seq[None, :, :, None], v, 0.0)
        pv = jnp.einsum("nkmb,knbd->nkmd", p, v, precision=jax.lax.Precision.HIGHEST)
        # Merge the items into their rows (several items of one row may share an iteration).
        target = jnp.where(live, row, n)  # dead items land out of range and are dropped
        m_new = m_run.at[target].max(m_item, mode="drop")
        correction = jnp.exp(m_run - m_new)
        weight = jnp.exp(m_item - m_new[row])
        denom = (denom * correction).at[target].add(jnp.sum(p, axis=-1) * weight, mode="drop")
        acc = (acc * correction[..., None]).at[target].add(pv * weight[..., None], mode="drop")
        return m_new, denom, acc

    init = (jnp.full((n, kvh, m), _NEG, jnp.float32), jnp.zeros((n, kvh, m), jnp.float32),
            jnp.zeros((n, kvh, m, d), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, C.cdiv(total, n), body, init)
    return acc / jnp.where(denom > 0, denom, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "interpret", "pages_per_block"))
def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scale: float, k_scales=None,
                           v_scales=None, sliding_window: int | None = None, interpret: bool = False,
                           pages_per_block: int = 2):
    """``pallas_kernels.paged_decode_attention`` in blockwise jnp (``interpret`` is ignored)."""
    del interpret
    C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_seqs, num_heads, head_dim = q.shape
    kvh = k_pages.shape[0]
    lengths = C.clip_lengths(lengths, page_table, k_pages.shape[2])
    out = _attend_blocks(
        q.reshape(num_seqs, kvh, num_heads // kvh, head_dim), k_pages, v_pages, k_scales, v_scales,
        page_table, (lengths - 1)[:, None], lengths, scale=scale, sliding_window=sliding_window,
        pages_per_block=pages_per_block,
    )
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


def _query_tiles(cu_q_lens, num_tokens: int, tile: int):
    """Split each sequence's new tokens into tiles of ``tile`` tokens that never mix sequences.

    Returns per tile its sequence [t], and its token indices [t, tile] with a validity mask. The
    tile count is static: ``cdiv(num_tokens, tile) + num_seqs`` bounds sum(cdiv(q_len, tile)).
    """
    num_seqs = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles_per_seq = C.cdiv(q_lens, tile)
    ends = jnp.cumsum(tiles_per_seq)
    num_tiles = C.cdiv(num_tokens, tile) + num_seqs
    t = jnp.arange(num_tiles)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), num_seqs - 1)
    first_token = cu_q_lens[seq] + (t - (ends - tiles_per_seq)[seq]) * tile
    tokens = first_token[:, None] + jnp.arange(tile)[None, :]
    live = (t < ends[-1])[:, None] & (tokens < cu_q_lens[seq + 1][:, None])
    return seq, jnp.where(live, tokens, 0), live


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "interpret", "pages_per_block", "tile"))
def ragged_prefill_attention(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *, scale: float,
                             k_scales=None, v_scales=None, sliding_window: int | None = None,
                             interpret: bool = False, pages_per_block: int = 2, tile: int = 8):
    """``pallas_kernels.ragged_prefill_attention`` in blockwise jnp (``interpret`` is ignored).

    Queries are grouped into tiles of up to ``tile`` consecutive tokens of one sequence, and KV
    pages are gathered once per tile rather than once per token: gathering was what a 512-token
    CPU step spent its time on (each token copied every visible key block). The work is still
    proportional to each tile's visible keys, never to every sequence's keys. A decode row in a
    mixed step fills a tile alone, so small tiles suit mixed steps and large ones long prompts.
    Defaults (tile 8, 2-page key blocks) from ``python -m benchmarks.cpu_attention``: several times
    faster than one tile per token across prompt/decode mixes (``benchmarks/results/cpu_attention-*.json``).
    """
    del interpret
    C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_tokens, num_heads, head_dim = q.shape
    kvh = k_pages.shape[0]
    group = num_heads // kvh
    kv_lengths = C.clip_lengths(kv_lengths, page_table, k_pages.shape[2])
    tile_seq, tokens, live = _query_tiles(cu_q_lens, num_tokens, tile)
    num_tiles = tile_seq.shape[0]
    _, positions, _ = token_positions(kv_lengths, cu_q_lens, num_tokens)
    q_pos = jnp.where(live, positions[tokens], -1)  # [t, tile]; -1 sees no key
    kv_len = jnp.where(live[:, 0], kv_lengths[tile_seq], 0)
    q_tiles = jnp.where(live[..., None, None], q[tokens], 0)  # [t, tile, heads, d]
    q_tiles = q_tiles.reshape(num_tiles, tile, kvh, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = _attend_blocks(
        q_tiles.reshape(num_tiles, kvh, tile * group, head_dim), k_pages, v_pages, k_scales, v_scales,
        page_table[tile_seq], jnp.repeat(q_pos, group, axis=1), kv_len,
        scale=scale, sliding_window=sliding_window, pages_per_block=pages_per_block,
    )
    out = out.reshape(num_tiles, kvh, tile, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_tiles * tile, num_heads, head_dim)
    flat = jnp.where(live, tokens, num_tokens).reshape(-1)  # dead slots scatter out of bounds: dropped
    result = jnp.zeros((num_tokens, num_heads, head_dim), out.dtype).at[flat].set(out, mode="drop")
    return result.astype(q.dtype)


__all__ = ["paged_decode_attention", "ragged_prefill_attention", "write_kv"]
