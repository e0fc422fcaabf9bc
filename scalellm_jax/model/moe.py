"""Sparse mixture-of-experts block (Mixtral): router softmax → top-k → renormalise → SwiGLU experts.

Tokens are grouped by expert so each expert's weights are read once per step and no FLOPs go to
experts a token was not routed to, unlike the "run every expert on every token" formulation
(``dense_moe_reference``, kept for tests), which costs num_experts/top_k times the FLOPs. The
grouped matmul is ``jax.lax.ragged_dot`` on accelerators and, on CPU, where XLA lowers
``ragged_dot`` densely, a capacity-batched matmul plus an exact overflow loop: on CPU the fastest of
ragged, dense, chunk loop and capacity + overflow (``benchmarks/results/moe_dispatch-*.json``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from scalellm_jax.config import ModelConfig
from scalellm_jax.model.layers import declared_params
from scalellm_jax.parallel import EXPERT, TENSOR, module_specs


def route(x: jax.Array, router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Hugging Face routing: logits in the model dtype, softmax in float32, top-k, renormalise.

    x [N, H], router [H, E] → (weights float32 [N, k], expert ids int32 [N, k]).
    """
    logits = x @ router
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Order of the flattened (token, k) assignments sorted by expert, and rows per expert.

    Ids equal to ``num_experts`` ("not on this shard") sort last and are not counted.
    """
    flat = experts.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def _combine(sorted_out: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Undo the expert sort and sum each token's k expert outputs by its routing weights (float32)."""
    n, top_k = weights.shape
    unsorted = jnp.zeros_like(sorted_out).at[order].set(sorted_out)
    return jnp.sum(unsorted.reshape(n, top_k, -1) * weights[..., None], axis=1)


