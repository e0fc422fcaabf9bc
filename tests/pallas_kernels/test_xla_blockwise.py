"""The blockwise jnp (``xla`` backend) attention against the jnp reference and float64 numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference, xla
from tests.pallas_kernels.paged_cases import (
    DTYPE_CASES,
    TOL,
    make_paged_kv,
    np_attention,
    random_q,
    rel_err,
)

PAGE = 4
DECODE_LENGTHS = [1, PAGE, PAGE + 1, 9 * PAGE + 3, 0]
PREFILL_SEQS = [(1, 1), (PAGE, PAGE), (PAGE + 1, PAGE + 1), (7 * PAGE + 3, 7 * PAGE + 3), (6, 19), (1, 17), (0, 9)]
PAD_TOKENS = 3
CASES = [("float32", 1), ("float32", 4), ("bfloat16", 8), ("int8", 4)]


@pytest.mark.parametrize("dtype, group", CASES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("pages_per_block", [1, 3])
def test_decode(rng, dtype, group, window, pages_per_block):
    q_dtype, kv_dtype = DTYPE_CASES[dtype]
    kv = make_paged_kv(rng, DECODE_LENGTHS, num_kv_heads=2, head_dim=64, page_size=PAGE, kv_dtype=kv_dtype)
    q, q64 = random_q(rng, len(DECODE_LENGTHS), 2 * group, 64, q_dtype)
    args = (q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv.lengths))
    kwargs = dict(scale=0.125, sliding_window=window, **kv.scales)
    out = xla.paged_decode_attention(*args, pages_per_block=pages_per_block, **kwargs)
    ref = reference.paged_decode_attention(*args, **kwargs)
    oracle = np.zeros(q64.shape)
    for b, n in enumerate(kv.lengths):
        if n:
            oracle[b] = np_attention(q64[b : b + 1], kv.k_seq[b], kv.v_seq[b], [n - 1], 0.125, window)[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= TOL[q_dtype] and rel_err(out, oracle) <= TOL[q_dtype]
    assert np.all(np.asarray(out[-1], np.float32) == 0)  # length-0 padding row


@pytest.mark.parametrize("dtype, group", CASES)
@pytest.mark.parametrize("window", [None, 6])
def test_ragged_prefill(rng, dtype, group, window):
    q_dtype, kv_dtype = DTYPE_CASES[dtype]
    q_lens = np.array([s[0] for s in PREFILL_SEQS], np.int32)
    kv = make_paged_kv(rng, [s[1] for s in PREFILL_SEQS], num_kv_heads=2, head_dim=64, page_size=PAGE,
                       kv_dtype=kv_dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q, q64 = random_q(rng, int(cu[-1]), 2 * group, 64, q_dtype, nan_rows=PAD_TOKENS)
    args = (q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv.lengths), jnp.asarray(cu))
    kwargs = dict(scale=0.125, sliding_window=window, **kv.scales)
    out = xla.ragged_prefill_attention(*args, pages_per_block=2, **kwargs)
    ref = reference.ragged_prefill_attention(*args, **kwargs)
    oracle = np.zeros((q64.shape[0] + PAD_TOKENS,) + q64.shape[1:])
    for s, n in enumerate(kv.lengths):
        lo, hi = cu[s], cu[s + 1]
        if hi > lo:
            pos = n - (hi - lo) + np.arange(hi - lo)
            oracle[lo:hi] = np_attention(q64[lo:hi], kv.k_seq[s], kv.v_seq[s], pos, 0.125, window)
    assert rel_err(out, ref) <= TOL[q_dtype] and rel_err(out, oracle) <= TOL[q_dtype]
    assert np.all(np.asarray(out[cu[-1] :], np.float32) == 0)  # NaN padding rows give zeros
