"""Paged KV caches for checking the kernels: random K/V in shuffled pages whose unused slots are poisoned.

Shared by the kernel tests (``tests/pallas_kernels``) and the on-device check of the GPU suite
(``benchmarks.kernel_correctness``). Each sequence's *logical* K/V is built first, then scattered with
numpy into shuffled physical pages whose every other slot holds NaN (float pages) or garbage values
with NaN scales (int8 pages); table entries past a sequence point at poisoned spare pages or are -1.
The logical arrays (``k_seq``/``v_seq``, float64) let an oracle share no paging code with the kernels.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def np_quantize_int8(x):
    """float64 numpy twin of ``pallas_kernels.quantize_int8`` (absmax over the last axis)."""
    amax = np.max(np.abs(x), axis=-1)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.round(x / scales[..., None]), -127, 127).astype(np.int8)
    return values, scales


def round_to(x, dtype: str):
    """Values as the kernel sees them after casting to ``dtype``, back in float64."""
    return np.asarray(x, np.float32).astype(jnp.dtype(dtype)).astype(np.float64)


@dataclasses.dataclass
class PagedKV:
    k_pages: jnp.ndarray
    v_pages: jnp.ndarray
    k_scales: jnp.ndarray | None
    v_scales: jnp.ndarray | None
    page_table: jnp.ndarray
    lengths: np.ndarray
    k_seq: list  # per sequence [len, kv_heads, d] float64: the values the kernel should use
    v_seq: list
    k_exact: list  # unquantised values (differs from k_seq for int8 only)
    v_exact: list
    used: np.ndarray  # bool [num_pages, page_size]: slots holding real tokens

    @property
    def scales(self) -> dict:
        if self.k_scales is None:
            return {}
        return {"k_scales": self.k_scales, "v_scales": self.v_scales}

    def pages(self):
        return self.k_pages, self.v_pages

    def cleaned(self) -> PagedKV:
        """Same case with every unused slot zeroed (NaN / garbage removed)."""
        used = jnp.asarray(self.used)[None, :, :, None]
        k = jnp.where(used, self.k_pages, jnp.zeros_like(self.k_pages))
        v = jnp.where(used, self.v_pages, jnp.zeros_like(self.v_pages))
        ks = vs = None
        if self.k_scales is not None:
            ks = jnp.where(used[..., 0], self.k_scales, 1.0)
            vs = jnp.where(used[..., 0], self.v_scales, 1.0)
        return dataclasses.replace(self, k_pages=k, v_pages=v, k_scales=ks, v_scales=vs)


def make_paged_kv(rng, lengths, *, num_kv_heads, head_dim, page_size, kv_dtype,
                  spare_pages=3, extra_table_cols=1) -> PagedKV:
    """Random K/V for sequences of ``lengths`` tokens in shuffled, NaN-poisoned pages."""
    lengths = np.asarray(lengths, np.int32)
    pages_per_seq = [cdiv(int(n), page_size) for n in lengths]
    num_pages = sum(pages_per_seq) + spare_pages
    order = rng.permutation(num_pages)
    spare = order[sum(pages_per_seq):]
    max_pages = max(max(pages_per_seq), 1) + extra_table_cols
    # Unused table entries point at poisoned spare pages or are -1: never read as data.
    filler = np.concatenate([spare, [-1]]) if len(spare) else np.array([-1])
    table = rng.choice(filler, size=(len(lengths), max_pages)).astype(np.int32)
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    quantized = kv_dtype == "int8"
    if quantized:
        pages = [rng.integers(-128, 128, size=shape).astype(np.int8) for _ in range(2)]
        scales = [np.full(shape[:3], np.nan, np.float32) for _ in range(2)]
    else:
        pages = [np.full(shape, np.nan, np.float32) for _ in range(2)]
        scales = [None, None]
    used = np.zeros((num_pages, page_size), bool)
    seqs = {"k_seq": [], "v_seq": [], "k_exact": [], "v_exact": []}
    next_page = 0
    for s, n in enumerate(lengths):
        phys = order[next_page:next_page + pages_per_seq[s]]
        next_page += pages_per_seq[s]
        table[s, :len(phys)] = phys
        tok = np.arange(n)
        page, offset = phys[tok // page_size], tok % page_size
        used[page, offset] = True
        for name, buf, sc in zip("kv", pages, scales, strict=False):
            exact = rng.normal(size=(n, num_kv_heads, head_dim)).astype(np.float32)
            if quantized:
                values, sx = np_quantize_int8(exact.astype(np.float64))
                buf[:, page, offset] = values.transpose(1, 0, 2)
                sc[:, page, offset] = sx.T
                seen = values.astype(np.float64) * sx[..., None]
            else:
                buf[:, page, offset] = exact.transpose(1, 0, 2)
                seen = round_to(exact, kv_dtype)
            seqs[f"{name}_seq"].append(seen)
            seqs[f"{name}_exact"].append(exact.astype(np.float64))
    store = np.int8 if quantized else jnp.dtype(kv_dtype)
    return PagedKV(
        k_pages=jnp.asarray(pages[0].astype(store)), v_pages=jnp.asarray(pages[1].astype(store)),
        k_scales=jnp.asarray(scales[0]) if quantized else None,
        v_scales=jnp.asarray(scales[1]) if quantized else None,
        page_table=jnp.asarray(table), lengths=lengths, used=used, **seqs)
