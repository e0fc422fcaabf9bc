"""paged_decode_attention (Pallas: compiled on a GPU, interpreted elsewhere) against the jnp
reference and float64 numpy."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference, xla
from tests.pallas_kernels.paged_cases import (
    DTYPE_CASES,
    INT8_VS_EXACT_TOL,
    INTERPRET,
    MATRIX,
    PAGE,
    TOL,
    make_paged_kv,
    np_attention,
    random_q,
    rel_err,
)

# Length 1, a zero-length padding row, exactly a page, a page + 1, long (several pages, and
# several flash-decoding splits with the default tiling).
LENGTHS = [1, 0, PAGE, PAGE + 1, 4 * PAGE + 3]


def expected(kv, q64, scale, sliding_window=None, exact=False):
    """float64 decode attention: each sequence's query sits at position length - 1."""
    ks, vs = (kv.k_exact, kv.v_exact) if exact else (kv.k_seq, kv.v_seq)
    out = np.zeros(q64.shape)
    for b, n in enumerate(kv.lengths):
        if n:
            out[b] = np_attention(q64[b:b + 1], ks[b], vs[b], [n - 1], scale, sliding_window)[0]
    return out


def run(fn, kv, q, scale, **kwargs):
    return fn(q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv.lengths), scale=scale,
              interpret=INTERPRET, **kv.scales, **kwargs)


def check_case(rng, dtype, group, head_dim, lengths=LENGTHS, page_size=PAGE, num_kv_heads=2,
               sliding_window=None, **tuning):
    q_dtype, kv_dtype = DTYPE_CASES[dtype]
    kv = make_paged_kv(rng, lengths, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       page_size=page_size, kv_dtype=kv_dtype)
    q, q64 = random_q(rng, len(lengths), num_kv_heads * group, head_dim, q_dtype)
    scale = head_dim ** -0.5
    out = run(pk.paged_decode_attention, kv, q, scale, sliding_window=sliding_window, **tuning)
    ref = run(reference.paged_decode_attention, kv, q, scale, sliding_window=sliding_window)
    oracle = expected(kv, q64, scale, sliding_window)
    assert out.shape == q.shape and out.dtype == q.dtype
    empty = kv.lengths == 0  # padding rows: exactly zero, whatever their query holds
    assert np.all(np.asarray(out, np.float32)[empty] == 0)
    assert np.all(np.asarray(ref, np.float32)[empty] == 0)
    tol = TOL[q_dtype]
    assert rel_err(out, ref) <= tol
    assert rel_err(out, oracle) <= tol
    assert rel_err(ref, oracle) <= tol
    if kv_dtype == "int8":
        exact = expected(kv, q64, scale, sliding_window, exact=True)
        assert rel_err(out, exact) <= INT8_VS_EXACT_TOL
    return kv, q, out


@pytest.mark.parametrize("dtype,group,head_dim", MATRIX)
def test_decode_matches_references(rng, dtype, group, head_dim):
    check_case(rng, dtype, group, head_dim)


def test_decode_int8_kv_with_bf16_queries(rng):
    check_case(rng, "int8-bf16q", 4, 64)


@pytest.mark.parametrize("tuning", [
    dict(num_splits=1, pages_per_block=1),
    dict(num_splits=4, pages_per_block=1),  # short sequences leave whole splits empty
    dict(num_splits=3, pages_per_block=2),  # rounded to a power-of-two split size
    dict(use_mma=True),  # padded tensor-core path for small groups
    dict(sliding_window=1),
    dict(sliding_window=5),  # window shorter than a page
    dict(sliding_window=40, num_splits=4, pages_per_block=1),  # window across splits
    dict(sliding_window=20, use_mma=True),  # window across a page boundary
])
def test_decode_tiling_and_window_variants(rng, tuning):
    check_case(rng, "float32", 4, 64, **tuning)


def test_decode_page_size_32(rng):
    check_case(rng, "bfloat16", 4, 128, lengths=[1, 32, 33, 70], page_size=32)


def test_decode_nan_in_unused_slots_changes_nothing(rng):
    for dtype in ("float32", "int8"):
        kv, q, out = check_case(rng, dtype, 4, 64, num_splits=4, pages_per_block=1)
        clean = kv.cleaned()
        out_clean = run(pk.paged_decode_attention, clean, q, 64 ** -0.5, num_splits=4,
                        pages_per_block=1)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(out_clean))


@pytest.mark.parametrize("sliding_window", [None, 20])
def test_decode_lengths_past_the_table_row_are_clipped(rng, sliding_window):
    """A length beyond a row's capacity (max_pages * page_size) attends to the full row, in the
    kernel, the reference and the xla version alike."""
    cap = 9 * PAGE
    # Rows 0 and 3 fill their 9-page table rows (no spare column); every other slot is poisoned.
    kv = make_paged_kv(rng, [cap, 1, 0, cap, PAGE + 1], num_kv_heads=2, head_dim=64,
                       page_size=PAGE, kv_dtype="float32", extra_table_cols=0)
    assert kv.page_table.shape[1] * PAGE == cap
    too_long = dataclasses.replace(kv, lengths=np.array([cap + 1, 1, 0, 10**6, PAGE + 1]))
    q, q64 = random_q(rng, 5, 8, 64, "float32")
    oracle = expected(kv, q64, 0.125, sliding_window)
    outs = {fn: run(fn, too_long, q, 0.125, sliding_window=sliding_window)
            for fn in (pk.paged_decode_attention, reference.paged_decode_attention,
                       xla.paged_decode_attention)}
    for fn, out in outs.items():
        assert rel_err(out, oracle) <= TOL["float32"], fn.__module__
    clipped = run(pk.paged_decode_attention, kv, q, 0.125, sliding_window=sliding_window)
    np.testing.assert_array_equal(np.asarray(outs[pk.paged_decode_attention]),
                                  np.asarray(clipped))


def test_decode_equals_single_token_prefill(rng):
    kv = make_paged_kv(rng, LENGTHS, num_kv_heads=2, head_dim=64, page_size=PAGE,
                       kv_dtype="float32")
    q, _ = random_q(rng, len(LENGTHS), 8, 64, "float32")
    decode = run(pk.paged_decode_attention, kv, q, 0.125)
    cu = jnp.arange(len(LENGTHS) + 1, dtype=jnp.int32)
    prefill = pk.ragged_prefill_attention(
        q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv.lengths), cu, scale=0.125,
        interpret=INTERPRET)
    assert rel_err(decode, prefill) <= TOL["float32"]
