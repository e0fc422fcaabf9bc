"""ragged_prefill_attention (Pallas: compiled on a GPU, interpreted elsewhere) against the jnp
reference and float64 numpy."""

from __future__ import annotations

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

# (new tokens, total kv length) per sequence: prefill of length 1 / a page / a page + 1 / long,
# a chunk over a cached prefix, a decode row (mixed batch), a sequence with nothing new and a
# zero-length padding row.
SEQS = [(1, 1), (PAGE, PAGE), (PAGE + 1, PAGE + 1), (4 * PAGE + 3, 4 * PAGE + 3), (20, 50),
        (1, 40), (0, 9), (0, 0)]
PAD_TOKENS = 3  # NaN query rows past cu_q_lens[-1], as in a bucket-padded batch


def make_batch(rng, seqs, q_dtype, kv_dtype, *, group, head_dim, page_size=PAGE,
               num_kv_heads=2, **kv_kwargs):
    q_lens = np.array([s[0] for s in seqs], np.int32)
    kv = make_paged_kv(rng, [s[1] for s in seqs], num_kv_heads=num_kv_heads,
                       head_dim=head_dim, page_size=page_size, kv_dtype=kv_dtype, **kv_kwargs)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q, q64 = random_q(rng, int(cu[-1]), num_kv_heads * group, head_dim, q_dtype,
                      nan_rows=PAD_TOKENS)
    return kv, cu, q, q64


def expected(kv, cu, q64, scale, sliding_window=None, exact=False):
    """float64 oracle; padding rows (past cu[-1]) are zero."""
    ks, vs = (kv.k_exact, kv.v_exact) if exact else (kv.k_seq, kv.v_seq)
    out = np.zeros((q64.shape[0] + PAD_TOKENS,) + q64.shape[1:])
    for s, n in enumerate(kv.lengths):
        lo, hi = cu[s], cu[s + 1]
        if hi > lo:
            pos = n - (hi - lo) + np.arange(hi - lo)
            out[lo:hi] = np_attention(q64[lo:hi], ks[s], vs[s], pos, scale, sliding_window)
    return out


def run(fn, kv, cu, q, scale, **kwargs):
    return fn(q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv.lengths), jnp.asarray(cu),
              scale=scale, interpret=INTERPRET, **kv.scales, **kwargs)


def check_case(rng, dtype, group, head_dim, seqs=SEQS, page_size=PAGE, sliding_window=None,
               **tuning):
    q_dtype, kv_dtype = DTYPE_CASES[dtype]
    kv, cu, q, q64 = make_batch(rng, seqs, q_dtype, kv_dtype, group=group, head_dim=head_dim,
                                page_size=page_size)
    scale = head_dim ** -0.5
    out = run(pk.ragged_prefill_attention, kv, cu, q, scale, sliding_window=sliding_window,
              **tuning)
    ref = run(reference.ragged_prefill_attention, kv, cu, q, scale,
              sliding_window=sliding_window)
    oracle = expected(kv, cu, q64, scale, sliding_window)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.asarray(out[cu[-1]:], np.float32) == 0)
    assert np.all(np.asarray(ref[cu[-1]:], np.float32) == 0)
    tol = TOL[q_dtype]
    assert rel_err(out, ref) <= tol
    assert rel_err(out, oracle) <= tol
    assert rel_err(ref, oracle) <= tol
    if kv_dtype == "int8":
        exact = expected(kv, cu, q64, scale, sliding_window, exact=True)
        assert rel_err(out, exact) <= INT8_VS_EXACT_TOL
    return kv, cu, q, out


@pytest.mark.parametrize("dtype,group,head_dim", MATRIX)
def test_prefill_matches_references(rng, dtype, group, head_dim):
    check_case(rng, dtype, group, head_dim)


def test_prefill_int8_kv_with_bf16_queries(rng):
    check_case(rng, "int8-bf16q", 4, 64)


