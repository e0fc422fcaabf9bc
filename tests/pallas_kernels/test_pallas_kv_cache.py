"""write_kv and int8 quantisation: scatter semantics, padding slots, round-trip error bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference

KVH, PAGES, PAGE, D = 2, 5, 4, 16


def random_slots(rng, num_tokens, num_padding):
    """Distinct valid slots plus negative (padding) slots, shuffled together."""
    valid = rng.choice(PAGES * PAGE, size=num_tokens, replace=False)
    pad = -rng.integers(1, 10, size=num_padding)
    slots = np.concatenate([valid, pad])
    rng.shuffle(slots)
    return slots.astype(np.int32)


def numpy_write(pages, new, slots):
    out = np.array(pages)
    for i, s in enumerate(slots):
        if s >= 0:
            out[:, s // PAGE, s % PAGE] = new[i]
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_kv_float_scatter_skips_padding(rng, dtype):
    shape = (KVH, PAGES, PAGE, D)
    k_pages = jnp.asarray(rng.normal(size=shape), dtype)
    v_pages = jnp.asarray(rng.normal(size=shape), dtype)
    slots = random_slots(rng, 7, 3)
    k_new = jnp.asarray(rng.normal(size=(10, KVH, D)), dtype)
    v_new = jnp.asarray(rng.normal(size=(10, KVH, D)), dtype)
    k_out, v_out = pk.write_kv(k_pages, v_pages, k_new, v_new, jnp.asarray(slots))
    for got, pages, new in ((k_out, k_pages, k_new), (v_out, v_pages, v_new)):
        want = numpy_write(np.asarray(pages, np.float32), np.asarray(new, np.float32), slots)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)
        assert got.dtype == pages.dtype
    ref = reference.write_kv(k_pages, v_pages, k_new, v_new, jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(ref[0], np.float32), np.asarray(k_out, np.float32))
    np.testing.assert_array_equal(np.asarray(ref[1], np.float32), np.asarray(v_out, np.float32))


def test_write_kv_all_padding_writes_nothing(rng):
    k_pages = jnp.full((KVH, PAGES, PAGE, D), jnp.nan)
    v_pages = jnp.asarray(rng.normal(size=(KVH, PAGES, PAGE, D)), jnp.float32)
    new = jnp.asarray(rng.normal(size=(4, KVH, D)), jnp.float32)
    slots = jnp.asarray([-1, -2, -PAGE, -PAGES * PAGE], jnp.int32)
    for fn in (pk.write_kv, reference.write_kv):
        k_out, v_out = fn(k_pages, v_pages, new, new, slots)
        assert np.all(np.isnan(np.asarray(k_out)))
        np.testing.assert_array_equal(np.asarray(v_out), np.asarray(v_pages))


def test_write_kv_int8_quantizes_on_write(rng):
    shape = (KVH, PAGES, PAGE, D)
    pages = jnp.zeros(shape, jnp.int8)
    scales = jnp.full(shape[:3], 7.0, jnp.float32)  # sentinel: untouched slots keep it
    slots = random_slots(rng, 8, 2)
    k_new = rng.normal(size=(10, KVH, D)).astype(np.float32) * rng.uniform(0.1, 10, (10, KVH, 1))
    v_new = rng.normal(size=(10, KVH, D)).astype(np.float32)
    k_new[0, 0] = 0.0  # an all-zero vector must not divide by zero
    out = pk.write_kv(pages, pages, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots),
                      k_scales=scales, v_scales=scales)
    assert len(out) == 4 and out[0].dtype == jnp.int8 and out[2].dtype == jnp.float32
    ref = reference.write_kv(pages, pages, jnp.asarray(k_new), jnp.asarray(v_new),
                             jnp.asarray(slots), k_scales=scales, v_scales=scales)
    for a, b in zip(out, ref, strict=False):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for (vals, sc), new in (((out[0], out[2]), k_new), ((out[1], out[3]), v_new)):
        vals, sc = np.asarray(vals), np.asarray(sc)
        written = np.zeros(shape[:3], bool)
        for i, s in enumerate(slots):
            if s < 0:
                continue
            p, o = s // PAGE, s % PAGE
            written[:, p, o] = True
            deq = vals[:, p, o].astype(np.float64) * sc[:, p, o, None]
            amax = np.abs(new[i]).max(axis=-1, keepdims=True).astype(np.float64)
            # Round-trip bound: half a quantisation step, max|x| / 254 (plus float slack).
            assert np.all(np.abs(deq - new[i]) <= amax / 254 * (1 + 1e-5) + 1e-12)
            np.testing.assert_allclose(sc[:, p, o], np.where(amax[:, 0] > 0, amax[:, 0] / 127,
                                                             1.0), rtol=1e-6)
        assert np.all(vals[:, ~written[0]] == 0) and np.all(sc[~written] == 7.0)


def test_quantize_int8_round_trip():
    x = jnp.asarray([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-3.0, 3.0, 1e-3]])
    values, scales = pk.quantize_int8(x)
    assert values.dtype == jnp.int8 and scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(values[0]), 0)
    assert float(scales[0]) == 1.0
    assert int(jnp.max(jnp.abs(values))) == 127
    back = pk.dequantize_int8(values, scales)
    assert np.all(np.abs(np.asarray(back - x)) <= np.asarray(scales)[:, None] / 2 + 1e-7)


def test_write_kv_with_donated_pages(rng):
    shape = (KVH, PAGES, PAGE, D)
    k = jnp.asarray(rng.normal(size=shape), jnp.float32)
    v = jnp.asarray(rng.normal(size=shape), jnp.float32)
    new = jnp.asarray(rng.normal(size=(3, KVH, D)), jnp.float32)
    slots = jnp.asarray([0, -1, PAGES * PAGE - 1], jnp.int32)
    want = [np.asarray(a) for a in pk.write_kv(k, v, new, new, slots)]
    donated = jax.jit(pk.write_kv, donate_argnums=(0, 1))
    got = donated(jnp.array(k), jnp.array(v), new, new, slots)
    for a, b in zip(got, want, strict=False):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_write_kv_validates_scales():
    pages = jnp.zeros((KVH, PAGES, PAGE, D), jnp.int8)
    new = jnp.zeros((1, KVH, D))
    slots = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError):
        pk.write_kv(pages, pages, new, new, slots)
    fpages = jnp.zeros((KVH, PAGES, PAGE, D))
    scales = jnp.ones((KVH, PAGES, PAGE))
    with pytest.raises(ValueError):
        pk.write_kv(fpages, fpages, new, new, slots, k_scales=scales, v_scales=scales)
