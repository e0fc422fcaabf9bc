"""Paged-KV attention kernels for GPU serving (Pallas), with pure-jnp references.

Public API (every function also takes ``interpret=`` for CPU testing):

* ``paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scale, k_scales=None,
  v_scales=None, sliding_window=None, interpret=False)``
* ``ragged_prefill_attention(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *, scale,
  k_scales=None, v_scales=None, sliding_window=None, interpret=False)``
* ``write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, *, k_scales=None, v_scales=None,
  interpret=False)``
* ``quantize_int8`` / ``dequantize_int8`` (per-token, per-head scales)
* ``reference``: the same three functions in plain jnp (the test oracle).
* ``xla``: blockwise jnp versions whose cost follows the real lengths (the CPU serving path).
* ``pallas_kernels.testing`` (numpy, imported on demand): poisoned paged caches for checking them.

KV layout: pages ``[num_kv_heads, num_pages, page_size, head_dim]``; int8 scales
``[num_kv_heads, num_pages, page_size]`` float32. This package imports nothing but jax.
"""

from pallas_kernels import reference, xla
from pallas_kernels.kv_cache import dequantize_int8, quantize_int8, write_kv
from pallas_kernels.paged_attention import paged_decode_attention
from pallas_kernels.ragged_attention import ragged_prefill_attention

__all__ = [
    "dequantize_int8",
    "paged_decode_attention",
    "quantize_int8",
    "ragged_prefill_attention",
    "reference",
    "xla",
    "write_kv",
]
