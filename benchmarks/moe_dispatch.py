"""MoE dispatch under expert parallelism: replicate-and-mask (``model/moe.py``) vs all_to_all.

    python -m benchmarks.moe_dispatch                     # 8 fake CPU devices, JSON to benchmarks/runs/
    python -m benchmarks.moe_dispatch --batches 64 --reps 10

One MoE block with the small Mixtral dims (hidden 512, intermediate 1792, 8 experts, top-2, float32)
on an (expert, tensor) mesh of 8 devices: expert=8 and expert=2 × tensor=4, batches of 64 and 512
tokens. Activations arrive replicated, as they do in the model.

* ``replicate_mask``: ``scalellm_jax.model.moe.sharded_moe`` as the model runs it: every device
  routes all tokens, computes the assignments of its own experts (its slice of the intermediate
  dim), and one ``psum`` of ``[tokens, hidden]`` float32 over all devices combines them.
* ``all_to_all``: written here. Each expert shard takes 1/ep of the tokens, routes them, writes
  them into a per-expert capacity buffer ``[experts, capacity, hidden]``, ``all_to_all`` sends
  every expert's rows to its owner, the owner runs a batched SwiGLU over ``[ep × capacity]`` rows
  per local expert, a second ``all_to_all`` returns the rows, each shard combines its tokens, and
  a ``psum`` over ``tensor`` plus an ``all_gather`` over ``expert`` rebuild the replicated output.
  ``exact`` capacity (every token of a shard could pick the same expert) never drops a token and
  must agree with replicate-and-mask; ``cf=1.25`` (1.25 × the mean load) drops overflowing
  assignments, which changes the model's output, and is timed only to show what dropping would buy.

Each variant is checked against the single-device ``dense_moe_reference`` before timing. Times are
the minimum over ``--reps`` calls: the fake devices share the host's cores with other jobs, so
CPU timings are noisy and measure compute and copies, not interconnect bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.provenance import git_state, output_dir
from scalellm_jax.config import ModelConfig
from scalellm_jax.model.moe import (
    dense_moe_reference,
    grouped_experts,
    grouped_experts_chunked,
    resolve_moe_impl,
    route,
    sharded_moe,
)
from scalellm_jax.parallel import EXPERT, TENSOR, ParallelConfig, build_mesh, module_specs

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 512, 1792, 8, 2
# Only the MoE block's sizes matter here; the rest just makes a valid config for the weight specs.
MOE_CONFIG = ModelConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=1,
                         num_heads=8, num_kv_heads=8, head_dim=HIDDEN // 8, num_experts=EXPERTS,
                         num_experts_per_tok=TOP_K)


def moe_specs(mesh) -> tuple:
    """in_specs of (x, router, w_gate, w_up, w_down), from the model's weight declarations."""
    specs = module_specs("moe", MOE_CONFIG, mesh)
    return (P(),) + tuple(specs[n] for n in ("router", "w_gate", "w_up", "w_down"))


def exact_capacity(tokens_per_shard: int) -> int:
    """Rows per expert per source shard that can never overflow (top-k experts are distinct)."""
    return tokens_per_shard


def factor_capacity(tokens_per_shard: int, factor: float) -> int:
    return max(1, int(np.ceil(factor * tokens_per_shard * TOP_K / EXPERTS)))


def a2a_local(x, router, w_gate, w_up, w_down, *, top_k: int, capacity: int):
    """Per-device body of the all_to_all MoE (see the module docstring). x [N, H] replicated."""
    ep, shard = jax.lax.axis_size(EXPERT), jax.lax.axis_index(EXPERT)
    num_local, hidden = w_gate.shape[0], x.shape[1]
    num_experts = num_local * ep
    n = x.shape[0] // ep
    xs = jax.lax.dynamic_slice_in_dim(x, shard * n, n)  # this shard's tokens
    weights, experts = route(xs, router, top_k)
    flat = experts.reshape(-1)  # [n * k], token-major
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # arrival order within its expert
    slot = jnp.where(position < capacity, flat * capacity + position, num_experts * capacity)  # past the end: dropped
    send = jnp.zeros((num_experts * capacity, hidden), x.dtype).at[slot].set(xs[jnp.arange(n * top_k) // top_k],
                                                                            mode="drop")
    # Expert-major buffer: chunk d (experts of shard d) goes to shard d; chunk s of the result came from shard s.
    recv = jax.lax.all_to_all(send, EXPERT, 0, 0, tiled=True)
    rows = recv.reshape(ep, num_local, capacity, hidden).transpose(1, 0, 2, 3).reshape(num_local, -1, hidden)
    gate = jnp.einsum("erh,ehi->eri", rows, w_gate, preferred_element_type=jnp.float32)
    up = jnp.einsum("erh,ehi->eri", rows, w_up, preferred_element_type=jnp.float32)
    down = jnp.einsum("eri,eih->erh", (jax.nn.silu(gate) * up).astype(x.dtype), w_down,
                      preferred_element_type=jnp.float32)  # partial over tensor (intermediate slice)
    back = down.reshape(num_local, ep, capacity, hidden).transpose(1, 0, 2, 3).reshape(-1, hidden)
    returned = jax.lax.all_to_all(back, EXPERT, 0, 0, tiled=True)  # [E * capacity, H], global expert order
    per_assignment = jnp.concatenate([returned, jnp.zeros((1, hidden), returned.dtype)])[slot]
    out = jnp.sum(per_assignment.reshape(n, top_k, hidden) * weights[..., None], axis=1)
    out = jax.lax.psum(out, TENSOR)  # combine the intermediate slices: linear, so after the combine (fewer rows)
    return jax.lax.all_gather(out, EXPERT, tiled=True).astype(x.dtype)


def a2a_moe(x, router, w_gate, w_up, w_down, top_k: int, mesh, capacity: int):
    specs = moe_specs(mesh)
    body = functools.partial(a2a_local, top_k=top_k, capacity=capacity)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
        x, router, w_gate, w_up, w_down
    )


