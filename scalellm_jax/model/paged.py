"""Paged-KV attention backend for the serving engine.

A step's tokens (prefill chunks of several sequences, decodes, or a mix) arrive flattened as one
row: ``tokens``/``positions`` are ``[1, num_tokens]``. Each layer's cache is a ``LayerKV``: its K and V
pools ``[num_kv_heads, num_pages, page_size, head_dim]`` (plus int8 scales when quantized), which the
backend scatters this step's keys/values into and then attends over through the page table.

``kernels`` picks the implementation: ``"pallas"`` (our GPU kernels) or ``"xla"`` (blockwise jnp
from ``pallas_kernels.xla``, the CPU path, whose cost follows the real sequence lengths).
``decode_only`` (static, chosen per shape bucket by the runner) routes pure-decode steps to the
decode kernel.

Tensor parallelism (``mesh`` with a ``tensor`` axis > 1): the kernels run under ``jax.shard_map``,
each device on its own query heads and its own slice of the KV pools (pools sharded over KV heads,
see ``kv_pool_spec``), so no device ever reads another's KV. When the KV heads do not divide over
the tensor axis every device keeps all of them and attends with all query heads (the pools are
then replicated, as in ``kv_head_shards``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import xla
from scalellm_jax.model.kv_pool import LayerKV
from scalellm_jax.parallel import TENSOR


def kv_pool_spec(num_kv_heads: int, mesh: Mesh | None) -> P:
    """How a KV pool ``[num_kv_heads, num_pages, page_size, ...]`` is laid out over ``mesh``."""
    if mesh is None or mesh.shape.get(TENSOR, 1) == 1 or num_kv_heads % mesh.shape[TENSOR]:
        return P()
    return P(TENSOR)


class PagedMeta(NamedTuple):
    """Per-step metadata (a pytree of device arrays), shared by every layer.

    slot_mapping [num_tokens]: flat KV slot of each token (negative = padding, not written).
    page_table [num_seqs, max_pages_per_seq]; kv_lengths [num_seqs] (tokens in cache after this
    step, 0 for padding rows); cu_q_lens [num_seqs + 1]: offsets of each sequence's new tokens.
    """

    slot_mapping: jax.Array
    page_table: jax.Array
    kv_lengths: jax.Array
    cu_q_lens: jax.Array


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    sliding_window: int | None
    scale: float
    kernels: str = "xla"
    decode_only: bool = False
    interpret: bool = False
    mesh: Mesh | None = None  # tensor parallel: run the kernels per device under shard_map

    def __post_init__(self):
        if self.kernels not in ("pallas", "xla"):
            raise ValueError(f"attention kernels must be 'pallas' or 'xla', got {self.kernels!r}")

    def __call__(self, q, k, v, positions, layer_cache: LayerKV, meta: PagedMeta):
        if self.mesh is None or self.mesh.shape.get(TENSOR, 1) == 1:
            return self._attend(q, k, v, layer_cache, meta)
        pool = kv_pool_spec(k.shape[2], self.mesh)
        heads = P(None, None, TENSOR) if pool == P(TENSOR) else P()  # [1, tokens, heads, head_dim]
        cache_specs = jax.tree.map(lambda _: pool, layer_cache)  # every pool array alike
        return jax.shard_map(
            self._attend, mesh=self.mesh, in_specs=(heads, heads, heads, cache_specs, P()),
            out_specs=(heads, cache_specs), check_vma=False,
        )(q, k, v, layer_cache, meta)

    def _attend(self, q, k, v, layer_cache: LayerKV, meta: PagedMeta):
        lib = pallas_kernels if self.kernels == "pallas" else xla
        interpret = {"interpret": self.interpret}
        # write_kv returns (k_pages, v_pages[, k_scales, v_scales]): the LayerKV field order
        layer_cache = LayerKV(*lib.write_kv(layer_cache.k_pages, layer_cache.v_pages, k[0], v[0], meta.slot_mapping,
                                            **layer_cache.scale_kwargs(), **interpret))
        common = dict(scale=self.scale, sliding_window=self.sliding_window, **layer_cache.scale_kwargs(), **interpret)
        pages = (layer_cache.k_pages, layer_cache.v_pages)
        if self.decode_only:
            out = lib.paged_decode_attention(q[0], *pages, meta.page_table, meta.kv_lengths, **common)
        else:
            out = lib.ragged_prefill_attention(q[0], *pages, meta.page_table, meta.kv_lengths, meta.cu_q_lens, **common)
        return out[None], layer_cache
