"""The GPU path, checked without a GPU: lower the kernels for CUDA on this (CPU) machine.

Cross-platform lowering runs the Pallas -> Triton IR lowering rules (power-of-two shapes,
supported primitives, masked loads/stores, gathers) and shows which backend ``pallas_call`` was
routed to. It does not run Triton's own PTX compiler, which only a GPU host exercises.

Without a GPU attached, jax 0.10 lowers for a fallback sm_90 target by itself; jax 0.11 asks for
the target GPU through an abstract mesh (``gpu_target``).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk

SDS = jax.ShapeDtypeStruct
KVH, D, PAGES, PAGE, SEQS, TOKENS = 8, 128, 64, 16, 4, 100


def gpu_target():
    """Context naming the GPU to lower for (an H200), where this jax can take one.

    jax 0.11 reads the target from the abstract mesh's ``AbstractDevice`` and fails without a GPU
    when none is given; jax 0.10 has the same class but ignores it and falls back to sm_90.
    """
    device_cls = getattr(jax.sharding, "AbstractDevice", None)
    if device_cls is None or not hasattr(jax.sharding, "use_abstract_mesh"):
        return contextlib.nullcontext()
    device = device_cls(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def lower_for_cuda(fn, *args):
    with gpu_target():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def kv_args(kv_dtype):
    pages = SDS((KVH, PAGES, PAGE, D), kv_dtype)
    scales = SDS((KVH, PAGES, PAGE), jnp.float32)
    return (pages, pages), (scales, scales) if kv_dtype == jnp.int8 else ()


def scale_kwargs(scales):
    return {"k_scales": scales[0], "v_scales": scales[1]} if scales else {}


def _decode(q, k, v, table, lengths, *scales, **kw):
    return pk.paged_decode_attention(q, k, v, table, lengths, scale=0.1, **scale_kwargs(scales), **kw)


def _prefill(q, k, v, table, lengths, cu, *scales, **kw):
    return pk.ragged_prefill_attention(q, k, v, table, lengths, cu, scale=0.1, **scale_kwargs(scales), **kw)


CASES = [  # (group, q dtype, kv dtype, extra kwargs)
    (4, jnp.bfloat16, jnp.bfloat16, {}),
    (4, jnp.bfloat16, jnp.bfloat16, {"sliding_window": 100}),
    (4, jnp.bfloat16, jnp.int8, {}),
    (1, jnp.float32, jnp.float32, {}),
    (8, jnp.bfloat16, jnp.bfloat16, {}),
    (16, jnp.bfloat16, jnp.bfloat16, {}),  # MMA decode path
]


@pytest.mark.parametrize("group,q_dtype,kv_dtype,kwargs", CASES)
def test_kernels_lower_to_triton_for_cuda(group, q_dtype, kv_dtype, kwargs):
    (k, v), scales = kv_args(kv_dtype)
    table, lengths = SDS((SEQS, 8), jnp.int32), SDS((SEQS,), jnp.int32)
    decode = lower_for_cuda(functools.partial(_decode, **kwargs),
                            SDS((SEQS, KVH * group, D), q_dtype), k, v, table, lengths, *scales)
    prefill = lower_for_cuda(functools.partial(_prefill, **kwargs),
                             SDS((TOKENS, KVH * group, D), q_dtype), k, v, table, lengths,
                             SDS((SEQS + 1,), jnp.int32), *scales)
    for text in (decode, prefill):
        assert "xla.gpu.triton" in text  # Triton (jax 0.10 defaults to Mosaic GPU)


def test_decode_padded_mma_variant_lowers():
    (k, v), _ = kv_args(jnp.bfloat16)
    text = lower_for_cuda(functools.partial(_decode, use_mma=True),
                          SDS((SEQS, KVH * 4, D), jnp.bfloat16), k, v, SDS((SEQS, 8), jnp.int32),
                          SDS((SEQS,), jnp.int32))
    assert "xla.gpu.triton" in text


def test_non_power_of_two_head_dim_is_rejected_on_gpu():
    pages = jnp.zeros((2, 4, 4, 96), jnp.float32)
    q = jnp.zeros((1, 4, 96), jnp.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        pk.paged_decode_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32),
                                  jnp.ones((1,), jnp.int32), scale=0.1)