@pytest.mark.parametrize("tuning", [
    dict(block_q=4, pages_per_block=1),  # many q tiles, KV tiles of one page
    dict(block_q=8, pages_per_block=2),
    dict(sliding_window=1, block_q=4, pages_per_block=1),
    dict(sliding_window=3, block_q=4, pages_per_block=1),  # window smaller than a tile
    dict(sliding_window=20, block_q=4, pages_per_block=1),  # window across a page boundary
    dict(sliding_window=40),  # default tiles
])
def test_prefill_tiling_and_window_variants(rng, tuning):
    check_case(rng, "float32", 4, 64, **tuning)


def test_prefill_page_size_32(rng):
    seqs = [(1, 1), (32, 32), (33, 33), (40, 70), (1, 65)]
    check_case(rng, "bfloat16", 4, 128, seqs=seqs, page_size=32)


def test_prefill_nan_in_unused_slots_and_padding_changes_nothing(rng):
    for dtype in ("float32", "int8"):
        kv, cu, q, out = check_case(rng, dtype, 4, 64, block_q=4, pages_per_block=1)
        q_clean = jnp.where(jnp.isnan(q), 0.0, q)
        out_clean = run(pk.ragged_prefill_attention, kv.cleaned(), cu, q_clean, 64 ** -0.5,
                        block_q=4, pages_per_block=1)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(out_clean))


def test_prefill_kv_lengths_past_the_table_row_are_clipped(rng):
    """A kv length beyond a row's capacity is clipped to it, in the kernel, the reference and the
    xla version alike. The new tokens stay the last q_len of the clipped length; a sequence with
    more new tokens than the row holds keeps its last ``capacity`` tokens at positions
    0..capacity-1 and the earlier ones, at negative positions, see no key (zeros)."""
    cap, sliding_window = 9 * PAGE, 20  # the window makes each row depend on its position
    # (new tokens, tokens the pages hold): full rows (9 pages, no spare column) whose kv length
    # is passed too long, plus a normal sequence and a zero-length row.
    seqs = [(cap, cap), (20, cap), (1, cap), (cap + 6, cap), (PAGE + 1, PAGE + 1), (0, 0)]
    too_long = np.array([cap + 1, 10**6, cap + 5, cap + 6, PAGE + 1, 0], np.int32)
    kv, cu, q, q64 = make_batch(rng, seqs, "float32", "float32", group=4, head_dim=64,
                                extra_table_cols=0)
    assert kv.page_table.shape[1] * PAGE == cap
    oracle = expected(kv, cu, q64, 0.125, sliding_window)  # positions from the clipped lengths
    assert np.all(oracle[cu[3]:cu[3] + 6] == 0)

    def attend(fn, kv_lengths):
        return fn(q, kv.k_pages, kv.v_pages, kv.page_table, jnp.asarray(kv_lengths),
                  jnp.asarray(cu), scale=0.125, sliding_window=sliding_window,
                  interpret=INTERPRET)

    outs = {fn: attend(fn, too_long) for fn in (
        pk.ragged_prefill_attention, reference.ragged_prefill_attention,
        xla.ragged_prefill_attention)}
    for fn, out in outs.items():
        assert rel_err(out, oracle) <= TOL["float32"], fn.__module__
        assert np.all(np.asarray(out[cu[3]:cu[3] + 6]) == 0), fn.__module__
    np.testing.assert_array_equal(np.asarray(outs[pk.ragged_prefill_attention]),
                                  np.asarray(attend(pk.ragged_prefill_attention, kv.lengths)))


