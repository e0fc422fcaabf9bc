"""LayerKV: one layer's KV pools as a pytree whose leaves are exactly its arrays (two float, four int8)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalellm_jax.model.kv_pool import LayerKV

SHAPE = (2, 5, 4, 8)  # [kv heads, pages, page size, head dim]


def float_layer():
    return LayerKV(jnp.ones(SHAPE), jnp.full(SHAPE, 2.0))


def int8_layer():
    return LayerKV(jnp.ones(SHAPE, jnp.int8), jnp.full(SHAPE, 2, jnp.int8),
                   jnp.full(SHAPE[:3], 0.5), jnp.full(SHAPE[:3], 0.25))


def test_leaves_are_the_arrays_in_field_order():
    f, q = float_layer(), int8_layer()
    assert not f.quantized and q.quantized
    assert [float(a.max()) for a in jax.tree.leaves(f)] == [1.0, 2.0]
    assert [float(a.max()) for a in jax.tree.leaves(q)] == [1.0, 2.0, 0.5, 0.25]
    assert f.scale_kwargs() == {}
    assert set(q.scale_kwargs()) == {"k_scales", "v_scales"} and q.scale_kwargs()["v_scales"] is q.v_scales


def test_tree_map_keeps_the_type_and_the_absent_scales():
    taken = jax.tree.map(lambda a: a[:, :2], float_layer())
    assert isinstance(taken, LayerKV) and taken.k_scales is None and taken.v_scales is None
    assert taken.k_pages.shape == (2, 2, 4, 8)
    positional = LayerKV(*jax.tree.leaves(int8_layer()))  # the order the kernels' write_kv returns
    assert jax.tree.structure(positional) == jax.tree.structure(int8_layer())


def test_scales_come_in_pairs_and_the_type_is_frozen():
    with pytest.raises(ValueError, match="together"):
        LayerKV(jnp.ones(SHAPE, jnp.int8), jnp.ones(SHAPE, jnp.int8), jnp.ones(SHAPE[:3]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        float_layer().k_pages = None


@pytest.mark.parametrize("make", [float_layer, int8_layer])
def test_a_jitted_update_donates_every_array(make):
    layer = make()
    old = jax.tree.leaves(layer)
    new = jax.jit(lambda p: jax.tree.map(lambda a: a + 1, p), donate_argnums=0)(layer)
    assert all(a.is_deleted() for a in old)
    assert new.quantized == layer.quantized
    np.testing.assert_array_equal(np.asarray(new.v_pages), np.full(SHAPE, 3))
