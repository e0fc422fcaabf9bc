import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalellm_jax.engine.sampling import first_argmax, row_keys, sample, token_logprobs


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
