"""KVSwapper: pages go to host memory and come back into other pages, exactly (or within int8 rounding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalellm_jax.engine.kv_swap import KVSwapper, page_bytes
from scalellm_jax.model.kv_pool import LayerKV

KVH, PAGES, PS, D, LAYERS = 2, 12, 4, 8, 2


def pools(rng, quantized=False, dtype=jnp.float32):
    def layer():
        if quantized:
            return LayerKV(jnp.asarray(rng.integers(-127, 128, (KVH, PAGES, PS, D)), jnp.int8),
                           jnp.asarray(rng.integers(-127, 128, (KVH, PAGES, PS, D)), jnp.int8),
                           jnp.asarray(rng.random((KVH, PAGES, PS)), jnp.float32),
                           jnp.asarray(rng.random((KVH, PAGES, PS)), jnp.float32))
        return LayerKV(*(jnp.asarray(rng.standard_normal((KVH, PAGES, PS, D)), dtype) for _ in range(2)))
    return tuple(layer() for _ in range(LAYERS))


def snapshot(p):
    return [[np.asarray(a, np.float32) for a in jax.tree.leaves(layer)] for layer in p]


@pytest.mark.parametrize("quantized, compress", [(False, False), (True, False), (True, True), (False, True)])
def test_swap_out_and_back_into_other_pages(quantized, compress):
    rng = np.random.default_rng()
    p = pools(rng, quantized)
    swapper = KVSwapper(PAGES, (1, 2, 4, 8), compress=compress)
    before = snapshot(p)
    src, dst = (3, 7, 5), (9, 1, 10)
    swapper.swap_out(p, "r", src)
    swapper.finish_transfers()
    p = jax.tree.map(lambda a: a.at[:, list(src)].set(jnp.nan if a.dtype != jnp.int8 else 0), p)
    p = swapper.swap_in(p, "r", dst)
    after = snapshot(p)
    untouched = [i for i in range(PAGES) if i not in src + dst]
    for layer_before, layer_after in zip(before, after, strict=True):
        for b, a in zip(layer_before, layer_after, strict=True):
            np.testing.assert_array_equal(a[:, untouched], b[:, untouched])  # padding wrote nothing
            if compress and not quantized:  # int8 rounding: at most max|x| / 254 per (head, token) vector
                bound = np.abs(b[:, list(src)]).max(axis=-1, keepdims=True) / 254 + 1e-6
                assert np.all(np.abs(a[:, list(dst)] - b[:, list(src)]) <= bound)
            else:
                np.testing.assert_array_equal(a[:, list(dst)], b[:, list(src)])
    assert swapper.num_swapped == 0 and swapper.num_swap_outs == swapper.num_swap_ins == 1


def test_swap_in_within_the_same_step_and_drop():
    rng = np.random.default_rng()
    p = pools(rng)
    swapper = KVSwapper(PAGES, (1, 2, 4, 8), compress=False)
    before = snapshot(p)
    swapper.swap_out(p, "r", (2,))
    p = swapper.swap_in(p, "r", (6,))  # before finish_transfers: the device copy is used directly
    np.testing.assert_array_equal(snapshot(p)[0][0][:, 6], before[0][0][:, 2])
    swapper.swap_out(p, "gone", (4, 5))
    swapper.drop("gone")
    swapper.finish_transfers()
    assert swapper.num_swapped == 0
    with pytest.raises(ValueError, match="2 pages out but 1"):
        swapper.swap_out(p, "x", (4, 5))
        swapper.swap_in(p, "x", (6,))


def test_warmup_compiles_every_bucket_once():
    rng = np.random.default_rng()
    swapper = KVSwapper(PAGES, (1, 2, 4), compress=False)
    p = swapper.warmup(pools(rng))
    compiled = swapper.num_compilations()
    for n in (1, 3, 4, 2):
        swapper.swap_out(p, f"r{n}", tuple(range(1, n + 1)))
        p = swapper.swap_in(p, f"r{n}", tuple(range(5, 5 + n)))
    assert swapper.num_compilations() == compiled == 6


def test_page_bytes():
    rng = np.random.default_rng()
    floats, ints = pools(rng), pools(rng, quantized=True)
    assert page_bytes(floats, False) == LAYERS * 2 * KVH * PS * D * 4
    assert page_bytes(floats, True) == LAYERS * 2 * (KVH * PS * D + KVH * PS * 4)
    assert page_bytes(ints, False) == page_bytes(ints, True) == LAYERS * 2 * (KVH * PS * D + KVH * PS * 4)
