"""Shared pieces of the attention kernels: backend choice, masked memory ops, online softmax.

Backend choice (applies to every kernel in this package)
--------------------------------------------------------
The kernels are written for the Pallas **Triton** lowering and request it explicitly by passing
``jax.experimental.pallas.triton.CompilerParams`` to ``pl.pallas_call``. Which lowering a
``pl.pallas_call`` gets on GPU depends on the jax version:

* jax 0.10.x: without compiler params the ``jax_pallas_use_mosaic_gpu`` flag decides, and it
  defaults to True, so the call goes to Mosaic GPU (with a deprecation warning: Mosaic GPU
  kernels should use ``plgpu.kernel``), where these kernels fail to lower. Triton compiler
  params select the Triton lowering.
* jax 0.11.x: the flag is gone and ``pl.pallas_call`` lowers through Triton only (no compiler
  params means default Triton params). The Triton backend is deprecated and warns at lowering;
  Mosaic GPU is reached only through ``plgpu.kernel``.

Passing Triton compiler params therefore gives the same lowering on both. Why Triton and not a
Mosaic GPU (``plgpu.kernel``) port:

* Paged attention needs *gathers*: a block of K/V is ``pages[page_ids]`` where ``page_ids`` comes
  from the page table. The Triton lowering turns that into one vectorised pointer load;
  Mosaic GPU wants TMA copies of statically tiled, swizzled SMEM blocks and a warpgroup
  programming model (``plgpu.kernel``) that would be a second, much larger code base.
* Ragged prefill needs masked loads/stores at data-dependent row offsets, which the Triton
  lowering supports directly (``pltriton.load/store(mask=...)``).
* The same kernel body runs under ``interpret=True`` on CPU, so what CI tests is what the GPU
  runs. Mosaic GPU interpret mode is a different interpreter.

The cost: Triton is deprecated and will eventually be removed. Everything that touches it goes
through this module (``compiler_params``, ``load``, ``store``), guarded by feature checks, so a
port is one file plus the kernel bodies. When ``interpret=True`` no compiler params are passed;
the masked ``load``/``store`` helpers wrap generic Pallas primitives that the interpreter runs
too. ``tests/pallas_kernels/test_pallas_triton_lowering.py`` lowers the kernels for CUDA on a CPU
machine and checks they are routed to Triton.

Lengths
-------
Every implementation (kernels, ``reference``, ``xla``) clips sequence lengths to the capacity of
a page-table row, ``max_pages_per_seq * page_size`` (``clip_lengths``): the interpreter clamps
out-of-range slices, but a GPU would read past the row.

Numerics shared by all kernels
------------------------------
Logits are kept in base-2 units (pre-multiplied by ``scale * log2(e)``) so the softmax uses
``exp2``. Masked logits are ``NEG_INF``, a large *finite* negative number: ``-inf - -inf``
would be NaN when a row has seen no valid key yet. Probabilities of masked keys are forced to
zero with ``where`` (not just by underflow), and V rows of invalid keys are zeroed before the
matmul, because ``0 * NaN = NaN`` and unused pages may hold NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

try:  # The Triton-specific Pallas API; deprecated, may disappear in a later jax.
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
    _pltriton = None

NEG_INF = -1e30
LOG2_E = math.log2(math.e)
# Programs to aim for when splitting decode work: a few waves on a 132-SM H100/H200.
TARGET_PROGRAMS = 512


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton tensors must have power-of-two dimensions)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (at least 1)."""
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


def cdiv(a, b):
    """Ceiling division for Python ints and traced int32 scalars alike."""
    return (a + b - 1) // b


def compiler_params(interpret: bool, num_warps: int, num_stages: int):
    """Triton compiler params (select the Triton lowering on jax 0.10), or None in interpret mode."""
    if interpret:
        return None
    cls = None
    if _pltriton is not None:
        # ``TritonCompilerParams`` is the pre-0.7 name of the same class.
        cls = getattr(_pltriton, "CompilerParams", None) or getattr(
            _pltriton, "TritonCompilerParams", None)
    if cls is None:
        raise NotImplementedError(
            "pallas_kernels needs the Pallas Triton backend "
            "(jax.experimental.pallas.triton.CompilerParams), which this jax does not have; "
            "use the jnp reference backend (pallas_kernels.reference) instead.")
    return cls(num_warps=num_warps, num_stages=num_stages)


