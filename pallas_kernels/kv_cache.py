"""Writing new tokens into the paged KV cache, with optional int8 quantisation.

Layout
------
* ``k_pages``, ``v_pages``: ``[num_kv_heads, num_pages, page_size, head_dim]`` (float, or int8).
* ``slot_mapping``: int32 ``[num_tokens]``; token ``i`` goes to flat slot
  ``page * page_size + offset``. A negative (or out-of-range) slot marks a padding token of a
  bucketed batch: nothing is written for it.
* int8 scales: ``k_scales``, ``v_scales`` float32 ``[num_kv_heads, num_pages, page_size]``, one
  scale per (head, token) -- the same layout as ``jax.experimental.pallas.ops.gpu.paged_attention``
  -- so ``dequant[h, p, s, :] = pages[h, p, s, :] * scales[h, p, s]``. Symmetric absmax
  quantisation: ``scale = max|x| / 127`` over head_dim, values rounded to ``[-127, 127]``, so the
  round-trip error of each element is at most ``scale / 2 = max|x| / 254``.

Implementation
--------------
``write_kv`` is a jnp scatter (``.at[].set(mode="drop")``) on a flat ``[heads, slots, d]`` view;
there is no Pallas write kernel. Under ``jax.jit`` with the pages donated, XLA performs the
scatter in place, touching only the written rows, which is all a custom kernel could do. It is a
pure function: callers donate the old pages and keep the returned ones. If two tokens map to the
same slot, which one wins is unspecified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as C

INT8_MAX = 127.0


def quantize_int8(x):
    """Symmetric per-vector int8 quantisation over the last axis.

    Returns ``(values int8 [..., d], scales float32 [...])`` with ``x ~= values * scales[...,
    None]``. All-zero vectors get scale 1 (no division by zero).
    """
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scales = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    values = jnp.clip(jnp.round(x / scales[..., None]), -INT8_MAX, INT8_MAX)
    return values.astype(jnp.int8), scales


def dequantize_int8(values, scales, dtype=jnp.float32):
    """Inverse of ``quantize_int8``: ``values * scales[..., None]`` in ``dtype``."""
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def _scatter(pages, new, slots):
    """Write ``new [tokens, heads, ...]`` at flat ``slots`` of ``pages [heads, P, S, ...]``."""
    heads, num_pages, page_size = pages.shape[:3]
    flat = pages.reshape(heads, num_pages * page_size, *pages.shape[3:])
    flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, *, k_scales=None, v_scales=None,
             interpret: bool = False):
    """Scatter new tokens' K/V into their page slots.

    Args:
      k_pages, v_pages: ``[num_kv_heads, num_pages, page_size, head_dim]``.
      k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``.
      slot_mapping: int32 ``[num_tokens]``; negative = padding token, not written.
      k_scales, v_scales: required iff the pages are int8; then the new tokens are quantised
        on write (see module docstring).
      interpret: accepted for API uniformity; the scatter is plain jnp and needs no interpreter.

    Returns:
      ``(k_pages, v_pages)`` for float pages, ``(k_pages, v_pages, k_scales, v_scales)`` for
      int8 pages.
    """
    del interpret
    quantized = C.check_pages(k_pages, v_pages, k_scales, v_scales)
    if k_new.shape != v_new.shape or k_new.shape[1:] != (k_pages.shape[0], k_pages.shape[3]):
        raise ValueError(f"k_new/v_new must be [tokens, {k_pages.shape[0]}, "
                         f"{k_pages.shape[3]}], got {k_new.shape} and {v_new.shape}")
    num_slots = k_pages.shape[1] * k_pages.shape[2]
    slots = slot_mapping.astype(jnp.int32)
    # Negative indices would wrap around in jnp; send them past the end, where mode="drop"
    # discards them.
    slots = jnp.where(slots >= 0, slots, num_slots)
    if not quantized:
        return _scatter(k_pages, k_new, slots), _scatter(v_pages, v_new, slots)
    kq, ks = quantize_int8(k_new)
    vq, vs = quantize_int8(v_new)
    return (_scatter(k_pages, kq, slots), _scatter(v_pages, vq, slots),
            _scatter(k_scales, ks, slots), _scatter(v_scales, vs, slots))
