"""Pure-jnp references with the same signatures as the Pallas kernels.

These are the ground truth for the kernel tests and the ``xla`` attention backend on CPU. They
favour clarity over speed: pages are gathered into dense per-sequence K/V (dequantised to
float32), attention is computed in float32 with full-precision matmuls, and masked keys get
exactly zero weight (``where`` on the weights and on V, so NaN in unused pages or padding slots
never reaches an output). Rows that see no key (``length == 0``, padding tokens) are zero.
Lengths are clipped to a page-table row's capacity as in the kernels (``_common.clip_lengths``).
``interpret`` is accepted and ignored so callers can switch implementations without changing
arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as C
from pallas_kernels import kv_cache as _kv_cache

_HIGHEST = jax.lax.Precision.HIGHEST


def gather_pages(pages, page_table, scales=None):
    """``[num_kv_heads, num_pages, page_size, d]`` -> dense float32 ``[num_seqs, num_kv_heads,
    max_pages * page_size, d]`` following ``page_table`` (entries clipped into range)."""
    num_kv_heads, num_pages, page_size, head_dim = pages.shape
    table = jnp.clip(page_table, 0, num_pages - 1)
    num_seqs, max_pages = table.shape
    dense = pages[:, table].astype(jnp.float32)  # [kvh, seqs, max_pages, page_size, d]
    if scales is not None:
        dense = dense * scales[:, table][..., None]
    dense = jnp.moveaxis(dense, 0, 1)
    return dense.reshape(num_seqs, num_kv_heads, max_pages * page_size, head_dim)


def _weights(logits, mask):
    """Softmax over the last axis restricted to ``mask``; all-masked rows give zero weights."""
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "interpret"))
def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scale: float,
                           k_scales=None, v_scales=None, sliding_window: int | None = None,
                           interpret: bool = False):
    """Reference for ``pallas_kernels.paged_decode_attention`` (same arguments and result)."""
    del interpret
    C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    lengths = C.clip_lengths(lengths, page_table, k_pages.shape[2])
    k = gather_pages(k_pages, page_table, k_scales)  # [b, kvh, L, d]
    v = gather_pages(v_pages, page_table, v_scales)
    pos = jnp.arange(k.shape[2])
    mask = pos[None, :] < lengths[:, None]  # [b, L]
    if sliding_window is not None:
        mask &= pos[None, :] >= (lengths - sliding_window)[:, None]
    qg = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, -1, head_dim)
    logits = jnp.einsum("bkgd,bkld->bkgl", qg, k, precision=_HIGHEST) * scale
    w = _weights(logits, mask[:, None, None, :])
    v = jnp.where(mask[:, None, :, None], v, 0.0)
    out = jnp.einsum("bkgl,bkld->bkgd", w, v, precision=_HIGHEST)
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


def token_positions(kv_lengths, cu_q_lens, num_tokens: int):
    """Per flattened query token: (sequence index, absolute position, belongs-to-a-sequence).

    Tokens past ``cu_q_lens[-1]`` are padding (``valid`` False, sequence clipped to the last).
    """
    num_seqs = kv_lengths.shape[0]
    tok = jnp.arange(num_tokens)
    seq = jnp.searchsorted(cu_q_lens[1:], tok, side="right")
    valid = tok < cu_q_lens[num_seqs]
    seq = jnp.minimum(seq, num_seqs - 1)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = kv_lengths[seq] - q_lens[seq] + (tok - cu_q_lens[seq])
    return seq, pos, valid


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "interpret"))
def ragged_prefill_attention(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *,
                             scale: float, k_scales=None, v_scales=None,
                             sliding_window: int | None = None, interpret: bool = False):
    """Reference for ``pallas_kernels.ragged_prefill_attention`` (same arguments and result).

    Every token is scored against the keys of *all* sequences and masked down to its own, which
    is simple and memory-hungry (``tokens x heads x seqs x max_len`` logits): fine for tests and
    CPU serving, not meant for large GPU batches.
    """
    del interpret
    C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    num_seqs = page_table.shape[0]
    kv_lengths = C.clip_lengths(kv_lengths, page_table, k_pages.shape[2])
    k = gather_pages(k_pages, page_table, k_scales)  # [s, kvh, L, d]
    v = gather_pages(v_pages, page_table, v_scales)
    max_len = k.shape[2]
    seq, pos, valid = token_positions(kv_lengths, cu_q_lens, num_tokens)
    kpos = jnp.arange(max_len)
    mask = (seq[:, None, None] == jnp.arange(num_seqs)[None, :, None])  # [t, s, 1]
    mask &= kpos[None, None, :] <= pos[:, None, None]
    mask &= kpos[None, None, :] < kv_lengths[None, :, None]
    if sliding_window is not None:
        mask &= kpos[None, None, :] > (pos - sliding_window)[:, None, None]
    mask &= valid[:, None, None]
    mask = mask.reshape(num_tokens, 1, 1, num_seqs * max_len)
    k = jnp.moveaxis(k, 1, 0).reshape(num_kv_heads, num_seqs * max_len, head_dim)
    v = jnp.moveaxis(v, 1, 0).reshape(num_kv_heads, num_seqs * max_len, head_dim)
    v = jnp.where((kpos[None, :] < kv_lengths[:, None]).reshape(1, -1, 1), v, 0.0)
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, -1, head_dim)
    logits = jnp.einsum("tkgd,kjd->tkgj", qg, k, precision=_HIGHEST) * scale
    w = _weights(logits, mask)
    out = jnp.einsum("tkgj,kjd->tkgd", w, v, precision=_HIGHEST)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, *, k_scales=None, v_scales=None,
             interpret: bool = False):
    """Reference for ``pallas_kernels.write_kv``: same result, indexed by (page, offset)."""
    del interpret
    quantized = C.check_pages(k_pages, v_pages, k_scales, v_scales)
    num_pages, page_size = k_pages.shape[1:3]
    ok = (slot_mapping >= 0) & (slot_mapping < num_pages * page_size)
    page = jnp.where(ok, slot_mapping // page_size, num_pages)  # out of range -> dropped
    offset = jnp.where(ok, slot_mapping % page_size, 0)

    def put(pages, new):
        return pages.at[:, page, offset].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype),
                                             mode="drop")

    if not quantized:
        return put(k_pages, k_new), put(v_pages, v_new)
    kq, ks = _kv_cache.quantize_int8(k_new)
    vq, vs = _kv_cache.quantize_int8(v_new)
    return put(k_pages, kq), put(v_pages, vq), put(k_scales, ks), put(v_scales, vs)