def load(ref, mask=None, other=None):
    """Masked load; falls back to plain indexing + where when the Triton API is missing."""
    if mask is None:
        return ref[...]
    if _pltriton is not None:
        return _pltriton.load(ref, mask=mask, other=other)
    value = ref[...]
    return jnp.where(mask, value, jnp.zeros_like(value) if other is None else other)


def store(ref, value, mask=None):
    """Masked store (only rows where ``mask`` is set are written)."""
    if mask is None:
        ref[...] = value
    elif _pltriton is not None:
        _pltriton.store(ref, value, mask=mask)
    else:
        ref[...] = jnp.where(mask, value, ref[...])


def dot_nt(a, b):
    """``a @ b.T`` with float32 accumulation; exact (IEEE) float32 when the inputs are f32.

    The default Triton precision for f32 inputs is TF32, which is not accurate enough to
    match the references at 1e-5.
    """
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """``a @ b`` with float32 accumulation (see ``dot_nt``)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def softmax_update(carry, logits, valid):
    """One online-softmax step over a KV tile.

    Args:
      carry: ``(m, l, acc)``: running max (base-2 units), running sum, unnormalised output.
      logits: ``[rows, tile]`` float32 logits in base-2 units.
      valid: bool ``[rows, tile]`` (or broadcastable), or None when the whole tile is visible.

    Returns ``(m_new, l_new, alpha, p)``: the caller finishes with
    ``acc_new = alpha[:, None] * acc + p @ v``.
    """
    m_prev, l_prev, _ = carry
    if valid is not None:
        logits = jnp.where(valid, logits, NEG_INF)
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=-1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(logits - m_new[:, None])
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1)
    return m_new, l_new, alpha, p


def clip_lengths(lengths, page_table, page_size: int):
    """int32 ``lengths`` clipped to ``[0, page_table.shape[1] * page_size]``, a row's capacity."""
    return jnp.clip(lengths.astype(jnp.int32), 0, page_table.shape[1] * page_size)


def check_triton_dims(interpret: bool, **dims: int) -> None:
    """Triton tensors need power-of-two dimensions; fail early with a readable message.

    (The interpreter has no such limit, so CPU tests may use any size.) Offsets inside a
    kernel are int32, so one layer's page pool must also stay below 2**31 elements.
    """
    if interpret:
        return
    bad = {name: n for name, n in dims.items() if n & (n - 1)}
    if bad:
        raise ValueError(f"the Pallas Triton kernels need power-of-two sizes, got {bad}")


def check_pages(k_pages, v_pages, k_scales, v_scales):
    """Validate the paged KV layout shared by all kernels and references."""
    if k_pages.shape != v_pages.shape or k_pages.ndim != 4:
        raise ValueError(f"k_pages/v_pages must both be [num_kv_heads, num_pages, page_size, "
                         f"head_dim], got {k_pages.shape} and {v_pages.shape}")
    quantized = k_pages.dtype == jnp.int8
    if (v_pages.dtype == jnp.int8) != quantized:
        raise ValueError("k_pages and v_pages must both be int8 or both be floating point")
    if quantized != (k_scales is not None) or quantized != (v_scales is not None):
        raise ValueError("int8 pages need k_scales and v_scales; float pages take none")
    if quantized:
        for s in (k_scales, v_scales):
            if s.shape != k_pages.shape[:3]:
                raise ValueError(f"scales must be [num_kv_heads, num_pages, page_size] = "
                                 f"{k_pages.shape[:3]}, got {s.shape}")
    return quantized


def pad_heads(q, num_kv_heads: int, group_padded: int):
    """``[n, num_heads, d]`` -> ``[n, num_kv_heads, group_padded, d]`` (zero rows appended)."""
    n, num_heads, d = q.shape
    group = num_heads // num_kv_heads
    q = q.reshape(n, num_kv_heads, group, d)
    if group_padded != group:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, group_padded - group), (0, 0)))
    return q

