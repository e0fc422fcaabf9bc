"""Test-case builders for the paged attention kernels, and an independent float64 attention.

The builders construct each sequence's *logical* K/V first, then scatter it with numpy into
shuffled physical pages whose every other slot is poisoned (NaN for float pages; garbage values
and NaN scales for int8 pages). The float64 oracle works on the logical arrays, so it shares no
paging or masking code with the kernels or the jnp references.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Compiled kernels on a GPU, the Pallas interpreter elsewhere. The sizes in the kernel tests are
# valid for both: Triton needs power-of-two block dims and dot dims >= 16 (page size >= 16).
INTERPRET = jax.default_backend() != "gpu"
PAGE = 16

# Relative error bounds ||out - ref|| / ||ref|| by query dtype (from the issue).
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
# int8 KV against the *unquantised* values: absmax/127 rounding of K and V (Gaussian data) gives
# ~0.5% RMS error per element and an observed 0.6-0.8% relative error on the attention output;
# 3e-2 leaves a ~4x margin. (Against the dequantised values the float tolerances apply.)
INT8_VS_EXACT_TOL = 3e-2
# (query dtype, kv dtype) per test parameter.
DTYPE_CASES = {
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "int8": ("float32", "int8"),
    "int8-bf16q": ("bfloat16", "int8"),
}

# (dtype case, GQA group, head_dim): every dtype x group at head_dim 64, and head_dim 128 paired
# with each dtype and each group once. Pairwise coverage at ~2/3 of the interpret-mode compile
# time of the full cross product.
MATRIX = [(d, g, 64) for d in ("float32", "bfloat16", "int8") for g in (1, 4, 8)] + [
    ("float32", 4, 128), ("bfloat16", 8, 128), ("int8", 1, 128)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def to_f64(x):
    """Host float64 copy; numpy casts bfloat16 itself (an eager jnp cast would compile)."""
    return np.asarray(x).astype(np.float64)


def rel_err(out, ref) -> float:
    out, ref = to_f64(out), to_f64(ref)
    assert np.all(np.isfinite(out)), "output has NaN/inf"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


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


def np_attention(q, k, v, positions, scale, sliding_window=None):
    """float64 causal GQA attention of queries at ``positions`` over one sequence's K/V.

    q ``[n, heads, d]``; k, v ``[len, kv_heads, d]``. A query with no visible key gives zeros.
    """
    q = np.asarray(q, np.float64)
    n, heads, d = q.shape
    group = heads // k.shape[1]
    out = np.zeros((n, heads, d))
    for i, p in enumerate(positions):
        lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
        hi = min(p + 1, k.shape[0])
        if hi <= lo:
            continue
        kk = np.repeat(k[lo:hi], group, axis=1)  # [m, heads, d]
        vv = np.repeat(v[lo:hi], group, axis=1)
        s = np.einsum("mhd,hd->hm", kk, q[i]) * scale
        w = np.exp(s - s.max(axis=-1, keepdims=True))
        w /= w.sum(axis=-1, keepdims=True)
        out[i] = np.einsum("hm,mhd->hd", w, vv)
    return out


def random_q(rng, num_tokens, num_heads, head_dim, dtype, nan_rows=0):
    """Random queries cast to ``dtype``; ``nan_rows`` NaN padding rows appended."""
    q = rng.normal(size=(num_tokens + nan_rows, num_heads, head_dim)).astype(np.float32)
    q[num_tokens:] = np.nan
    q = q.astype(jnp.dtype(dtype))
    return jnp.asarray(q), q.astype(np.float64)[:num_tokens]
