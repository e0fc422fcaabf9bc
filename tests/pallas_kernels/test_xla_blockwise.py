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
DECODE_LENGTHS = [1, PAGE, 0, PAGE + 1, 9 * PAGE + 3, 0]  # a padding row between live ones too
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
    assert np.all(np.asarray(out, np.float32)[[2, -1]] == 0)  # length-0 padding rows


@pytest.mark.parametrize("dtype, group", CASES)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("tile", [1, 3, 8])  # 1 = a tile per token; 3 and 8 split sequences unevenly
def test_ragged_prefill(rng, dtype, group, window, tile):
    q_dtype, kv_dtype = DTYPE_CASES[dtype]
    q_lens = np.array([s[0] for s in PREFILL_SEQS], np.int32)
    kv = make_paged_kv(rng, [s[1] for s in PREFILL_SEQS], num_kv_heads=2, head_dim=64, page_size=PAGE,
                       kv_dtype=kv_dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q, q64 = random_q(rng, int(cu[-1]), 2 * group, 64, q_dtype, nan_rows=PAD_TOKENS)
    args = (q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv.lengths), jnp.asarray(cu))
    kwargs = dict(scale=0.125, sliding_window=window, **kv.scales)
    out = xla.ragged_prefill_attention(*args, pages_per_block=2, tile=tile, **kwargs)
    ref = reference.ragged_prefill_attention(*args, **kwargs)
    oracle = np.zeros((q64.shape[0] + PAD_TOKENS,) + q64.shape[1:])
    for s, n in enumerate(kv.lengths):
        lo, hi = cu[s], cu[s + 1]
        if hi > lo:
            pos = n - (hi - lo) + np.arange(hi - lo)
            oracle[lo:hi] = np_attention(q64[lo:hi], kv.k_seq[s], kv.v_seq[s], pos, 0.125, window)
    assert rel_err(out, ref) <= TOL[q_dtype] and rel_err(out, oracle) <= TOL[q_dtype]
    assert np.all(np.asarray(out[cu[-1] :], np.float32) == 0)  # NaN padding rows give zeros


@pytest.mark.parametrize("trial", range(4))
def test_ragged_prefill_random_tiles(rng, trial):
    """Random mixes of decode rows, fresh prompts and continuation chunks, random tile sizes, and
    trailing empty rows (as the runner's max_num_seqs padding gives): equal to the reference."""
    num_seqs = int(rng.integers(1, 12))
    kv_lens = rng.integers(1, 60, size=num_seqs)
    q_lens = np.minimum(kv_lens, rng.choice([1, 1, 2, 7, 60], size=num_seqs))
    kv_lens = np.concatenate([kv_lens, np.zeros(3, int)])  # empty rows: no tokens, no keys
    q_lens = np.concatenate([q_lens, np.zeros(3, int)])
    kv = make_paged_kv(rng, kv_lens, num_kv_heads=2, head_dim=16, page_size=PAGE, kv_dtype="float32")
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q, _ = random_q(rng, int(cu[-1]), 4, 16, "float32", nan_rows=int(rng.integers(0, 9)))
    args = (q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu))
    tile = int(rng.choice([2, 5, 16]))
    out = xla.ragged_prefill_attention(*args, scale=0.25, tile=tile, pages_per_block=int(rng.integers(1, 4)))
    ref = reference.ragged_prefill_attention(*args, scale=0.25)
    assert rel_err(out[: cu[-1]], ref[: cu[-1]]) <= TOL["float32"], (tile, q_lens, kv_lens)
    assert np.all(np.asarray(out[cu[-1] :]) == 0)
