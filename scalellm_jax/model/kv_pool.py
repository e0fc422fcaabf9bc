"""One layer's paged KV pools as a pytree: what the paged backend reads and writes, the runner
allocates and donates, the host swap moves, and the memory accounting measures.

K and V pages are ``[num_kv_heads, num_pages, page_size, head_dim]``; int8 pools carry one float32
scale per (head, page, token), ``[num_kv_heads, num_pages, page_size]`` (the ``pallas_kernels.kv_cache``
scheme). Float pools have no scales: those fields are None, which JAX treats as an empty subtree, so
``jax.tree.map`` over a float layer touches exactly its two arrays and over an int8 layer its four.
The kernels keep taking plain arrays; this type lives on the model/engine side only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    k_pages: Any
    v_pages: Any
    k_scales: Any = None
    v_scales: Any = None

    def __post_init__(self):
        if (self.k_scales is None) != (self.v_scales is None):
            raise ValueError("LayerKV: k_scales and v_scales are given together or not at all")

    @property
    def quantized(self) -> bool:
        """int8 pages with per-token scales (else float pages, no scales)."""
        return self.k_scales is not None

    def scale_kwargs(self) -> dict:
        """The kernels' ``k_scales``/``v_scales`` keyword arguments (none for float pools)."""
        return {"k_scales": self.k_scales, "v_scales": self.v_scales} if self.quantized else {}