def grouped_experts(
    x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
    out_dtype=None, expected_rows: int | None = None,
) -> jax.Array:
    """Apply the routed SwiGLU experts. x [N, H]; weights/experts [N, k]; w_* [E, ...] → [N, H].

    An expert id equal to E means "not here" (another expert-parallel shard owns it): that
    assignment contributes nothing. ``out_dtype`` defaults to ``x.dtype``. ``expected_rows`` (how
    many assignments are expected to be here) only sizes the CPU version's buffers.
    """
    order, group_sizes = _sort_by_expert(experts, w_gate.shape[0])
    rows = x[order // experts.shape[1]]
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(rows, w_up, group_sizes, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    down = jax.lax.ragged_dot(hidden, w_down, group_sizes, preferred_element_type=jnp.float32)
    covered = jnp.arange(experts.size) < jnp.sum(group_sizes)  # rows past the groups are "not here"
    down = jnp.where(covered[:, None], down, 0.0)
    return _combine(down, order, weights).astype(out_dtype or x.dtype)


def grouped_experts_chunked(
    x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
    out_dtype=None, expected_rows: int | None = None,
) -> jax.Array:
    """Same result as :func:`grouped_experts`, in two CPU-friendly passes over expert-sorted rows.

    XLA:CPU lowers ``ragged_dot`` to a dense product against every group (num_experts × the
    FLOPs). Instead: (1) the first ``capacity`` rows of every expert (the mean load plus its square
    root, a Poisson standard deviation, rounded up to 8) go through one batched matmul triple over
    all experts, which XLA runs multi-threaded;
    (2) rows past an expert's capacity, if any, are walked in chunks that never mix experts by a
    ``fori_loop`` with a traced trip count (zero iterations under balanced routing). The result is
    exact for any routing; work is at most (E × capacity + overflow + E × chunk) rows. With at most
    half as many assignments as experts (decode of one or two sequences) the capacity pass is
    skipped: it would read every expert's weights where the loop reads only the chosen experts'. Under expert
    parallelism most assignments belong to other shards: ``expected_rows`` (those expected here)
    sizes the capacity from the local share, not from every row. Measurements of the capacity and chunk
    choices: benchmarks/results/moe_capacity-*.json.
    """
    num_experts, hidden = w_gate.shape[0], x.shape[1]
    rows_total = experts.size
    mean_load = -(-(expected_rows or rows_total) // num_experts)
    few = 2 * rows_total <= num_experts
    capacity = 0 if few else min(rows_total, -(-(mean_load + math.isqrt(mean_load) + 1) // 8) * 8)
    chunk = 8 if few else 32
    order, counts = _sort_by_expert(experts, num_experts)
    token_of = order // experts.shape[1]
    ends = jnp.cumsum(counts)
    starts = ends - counts

    def swiglu(rows, e_gate, e_up, e_down):  # rows [..., R, H] against one or a batch of experts
        gate = jnp.matmul(rows, e_gate, preferred_element_type=jnp.float32)
        up = jnp.matmul(rows, e_up, preferred_element_type=jnp.float32)
        return jnp.matmul((jax.nn.silu(gate) * up).astype(x.dtype), e_down, preferred_element_type=jnp.float32)

    # (1) capacity pass: [E, capacity] slots into the sorted order; empty slots read row 0, masked.
    out = jnp.zeros((rows_total + chunk, hidden), jnp.float32)
    if capacity:
        slot = starts[:, None] + jnp.arange(capacity)[None, :]
        live = jnp.arange(capacity)[None, :] < counts[:, None]
        tokens = jnp.where(live, token_of[jnp.clip(slot, 0, rows_total - 1)], 0)
        dense = swiglu(x[tokens], w_gate, w_up, w_down)  # [E, capacity, H]
        out = out.at[jnp.where(live, slot, rows_total)].set(jnp.where(live[..., None], dense, 0.0))

    # (2) overflow: rows [starts + capacity, ends) of each expert, chunk by chunk.
    over_start = starts + jnp.minimum(counts, capacity)
    over_counts = counts - (over_start - starts)
    # Token ids (not rows) padded by a chunk: the loop gathers only the rows it visits, and under
    # balanced routing it visits none.
    padded_token_of = jnp.concatenate([token_of, jnp.zeros((chunk,), token_of.dtype)])
    chunks_per_expert = -(-over_counts // chunk)
    first_chunk = jnp.cumsum(chunks_per_expert) - chunks_per_expert
    max_chunks = -(-rows_total // chunk) + num_experts
    chunk_ids = jnp.arange(max_chunks)
    chunk_expert = jnp.clip(jnp.searchsorted(first_chunk + chunks_per_expert, chunk_ids, side="right"),
                            0, num_experts - 1)
    chunk_start = over_start[chunk_expert] + (chunk_ids - first_chunk[chunk_expert]) * chunk

    def body(c, out):
        e, start = chunk_expert[c], chunk_start[c]
        rows = x[jax.lax.dynamic_slice_in_dim(padded_token_of, start, chunk)]  # rows past ends[e]: masked below
        down = swiglu(rows, w_gate[e], w_up[e], w_down[e])
        live = (start + jnp.arange(chunk)) < ends[e]
        current = jax.lax.dynamic_slice_in_dim(out, start, chunk)
        return jax.lax.dynamic_update_slice_in_dim(out, current + jnp.where(live[:, None], down, 0.0), start, 0)

    out = jax.lax.fori_loop(0, jnp.sum(chunks_per_expert), body, out)[:rows_total]
    return _combine(out, order, weights).astype(out_dtype or x.dtype)


def sharded_moe(x, router, w_gate, w_up, w_down, top_k: int, mesh, apply, weight_specs: dict[str, P]):
    """The MoE block under ``jax.shard_map``: experts over the ``expert`` axis, each expert's
    intermediate dimension over ``tensor``.

    Replicate-and-mask: every shard routes all tokens (the router is tiny and replicated), runs
    the assignments that land on its own experts and its own slice of the intermediate
    dimension, and one ``psum`` over both axes adds the partial outputs. It moves the activations
    once (an all-reduce of [tokens, hidden]) instead of two all-to-alls with capacity padding,
    which suits decode-sized batches; prefill-heavy multi-host runs may prefer all_to_all.
    """
    def local(x, router, w_gate, w_up, w_down):
        weights, experts = route(x, router, top_k)
        num_local = w_gate.shape[0]
        local_ids = experts - jax.lax.axis_index(EXPERT) * num_local
        here = (local_ids >= 0) & (local_ids < num_local)
        partial = apply(
            x, jnp.where(here, weights, 0.0), jnp.where(here, local_ids, num_local), w_gate, w_up, w_down,
            out_dtype=jnp.float32, expected_rows=experts.size // mesh.shape[EXPERT],
        )
        return jax.lax.psum(partial, (EXPERT, TENSOR)).astype(x.dtype)

    specs = (P(),) + tuple(weight_specs[n] for n in ("router", "w_gate", "w_up", "w_down"))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
        x, router, w_gate, w_up, w_down
    )


def dense_moe_reference(x, router, w_gate, w_up, w_down, top_k):
    """Every expert on every token, masked by the routing weights (test oracle only)."""
    weights, experts = route(x, router, top_k)
    dense_w = jnp.zeros((x.shape[0], w_gate.shape[0]), jnp.float32)
    dense_w = dense_w.at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    gate = jnp.einsum("nh,ehi->eni", x, w_gate, preferred_element_type=jnp.float32)
    up = jnp.einsum("nh,ehi->eni", x, w_up, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    down = jnp.einsum("eni,eih->enh", hidden, w_down, preferred_element_type=jnp.float32)
    return jnp.einsum("enh,ne->nh", down, dense_w).astype(x.dtype)


MOE_IMPLS = ("auto", "ragged", "chunked")


def resolve_moe_impl(impl: str) -> str:
    """``auto``: the chunked loop on CPU (where ragged_dot is dense), ``ragged_dot`` elsewhere."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "chunked" if jax.default_backend() == "cpu" else "ragged"
    return impl


class SparseMoE(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    mesh: Mesh | None = None  # with a mesh: expert/tensor parallel under shard_map

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        p = declared_params(self, c, self.dtype)
        router, w_gate, w_up, w_down = p["router"], p["w_gate"], p["w_up"], p["w_down"]
        flat = x.reshape(-1, x.shape[-1])
        apply = grouped_experts_chunked if resolve_moe_impl(self.impl) == "chunked" else grouped_experts
        if self.mesh is not None and self.mesh.size > 1:
            out = sharded_moe(flat, router, w_gate, w_up, w_down, c.num_experts_per_tok, self.mesh, apply,
                              module_specs(self.name, c, self.mesh))
        else:
            weights, experts = route(flat, router, c.num_experts_per_tok)
            out = apply(flat, weights, experts, w_gate, w_up, w_down)
        return out.reshape(x.shape)