def _slots(table, seq, start, stop, page_size):
    tok = np.arange(start, stop)
    return table[seq, tok // page_size] * page_size + tok % page_size


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_chunked_prefill_equals_one_shot(rng, kv_dtype):
    """Writing and attending chunk by chunk (bucket-padded) equals one-shot prefill."""
    lengths, bucket, group, head_dim = [45, 13], 32, 4, 64
    src = make_paged_kv(rng, lengths, num_kv_heads=2, head_dim=head_dim, page_size=PAGE,
                        kv_dtype="float32")
    table = np.asarray(src.page_table)
    quantized = kv_dtype == "int8"
    empty = jnp.zeros(src.k_pages.shape, jnp.int8) if quantized else jnp.full(
        src.k_pages.shape, jnp.nan, jnp.float32)
    scales = jnp.full(src.k_pages.shape[:3], jnp.nan) if quantized else None
    q_all = [random_q(rng, n, 2 * group, head_dim, "float32")[0] for n in lengths]
    scale = head_dim ** -0.5

    def step(state, chunks, pad_to, progress):
        """Write and attend ``chunks`` ((seq, start, stop) new tokens), padded to ``pad_to``.

        ``progress`` (tokens cached per sequence) is updated in place.
        """
        slots = np.concatenate([_slots(table, s, a, b, PAGE) for s, a, b in chunks])
        k_new = jnp.concatenate([jnp.asarray(src.k_exact[s][a:b], jnp.float32)
                                 for s, a, b in chunks])
        v_new = jnp.concatenate([jnp.asarray(src.v_exact[s][a:b], jnp.float32)
                                 for s, a, b in chunks])
        q = jnp.concatenate([q_all[s][a:b] for s, a, b in chunks])
        n, pad = len(slots), pad_to - len(slots)
        slots = np.concatenate([slots, -np.ones(pad, np.int64)]).astype(np.int32)
        k_new = jnp.pad(k_new, ((0, pad), (0, 0), (0, 0)), constant_values=jnp.nan)
        v_new = jnp.pad(v_new, ((0, pad), (0, 0), (0, 0)), constant_values=jnp.nan)
        q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)), constant_values=jnp.nan)
        k_pages, v_pages, *sc = state
        sc_kw = dict(k_scales=sc[0], v_scales=sc[1]) if quantized else {}
        state = pk.write_kv(k_pages, v_pages, k_new, v_new, jnp.asarray(slots), **sc_kw)
        q_lens = np.zeros(len(lengths), np.int32)
        kv_lens = np.zeros(len(lengths), np.int32)
        for s in range(len(lengths)):  # each sequence's progress after this step
            mine = [(a, b) for t, a, b in chunks if t == s]
            q_lens[s] = sum(b - a for a, b in mine)
            kv_lens[s] = max([b for _, b in mine], default=progress[s])
            progress[s] = kv_lens[s]
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        sc_kw = dict(k_scales=state[2], v_scales=state[3]) if quantized else {}
        out = pk.ragged_prefill_attention(
            q, state[0], state[1], src.page_table, jnp.asarray(kv_lens), jnp.asarray(cu),
            scale=scale, interpret=INTERPRET, block_q=4, pages_per_block=1, **sc_kw)
        assert np.all(np.asarray(out[n:]) == 0)
        return state, np.asarray(out[:n])

    init = (empty, empty, scales, scales) if quantized else (empty, empty)
    _, one_shot = step(init, [(0, 0, 45), (1, 0, 13)], 64, [0, 0])
    progress = [0, 0]
    state, out1 = step(init, [(0, 0, 7), (1, 0, 13)], bucket, progress)
    state, out2 = step(state, [(0, 7, 20)], bucket, progress)
    state, out3 = step(state, [(0, 20, 45)], bucket, progress)
    chunked = np.concatenate([out1[:7], out2, out3, out1[7:]])
    assert rel_err(chunked, one_shot) <= TOL["float32"]
    # And both agree with float64 attention over the (dequantised) cache contents.
    seen_k = [src.k_exact[s] for s in range(2)]
    seen_v = [src.v_exact[s] for s in range(2)]
    q64 = [np.asarray(q, np.float64) for q in q_all]
    oracle = np.concatenate([np_attention(q64[s], seen_k[s], seen_v[s], np.arange(n), scale)
                             for s, n in enumerate(lengths)])
    tol = INT8_VS_EXACT_TOL if quantized else TOL["float32"]
    assert rel_err(chunked, oracle) <= tol
