"""Test-case settings for the paged attention kernels, and an independent float64 attention.

The poisoned paged caches come from ``pallas_kernels.testing`` (shared with the GPU suite's on-device
check). The float64 oracle works on their logical arrays, so it shares no paging or masking code with
the kernels or the jnp references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.testing import PagedKV, cdiv, make_paged_kv, np_quantize_int8, round_to  # noqa: F401

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


def to_f64(x):
    """Host float64 copy; numpy casts bfloat16 itself (an eager jnp cast would compile)."""
    return np.asarray(x).astype(np.float64)


def rel_err(out, ref) -> float:
    out, ref = to_f64(out), to_f64(ref)
    assert np.all(np.isfinite(out)), "output has NaN/inf"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


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