def dropped_fraction(x, router, ep: int, capacity: int) -> float:
    """Share of (token, expert) assignments past ``capacity`` (computed on the host, per source shard)."""
    _, experts = route(x, router, TOP_K)
    experts = np.asarray(experts).reshape(ep, -1)
    dropped = 0
    for shard in experts:
        counts = np.bincount(shard, minlength=EXPERTS)
        dropped += int(np.maximum(counts - capacity, 0).sum())
    return dropped / experts.size


def expert_kernel():
    """The grouped-experts function the model picks on this backend (``moe_impl="auto"``)."""
    return grouped_experts_chunked if resolve_moe_impl("auto") == "chunked" else grouped_experts


def min_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def bench(ep: int, tp: int, batch: int, reps: int, seed: int = 0) -> dict:
    mesh = build_mesh(ParallelConfig(tensor_parallel_size=tp, expert_parallel_size=ep))
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (batch, HIDDEN), jnp.float32)
    router = 0.02 * jax.random.normal(keys[1], (HIDDEN, EXPERTS), jnp.float32)
    w_gate, w_up = (0.02 * jax.random.normal(k, (EXPERTS, HIDDEN, INTERMEDIATE), jnp.float32) for k in keys[2:4])
    w_down = 0.02 * jax.random.normal(keys[4], (EXPERTS, INTERMEDIATE, HIDDEN), jnp.float32)
    expected = np.asarray(dense_moe_reference(x, router, w_gate, w_up, w_down, TOP_K))
    scale = np.abs(expected).max()

    def put(array, spec):
        return jax.device_put(array, NamedSharding(mesh, spec))

    args = tuple(put(a, spec) for a, spec in zip((x, router, w_gate, w_up, w_down), moe_specs(mesh), strict=True))
    apply = expert_kernel()
    n = batch // ep
    variants = {
        "replicate_mask": (jax.jit(functools.partial(sharded_moe, top_k=TOP_K, mesh=mesh, apply=apply,
                                                     weight_specs=module_specs("moe", MOE_CONFIG, mesh))), None),
        "all_to_all_exact": (jax.jit(functools.partial(a2a_moe, top_k=TOP_K, mesh=mesh,
                                                       capacity=exact_capacity(n))), exact_capacity(n)),
        "all_to_all_cf1.25": (jax.jit(functools.partial(a2a_moe, top_k=TOP_K, mesh=mesh,
                                                        capacity=factor_capacity(n, 1.25))), factor_capacity(n, 1.25)),
    }
    result = {"expert": ep, "tensor": tp, "batch": batch, "variants": {}}
    for name, (fn, capacity) in variants.items():
        rel_err = float(np.abs(np.asarray(fn(*args)) - expected).max() / scale)
        entry = {"min_ms": 1e3 * min_time(fn, *args, reps=reps), "max_rel_err_vs_dense": rel_err}
        if capacity is not None:
            entry["capacity_per_expert_per_shard"] = capacity
            entry["dropped_fraction"] = dropped_fraction(x, router, ep, capacity)
        result["variants"][name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moe_dispatch", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--meshes", nargs="+", default=["8x1", "2x4"], help="EXPERTxTENSOR")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per variant; the minimum is reported")
    parser.add_argument("--out", type=pathlib.Path, help="default: benchmarks/runs/moe_dispatch-<date>.json")
    args = parser.parse_args(argv)
    # 8 fake devices when this runs on CPU (a no-op for accelerators); must precede the first device use.
    jax.config.update("jax_num_cpu_devices", 8)
    if jax.device_count() < 8:
        print(f"needs 8 devices, jax sees {jax.device_count()} (was a JAX backend started before main?)",
              file=sys.stderr)
        return 2
    rows = []
    for mesh_shape in args.meshes:
        ep, tp = (int(v) for v in mesh_shape.split("x"))
        for batch in args.batches:
            row = bench(ep, tp, batch, args.reps)
            rows.append(row)
            cells = "  ".join(f"{k} {v['min_ms']:.2f} ms (err {v['max_rel_err_vs_dense']:.1e}"
                              + (f", dropped {v['dropped_fraction']:.1%})" if "dropped_fraction" in v else ")")
                              for k, v in row["variants"].items())
            print(f"expert={ep} tensor={tp} batch={batch}: {cells}", flush=True)
    now = datetime.datetime.now(datetime.UTC)
    out = args.out or output_dir() / f"moe_dispatch-{now.strftime('%Y%m%d-%H%M%S')}.json"
    device = jax.devices()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "moe_dispatch",
        "date": now.isoformat(timespec="seconds"),
        "device": {"kind": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
                   "cpu_count": os.cpu_count(), "note": "fake devices share the host cores with other jobs"},
        "versions": {"jax": jax.__version__},
        "git": git_state(),
        "command": " ".join(["python -m benchmarks.moe_dispatch", *sys.argv[1:]]),
        "config": {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "experts": EXPERTS, "top_k": TOP_K,
                   "dtype": "float32", "reps": args.reps, "timing": "min over reps of one blocked call",
                   "expert_kernel_replicate_mask": expert_kernel().__name__},
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
