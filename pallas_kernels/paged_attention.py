"""Paged decode attention: one new query token per sequence against its paged KV cache.

GPU design (Pallas Triton lowering; see ``_common`` for why Triton and not Mosaic GPU):

* **GQA grouping.** One program handles *all* query heads that share a KV head, so every K/V
  byte is read once per KV head rather than once per query head. With Mixtral's 4:1 ratio the
  group is 4 rows. Tensor-core matmuls need >= 16 rows, and padding 4 rows to 16 would waste
  3/4 of the MMA, so small groups (< 16) use a CUDA-core multiply-reduce in float32
  (``q[:, None, :] * k[None]`` summed over head_dim) where every lane is a real head. Decode is
  bandwidth bound, and that costs ``group`` FMAs per loaded K/V element, well within the
  CUDA-core budget at HBM speed. Groups >= 16 use ``dot`` (MMA). ``use_mma=True`` forces the
  padded-MMA variant (for benchmarking the trade-off).
* **Whole pages.** Each loop step gathers ``pages_per_block`` complete pages through the page
  table (``k_ref[page_ids]``), i.e. contiguous ``page_size * head_dim`` runs.
* **Flash-decoding.** The KV range of a sequence is cut into ``num_splits`` partitions handled by
  different programs (grid ``(num_seqs, num_kv_heads, num_splits)``); each writes an
  unnormalised partial output plus its running max and sum, and a cheap jnp combine step merges
  them. The default split count aims for ~``TARGET_PROGRAMS`` programs so that a few long
  sequences still fill the GPU. Pages past ``length`` (and before the sliding window) are not
  loaded at all: the loop bounds are data dependent.
* **int8 KV** is dequantised inside the kernel: the per-token K scale multiplies the logits
  column, the per-token V scale multiplies the probability column, so the matmul sees raw int8
  values cast to the query dtype.

Sequences with ``length == 0`` (bucket padding) produce zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as C


def _decode_kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, *refs, scale, page_size,
                   pages_per_block, pages_per_split, sliding_window, use_mma, quantized):
    """One (sequence, kv head, split) program. Refs (block views):

    lengths_ref [1] int32; table_ref [pages_per_split] int32 (physical page ids of this split);
    q_ref [group, head_dim]; k_ref/v_ref [num_pages, page_size, head_dim] (this kv head);
    optional ks_ref/vs_ref [num_pages, page_size]; outputs o_ref [group, head_dim] f32 and
    m_ref/l_ref [group] f32.
    """
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = refs
    else:
        ks_ref = vs_ref = None
        o_ref, m_ref, l_ref = refs
    split = pl.program_id(2)
    length = lengths_ref[0]
    block_tokens = pages_per_block * page_size
    split_start = split * (pages_per_split * page_size)
    group, head_dim = q_ref.shape
    mma_dtype = q_ref.dtype

    lo_tok = split_start
    if sliding_window is not None:
        lo_tok = jnp.maximum(lo_tok, length - sliding_window)
    hi_tok = jnp.minimum(split_start + pages_per_split * page_size, length)
    lo_blk = jnp.maximum(lo_tok - split_start, 0) // block_tokens
    hi_blk = C.cdiv(jnp.maximum(hi_tok - split_start, 0), block_tokens)

    q = q_ref[...]
    if use_mma:
        logit_scale = scale * C.LOG2_E
    else:
        q = q.astype(jnp.float32) * (scale * C.LOG2_E)

    def body(j, carry):
        pages = table_ref[pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_tokens, head_dim)
        v = v_ref[pages].reshape(block_tokens, head_dim)
        pos = split_start + j * block_tokens + jnp.arange(block_tokens)
        valid = pos < length
        if sliding_window is not None:
            valid = valid & (pos >= length - sliding_window)
        if use_mma:
            logits = C.dot_nt(q, k.astype(mma_dtype)) * logit_scale
        else:
            logits = jnp.sum(q[:, None, :] * k.astype(jnp.float32)[None, :, :], axis=-1)
        if quantized:
            logits = logits * ks_ref[pages].reshape(1, block_tokens)
        m_new, l_new, alpha, p = C.softmax_update(carry, logits, valid[None, :])
        if quantized:
            p = p * jnp.where(valid, vs_ref[pages].reshape(block_tokens), 0.0)[None, :]
        else:
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
        if use_mma:
            pv = C.dot_nn(p.astype(mma_dtype), v.astype(mma_dtype))
        else:
            pv = jnp.sum(p[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)
        return m_new, l_new, alpha[:, None] * carry[2] + pv

    init = (jnp.full((group,), C.NEG_INF, jnp.float32), jnp.zeros((group,), jnp.float32),
            jnp.zeros((group, head_dim), jnp.float32))
    m, l_sum, acc = jax.lax.fori_loop(lo_blk, hi_blk, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l_sum


def _choose_blocks(num_seqs, num_kv_heads, max_pages, page_size, head_dim, group_padded,
                   use_mma, pages_per_block, num_splits):
    """Static tiling: pages per loop step and the flash-decoding split (all powers of two)."""
    if pages_per_block is None:
        # MMA tiles: 64 tokens. Multiply-reduce tiles: bound the [group, tokens, head_dim]
        # float32 temporary to 8K elements, 64 registers per thread at 4 warps: spilling to
        # local memory would cost far more than the extra loop trips of a smaller tile.
        tokens = 64 if use_mma else max(page_size, 8192 // (group_padded * head_dim))
        pages_per_block = max(1, tokens // page_size)
    pages_per_block = min(C.prev_pow2(pages_per_block), C.next_pow2(max_pages))
    num_blocks = C.cdiv(max_pages, pages_per_block)
    if num_splits is None:
        num_splits = C.cdiv(C.TARGET_PROGRAMS, num_seqs * num_kv_heads)
    num_splits = max(1, min(num_splits, num_blocks))
    blocks_per_split = C.next_pow2(C.cdiv(num_blocks, num_splits))
    pages_per_split = blocks_per_split * pages_per_block
    return pages_per_block, pages_per_split, C.cdiv(max_pages, pages_per_split)


@functools.partial(jax.jit, static_argnames=(
    "scale", "sliding_window", "interpret", "pages_per_block", "num_splits", "use_mma",
    "num_warps", "num_stages"))
def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scale: float,
                           k_scales=None, v_scales=None, sliding_window: int | None = None,
                           interpret: bool = False, pages_per_block: int | None = None,
                           num_splits: int | None = None, use_mma: bool | None = None,
                           num_warps: int = 4, num_stages: int = 2):
    """Decode attention over a paged KV cache.

    Args:
      q: ``[num_seqs, num_heads, head_dim]``, the newest token of each sequence (it sits at
        position ``lengths - 1`` and its K/V must already be written to the cache).
      k_pages, v_pages: ``[num_kv_heads, num_pages, page_size, head_dim]``; float, or int8 with
        ``k_scales``/``v_scales`` ``[num_kv_heads, num_pages, page_size]`` float32
        (see ``pallas_kernels.kv_cache``). Query head ``h`` uses KV head
        ``h // (num_heads // num_kv_heads)``.
      page_table: int32 ``[num_seqs, max_pages_per_seq]`` logical -> physical page; entries past
        a sequence's length are ignored (clipped into range, never read as data).
      lengths: int32 ``[num_seqs]`` valid tokens per sequence (0 for padding rows -> zeros).
        Lengths beyond a row's capacity, ``max_pages_per_seq * page_size``, are clipped to it
        (so no program reads past its page-table row), as in ``reference`` and ``xla``.
      scale: softmax scale (usually ``head_dim ** -0.5``).
      sliding_window: if set, the query at position ``p`` sees keys ``p - W < j <= p``.
      interpret: run the kernel with the Pallas interpreter (CPU tests).
      pages_per_block, num_splits, use_mma, num_warps, num_stages: tuning knobs; None picks a
        heuristic (see module docstring).

    Returns:
      ``[num_seqs, num_heads, head_dim]`` in ``q.dtype``.
    """
    quantized = C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    if num_heads % num_kv_heads or k_pages.shape[3] != head_dim:
        raise ValueError(f"q {q.shape} does not match pages {k_pages.shape}")
    if page_table.shape[0] != num_seqs or lengths.shape != (num_seqs,):
        raise ValueError("page_table and lengths must have one row per sequence")
    C.check_triton_dims(interpret, head_dim=head_dim, page_size=page_size)
    group = num_heads // num_kv_heads
    if use_mma is None:
        use_mma = C.next_pow2(group) >= 16
    group_padded = max(16, C.next_pow2(group)) if use_mma else C.next_pow2(group)
    max_pages = page_table.shape[1]
    pages_per_block, pages_per_split, num_splits = _choose_blocks(
        num_seqs, num_kv_heads, max_pages, page_size, head_dim, group_padded, use_mma,
        pages_per_block, num_splits)

    table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
    table = jnp.pad(table, ((0, 0), (0, num_splits * pages_per_split - max_pages)))
    table = table.reshape(num_seqs, num_splits, pages_per_split)
    qg = C.pad_heads(q, num_kv_heads, group_padded)

    kernel = functools.partial(
        _decode_kernel, scale=float(scale), page_size=page_size,
        pages_per_block=pages_per_block, pages_per_split=pages_per_split,
        sliding_window=sliding_window, use_mma=use_mma, quantized=quantized)
    page_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, num_pages, page_size), lambda b, h, s: (h, 0, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, s: (b,)),
        pl.BlockSpec((None, None, pages_per_split), lambda b, h, s: (b, s, 0)),
        pl.BlockSpec((None, None, group_padded, head_dim), lambda b, h, s: (b, h, 0, 0)),
        page_spec, page_spec,
    ]
    args = [C.clip_lengths(lengths, page_table, page_size), table, qg, k_pages, v_pages]
    if quantized:
        in_specs += [scale_spec, scale_spec]
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    part = (num_seqs, num_kv_heads, num_splits, group_padded)
    o, m, l_sum = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, group_padded, head_dim),
                         lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group_padded), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, group_padded), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        interpret=interpret,
        compiler_params=C.compiler_params(interpret, num_warps, num_stages),
        name="paged_decode_attention",
    )(*args)
    out = combine_splits(o, m, l_sum)[:, :, :group]
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


def combine_splits(o, m, l_sum):
    """Merge flash-decoding partials along axis 2.

    ``o [..., splits, rows, d]`` are unnormalised outputs, ``m``/``l_sum`` ``[..., splits, rows]``
    the base-2 running max and sum of each split. Rows that saw no key at all get zeros.
    """
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_max)
    l_tot = jnp.sum(l_sum * w, axis=2)
    acc = jnp.sum(o * w[..., None], axis=2)
    return acc / jnp.where(l_tot > 0, l_tot, 1.0)[..., None]
