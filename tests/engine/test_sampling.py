import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalellm_jax.engine.sampling import (
    filter_thresholds,
    first_argmax,
    min_p_floor,
    row_keys,
    sample,
    token_logprobs,
)


def draw(logits, seeds, steps, temperature, top_k, top_p):
    b = logits.shape[0]
    full = lambda value, dtype: jnp.full((b,), value, dtype)
    return np.asarray(sample(
        jnp.asarray(logits), row_keys(jnp.asarray(seeds)), jnp.asarray(steps),
        full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
    ))


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = np.random.default_rng().standard_normal((5, 50)).astype(np.float32)
    argmax = logits.argmax(-1)
    seeds, steps = np.arange(5), np.zeros(5, np.int32)
    np.testing.assert_array_equal(draw(logits, seeds, steps, 0.0, 0, 1.0), argmax)
    np.testing.assert_array_equal(draw(logits, seeds, steps, 1.0, 1, 1.0), argmax)
    np.testing.assert_array_equal(draw(logits, seeds, steps, 1.0, 0, 1e-6), argmax)


def test_samples_follow_the_filtered_distribution():
    n = 4000
    logits = np.tile(np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32)), (n, 1))
    seeds = np.random.default_rng().integers(0, 2**31, n)
    steps = np.zeros(n, np.int32)
    counts = np.bincount(draw(logits, seeds, steps, 1.0, 0, 1.0), minlength=4) / n
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = np.bincount(draw(logits, seeds, steps, 1.0, 2, 1.0), minlength=4) / n
    np.testing.assert_allclose(top2, [0.625, 0.375, 0, 0], atol=0.03)
    nucleus = np.bincount(draw(logits, seeds, steps, 1.0, 0, 0.7), minlength=4) / n
    assert nucleus[2] == nucleus[3] == 0 and abs(nucleus[0] - 0.625) < 0.03


def test_row_randomness_depends_only_on_its_seed_and_step():
    rng = np.random.default_rng()
    logits = rng.standard_normal((6, 40)).astype(np.float32)
    seeds = rng.integers(0, 2**31, 6)
    steps = rng.integers(0, 100, 6).astype(np.int32)
    batch = draw(logits, seeds, steps, 1.0, 0, 1.0)
    alone = [draw(logits[i : i + 1], seeds[i : i + 1], steps[i : i + 1], 1.0, 0, 1.0)[0] for i in range(6)]
    np.testing.assert_array_equal(batch, alone)


def test_token_logprobs():
    logits = jnp.asarray(np.random.default_rng().standard_normal((3, 7)), jnp.float32)
    tokens = jnp.array([0, 3, 6])
    expected = np.asarray(jax.nn.log_softmax(logits))[np.arange(3), [0, 3, 6]]
    np.testing.assert_allclose(np.asarray(token_logprobs(logits, tokens)), expected, rtol=1e-6)


def test_a_row_draw_does_not_depend_on_the_other_rows_parameters():
    rng = np.random.default_rng()
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    keys, steps = row_keys(jnp.asarray(rng.integers(0, 2**31, 4))), jnp.asarray(rng.integers(0, 9, 4), jnp.int32)

    def run(temperature, top_k, top_p):
        return np.asarray(sample(logits, keys, steps, jnp.asarray(temperature, jnp.float32),
                                 jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)))

    plain = run([0.9, 0.0, 0.0, 0.0], [0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0])  # others greedy: no sort at all
    mixed = run([0.9, 1.0, 0.5, 0.0], [0, 5, 0, 3], [1.0, 0.8, 0.3, 1.0])  # others filtered: sort runs
    assert plain[0] == mixed[0]
    assert plain[3] == mixed[3] == int(np.argmax(np.asarray(logits[3])))


