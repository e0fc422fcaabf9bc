"""Ragged prefill attention: new tokens of several sequences, concatenated, over a paged cache.

Sequence ``s`` contributes tokens ``cu_q_lens[s]:cu_q_lens[s+1]`` of ``q``; they are its *last*
``q_len`` tokens, so query ``i`` sits at position ``kv_len - q_len + i`` and sees keys up to and
including that position (and, with a sliding window ``W``, not before ``position - W + 1``).
This one kernel serves plain prefill (``q_len == kv_len``), chunked prefill over a cached prefix
(``q_len < kv_len``) and mixed prefill + decode batches (``q_len == 1`` rows). The new tokens'
K/V must already be written to the pages (``write_kv``).

GPU design (Pallas Triton lowering; see ``_common`` for the backend choice):

* **Tiles.** Each sequence's tokens are cut into tiles of ``block_q`` tokens; a tile never spans
  two sequences. The tile list is computed on device from ``cu_q_lens`` (no host sync) and has a
  static upper bound ``cdiv(total_tokens, block_q) + num_seqs``; surplus tiles exit at once.
  Grid: ``(tiles, num_kv_heads)``, tiles sorted by descending KV length so the longest run
  first.
* **GQA rows.** A tile's matmul rows are its ``block_q`` tokens x the ``group`` query heads of one
  KV head (``block_q * group`` rows, 128 by default), so each K/V tile is loaded once for the
  whole group and the MMA rows are all real queries.
* **Flash attention.** KV is walked in tiles of ``pages_per_block`` whole pages with an online
  softmax. Tiles that are fully masked for every row (after the causal diagonal, before the
  sliding window) are never visited: the loop bounds come from the tile's first/last positions.
  Tiles fully visible to every row skip the mask arithmetic; only the diagonal / window-edge
  tiles are masked.
* **Unaligned tiles.** A tile starts at an arbitrary token offset. Loads and stores are masked
  to the tile's rows, and a tile near the end of ``q`` is shifted back so that no address is out
  of bounds. Output rows that belong to no sequence (batch padding) stay zero: the output buffer
  is a zero array aliased into the kernel.
* **int8 KV** is dequantised in-kernel exactly as in the decode kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as C


def _prefill_kernel(meta_ref, table_ref, q_ref, k_ref, v_ref, *refs, scale, page_size,
                    pages_per_block, block_q, sliding_window, quantized):
    """One (tile, kv head) program. Refs (block views):

    meta_ref [4] int32: first row, end row (exclusive), position offset (position = row +
    offset), kv length of the tile's sequence; table_ref [max_pages] int32 pages of that
    sequence; q_ref / o_ref [rows, group, head_dim] (all rows, this kv head);
    k_ref/v_ref [num_pages, page_size, head_dim]; optional ks_ref/vs_ref [num_pages, page_size].
    """
    if quantized:
        ks_ref, vs_ref, _, o_ref = refs
    else:
        ks_ref = vs_ref = None
        _, o_ref = refs
    num_rows, group, head_dim = q_ref.shape
    block_tokens = pages_per_block * page_size
    rows = block_q * group
    row_start, row_end, offset, kv_len = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]

    # Shift a tile that would run past the last row back; its extra rows are masked.
    load_start = jnp.minimum(row_start, num_rows - block_q)
    tok = load_start + jnp.arange(block_q)
    tok_ok = (tok >= row_start) & (tok < row_end)
    q = C.load(q_ref.at[pl.ds(load_start, block_q)], mask=tok_ok[:, None, None], other=0.0)
    q = q.reshape(rows, head_dim)
    mma_dtype = q.dtype
    row_tok = load_start + jnp.arange(rows) // group
    row_ok = (row_tok >= row_start) & (row_tok < row_end)
    row_pos = row_tok + offset

    # KV tiles to visit, and the sub-range that is visible to every row (no mask needed).
    pos_lo = row_start + offset
    pos_hi = row_end - 1 + offset
    lo_blk = 0
    if sliding_window is not None:
        lo_blk = jnp.maximum(pos_lo - sliding_window + 1, 0) // block_tokens
    hi_blk = jnp.where(row_end > row_start, C.cdiv(pos_hi + 1, block_tokens), 0)
    full_lo = lo_blk
    if sliding_window is not None:
        full_lo = C.cdiv(pos_hi - sliding_window + 1, block_tokens)
    full_hi = (pos_lo + 1) // block_tokens
    b1 = jnp.clip(full_lo, lo_blk, hi_blk)
    b2 = jnp.clip(full_hi, b1, hi_blk)

    def body(j, carry, masked):
        pages = table_ref[pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_tokens, head_dim).astype(mma_dtype)
        v = v_ref[pages].reshape(block_tokens, head_dim)
        logits = C.dot_nt(q, k) * (scale * C.LOG2_E)
        if quantized:
            logits = logits * ks_ref[pages].reshape(1, block_tokens)
        valid = None
        if masked:
            kpos = j * block_tokens + jnp.arange(block_tokens)
            kv_ok = kpos < kv_len
            valid = (kpos[None, :] <= row_pos[:, None]) & kv_ok[None, :] & row_ok[:, None]
            if sliding_window is not None:
                valid = valid & (kpos[None, :] > row_pos[:, None] - sliding_window)
        m_new, l_new, alpha, p = C.softmax_update(carry, logits, valid)
        if quantized:
            vs = vs_ref[pages].reshape(block_tokens)
            if masked:
                vs = jnp.where(kv_ok, vs, 0.0)
            p = p * vs[None, :]
        elif masked:
            v = jnp.where(kv_ok[:, None], v, jnp.zeros_like(v))
        pv = C.dot_nn(p.astype(mma_dtype), v.astype(mma_dtype))
        return m_new, l_new, alpha[:, None] * carry[2] + pv

    carry = (jnp.full((rows,), C.NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, head_dim), jnp.float32))
    masked_body = functools.partial(body, masked=True)
    carry = jax.lax.fori_loop(lo_blk, b1, masked_body, carry)
    carry = jax.lax.fori_loop(b1, b2, functools.partial(body, masked=False), carry)
    _, l_sum, acc = jax.lax.fori_loop(b2, hi_blk, masked_body, carry)
    out = acc / jnp.where(l_sum > 0, l_sum, 1.0)[:, None]
    out = out.reshape(block_q, group, head_dim).astype(o_ref.dtype)
    C.store(o_ref.at[pl.ds(load_start, block_q)], out, mask=tok_ok[:, None, None])


def tile_metadata(kv_lengths, cu_q_lens, num_tokens: int, block_q: int):
    """Per-tile ``[first row, end row, position offset, kv length]`` and sequence index.

    Static tile count ``cdiv(num_tokens, block_q) + num_seqs`` bounds the real one; surplus
    tiles get an empty row range.
    """
    num_seqs = kv_lengths.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles_per_seq = C.cdiv(jnp.maximum(q_lens, 0), block_q)
    cum = jnp.cumsum(tiles_per_seq)
    t = jnp.arange(C.cdiv(num_tokens, block_q) + num_seqs)
    seq = jnp.minimum(jnp.searchsorted(cum, t, side="right"), num_seqs - 1)
    start = cu_q_lens[seq] + (t - (cum[seq] - tiles_per_seq[seq])) * block_q
    live = t < cum[-1]
    end = jnp.where(live, jnp.minimum(start + block_q, cu_q_lens[seq + 1]), 0)
    start = jnp.where(live, start, 0)
    offset = kv_lengths[seq] - q_lens[seq] - cu_q_lens[seq]
    meta = jnp.stack([start, end, offset, kv_lengths[seq]], axis=1).astype(jnp.int32)
    return meta, seq


@functools.partial(jax.jit, static_argnames=(
    "scale", "sliding_window", "interpret", "block_q", "pages_per_block", "num_warps",
    "num_stages"))
def ragged_prefill_attention(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *,
                             scale: float, k_scales=None, v_scales=None,
                             sliding_window: int | None = None, interpret: bool = False,
                             block_q: int | None = None, pages_per_block: int | None = None,
                             num_warps: int | None = None, num_stages: int = 2):
    """Causal attention of ragged new tokens over a paged KV cache.

    Args:
      q: ``[total_tokens, num_heads, head_dim]``; rows past ``cu_q_lens[-1]`` are padding and
        get zeros.
      k_pages, v_pages, k_scales, v_scales: as in ``paged_decode_attention``.
      page_table: int32 ``[num_seqs, max_pages_per_seq]``.
      kv_lengths: int32 ``[num_seqs]`` total tokens per sequence, including the new ones.
        Lengths beyond a row's capacity, ``max_pages_per_seq * page_size``, are clipped to it
        (so no program reads past its page-table row), as in ``reference`` and ``xla``. The new
        tokens stay the *last* ``q_len`` of the clipped length: query ``i`` sits at position
        ``min(kv_len, capacity) - q_len + i``; queries at a negative position see no key (zeros).
      cu_q_lens: int32 ``[num_seqs + 1]`` offsets of each sequence's new tokens in ``q``
        (non-decreasing, ``cu_q_lens[0] == 0``; empty sequences are allowed).
      scale, sliding_window, interpret: as in ``paged_decode_attention``.
      block_q, pages_per_block, num_warps, num_stages: tuning knobs (None = heuristic).

    Returns:
      ``[total_tokens, num_heads, head_dim]`` in ``q.dtype``.
    """
    quantized = C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    num_seqs, max_pages = page_table.shape
    if num_heads % num_kv_heads or k_pages.shape[3] != head_dim:
        raise ValueError(f"q {q.shape} does not match pages {k_pages.shape}")
    if kv_lengths.shape != (num_seqs,) or cu_q_lens.shape != (num_seqs + 1,):
        raise ValueError("kv_lengths must be [num_seqs] and cu_q_lens [num_seqs + 1]")
    C.check_triton_dims(interpret, head_dim=head_dim, page_size=page_size)
    group = num_heads // num_kv_heads
    group_padded = C.next_pow2(group)
    if block_q is None:  # 128 matmul rows (tokens x group), at least 16 for the MMA.
        block_q = max(1, 128 // group_padded)
    block_q = max(C.prev_pow2(block_q), C.cdiv(16, group_padded))
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    pages_per_block = min(C.prev_pow2(pages_per_block), C.next_pow2(max_pages))
    if num_warps is None:
        num_warps = 8 if block_q * group_padded * head_dim >= 128 * 128 else 4

    kv_lengths = C.clip_lengths(kv_lengths, page_table, page_size)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    meta, seq = tile_metadata(kv_lengths, cu_q_lens, num_tokens, block_q)
    # Launch the tiles with the most KV to visit first, to shorten the tail of the grid.
    work = jnp.where(meta[:, 1] > meta[:, 0], meta[:, 1] + meta[:, 2], -1)
    order = jnp.argsort(-work, stable=True)
    meta, seq = meta[order], seq[order]
    table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
    table = jnp.pad(table, ((0, 0), (0, -max_pages % pages_per_block)))[seq]
    num_rows = max(num_tokens, block_q)
    qg = C.pad_heads(q, num_kv_heads, group_padded)
    qg = jnp.pad(qg, ((0, num_rows - num_tokens), (0, 0), (0, 0), (0, 0)))

    kernel = functools.partial(
        _prefill_kernel, scale=float(scale), page_size=page_size,
        pages_per_block=pages_per_block, block_q=block_q, sliding_window=sliding_window,
        quantized=quantized)
    rows_spec = pl.BlockSpec((num_rows, None, group_padded, head_dim), lambda t, h: (0, h, 0, 0))
    page_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda t, h: (h, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, num_pages, page_size), lambda t, h: (h, 0, 0))
    in_specs = [pl.BlockSpec((None, 4), lambda t, h: (t, 0)),
                pl.BlockSpec((None, table.shape[1]), lambda t, h: (t, 0)),
                rows_spec, page_spec, page_spec]
    args = [meta, table, qg, k_pages, v_pages]
    if quantized:
        in_specs += [scale_spec, scale_spec]
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    # Rows no tile writes (batch padding) must read as zeros, not uninitialised memory.
    in_specs.append(rows_spec)
    args.append(jnp.zeros(qg.shape, q.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(meta.shape[0], num_kv_heads),
        in_specs=in_specs,
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases={len(args) - 1: 0},
        interpret=interpret,
        compiler_params=C.compiler_params(interpret, num_warps, num_stages),
        name="ragged_prefill_attention",
    )(*args)
    out = out[:num_tokens, :, :group]
    return out.reshape(num_tokens, num_heads, head_dim)
