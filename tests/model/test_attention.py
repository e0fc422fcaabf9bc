import jax.numpy as jnp
import numpy as np
import pytest

from scalellm_jax.model.attention import causal_window_mask, masked_attention


def numpy_attention(q, k, v, window):
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            kh = hi // group
            for ti in range(t):
                lo = 0 if window is None else max(0, ti - window + 1)
                s = q[bi, ti, hi] @ k[bi, lo : ti + 1, kh].T / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, lo : ti + 1, kh]
    return out


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (4, 1, None), (8, 2, 3), (6, 3, 1)])
def test_masked_attention_matches_float64_numpy(heads, kv_heads, window):
    rng = np.random.default_rng()
    b, t, d = 2, 9, 8
    q, k, v = (rng.standard_normal((b, t, n, d)) for n in (heads, kv_heads, kv_heads))
    positions = np.broadcast_to(np.arange(t), (b, t))
    mask = causal_window_mask(jnp.asarray(positions), jnp.asarray(positions), window)
    got = masked_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), mask, d**-0.5)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, window), rtol=1e-5, atol=1e-5)