@pytest.mark.parametrize("vocab", [1000, 32000, 128, 129, 1])
def test_first_argmax_matches_argmax_with_ties_and_stays_in_range_on_nan(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((12, vocab)).astype(np.float32)
    last = vocab - 1
    x[1, [min(3, last), last]] = 50.0  # a tie: the first index wins, like argmax
    x[2] = -np.inf
    x[3, min(5, last)] = np.inf
    x[5, last] = 60.0  # the maximum in the last (possibly partial) chunk
    x[6] = 7.0  # a whole row tied
    x[7, min(127, last)] = x[7, min(128, last)] = 70.0  # a tie across a chunk boundary
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
    x[4, min(10, last)] = np.nan
    x[8] = np.nan
    got = np.asarray(first_argmax(jnp.asarray(x)))
    assert got.dtype == np.int32
    assert ((0 <= got[[4, 8]]) & (got[[4, 8]] < vocab)).all()


# ---------------------------------------------------------------------------------------------- top-k / top-p


def reference_thresholds(scaled: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p=None) -> np.ndarray:
    """The definition, by sorting each row: min-p's cut (probability at least min_p × the top one's), the smallest
    logit kept by top-k (the k-th largest, ties kept), then top-p over what those keep renormalised (tokens kept
    while the mass strictly above them is below top_p)."""
    out = np.empty(len(scaled), np.float32)
    for i, row in enumerate(scaled.astype(np.float64)):
        desc = np.sort(row)[::-1]
        k = len(row) if top_k[i] <= 0 else min(top_k[i], len(row))
        t_k = desc[k - 1] if k < len(row) else -np.inf
        if min_p is not None and min_p[i] > 0:
            t_k = max(t_k, desc[np.exp(desc - desc[0]) >= min_p[i]][-1])
        kept = desc[desc >= t_k]
        if top_p[i] >= 1:
            out[i] = t_k
            continue
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        above = {v: probs[kept > v].sum() for v in np.unique(kept)}
        out[i] = min(v for v in above if above[v] < top_p[i])
    return out


def _logits(rng, rows, vocab, kind):
    if kind == "flat":  # a random-weight model: top-p reaches deep into the vocabulary
        return rng.standard_normal((rows, vocab)).astype(np.float32)
    # language-model-like: a few likely tokens over a long tail, the peakedness varying by row
    rank_logits = -rng.uniform(0.5, 3.0, (rows, 1)) * np.log1p(np.arange(vocab))[None, :]
    return np.stack([rng.permutation(r) for r in rank_logits + 0.3 * rng.standard_normal((rows, vocab))]
                    ).astype(np.float32)


@pytest.mark.parametrize("vocab", [1, 7, 64, 65, 300, 4099])
@pytest.mark.parametrize("kind", ["flat", "peaked"])
def test_filter_thresholds_match_the_sorted_definition(vocab, kind):
    rng = np.random.default_rng()
    rows = 24
    x = _logits(rng, rows, vocab, kind)
    x[3, : vocab // 2] = -np.inf  # masked tokens (a padded vocabulary)
    top_k = rng.choice([0, -1, 1, 2, 40, 64, 65, 200, vocab, vocab + 5], rows)
    top_p = rng.choice([1.0, 0.999, 0.95, 0.9, 0.5, 0.1, 1e-6], rows).astype(np.float32)
    top_k[:4], top_p[:4] = [0, 100, 0, 70], [0.9, 1.0, 0.99, 0.95]  # candidates too few on flat rows
    min_p = np.where(rng.random(rows) < 0.3, rng.choice([1e-4, 0.01, 0.1, 0.5, 1.0], rows), 0.0).astype(np.float32)
    got = np.asarray(filter_thresholds(jnp.asarray(x), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p),
                                       min_p_floor(jnp.asarray(x), jnp.asarray(min_p))))
    want = reference_thresholds(x, top_k, top_p, min_p)
    differ = np.any((x >= got[:, None]) != (x >= want[:, None]), axis=1)  # the kept sets (min-p cuts by value)
    for i in np.flatnonzero(differ):  # allowed only where float rounding decides: a mass right at top_p,
        row = x[i].astype(np.float64)     # or a probability ratio right at min_p
        if min_p[i] > 0 and np.min(np.abs(np.exp(row - row.max()) / min_p[i] - 1)) < 1e-5:
            continue
        kept = row[row >= reference_thresholds(x[i : i + 1], top_k[i : i + 1], np.ones(1), min_p[i : i + 1])[0]]
        probs = np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum()
        assert top_p[i] < 1 and abs(probs[kept > min(got[i], want[i])].sum() - top_p[i]) < 1e-5, (i, got[i], want[i])


def test_filter_thresholds_keep_ties_and_the_top_token():
    x = np.array([[3.0, 1.0, 3.0, 1.0, 1.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], np.float32)
    got = np.asarray(filter_thresholds(jnp.asarray(x), jnp.asarray([2, 3], jnp.int32), jnp.asarray([1.0, 1e-6]),
                                       jnp.full(2, -jnp.inf)))
    np.testing.assert_array_equal(got, [3.0, 5.0])  # the 2nd largest is a tie with the 1st; a flat row keeps all
