"""Kernel benchmark: paged decode and ragged prefill attention vs XLA and jax's bundled kernel.

    python -m benchmarks.kernels                 # GPU: full sweep, JSON to benchmarks/results/
    python -m benchmarks.kernels --out r.json    # also write JSON on CPU
    python -m benchmarks.kernels --batches 64 --contexts 4096

Mixtral attention shapes: 32 query heads, 8 KV heads, head_dim 128, bfloat16, page size 16.

* Decode, batch x context: ours (default: GQA rows on CUDA cores), ours with the padded-MMA
  variant, the jnp reference under XLA, and ``jax.experimental.pallas.ops.gpu.paged_attention``.
  Reported: time, achieved GB/s over the K/V bytes that must be read, the fraction of the measured
  device-to-device copy bandwidth, and the ratio of each competitor's time to ours.
* Prefill, one 4k prompt and a batch of 1k prompts: ours vs the jnp reference; reported as
  TFLOP/s (causal: ``2 * sum(len^2) * heads * head_dim``) and as a fraction of the measured bf16
  matmul rate.

On CPU the kernels can only run in the Pallas interpreter, so a tiny smoke size runs instead
(numbers meaningless, it checks the harness end to end). Times are the median of repeated
back-to-back calls; at tiny sizes they include dispatch overhead.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchmarks.provenance import git_state
from pallas_kernels import reference

try:
    from jax.experimental.pallas.ops.gpu import paged_attention as bundled
except ImportError:  # deprecated in jax 0.11, may be removed later
    bundled = None

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = jnp.bfloat16
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def timeit(fn, *args, min_time=0.2, reps=5):
    """Median seconds per call of ``fn(*args)`` (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - start, 1e-6)
    n = max(1, min(1000, int(min_time / reps / once)))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def copy_bandwidth(nbytes):
    """Device-to-device bandwidth (bytes/s) of a read+write elementwise pass."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    t = timeit(jax.jit(lambda a: a + jnp.bfloat16(1)), x)
    return 2 * nbytes / t


def matmul_rate(n):
    """bf16 matmul FLOP/s for an ``n x n x n`` product."""
    a = jnp.ones((n, n), jnp.bfloat16)
    t = timeit(jax.jit(lambda x, y: x @ y), a, a)
    return 2 * n ** 3 / t


def paged_cache(rng, batch, context, num_pages=None):
    """Random K/V pages for ``batch`` sequences of ``context`` tokens, pages shuffled."""
    pages_per_seq = context // PAGE
    num_pages = num_pages or batch * pages_per_seq
    key_k, key_v = jax.random.split(jax.random.key(int(rng.integers(2**31))))
    shape = (KV_HEADS, num_pages, PAGE, HEAD_DIM)
    k = jax.random.normal(key_k, shape, DTYPE)
    v = jax.random.normal(key_v, shape, DTYPE)
    table = rng.permutation(num_pages)[:batch * pages_per_seq].reshape(batch, pages_per_seq)
    return k, v, jnp.asarray(table, jnp.int32)


def attempt(fn):
    """Run a measurement; failures (OOM, unsupported) become an error string."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - a benchmark row must not kill the sweep
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def bench_decode(rng, batch, context, interpret, copy_bw):
    k, v, table = paged_cache(rng, batch, context)
    q = jax.random.normal(jax.random.key(1), (batch, HEADS, HEAD_DIM), DTYPE)
    lengths = jnp.full((batch,), context, jnp.int32)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * jnp.dtype(DTYPE).itemsize
    impls = {
        "ours": functools.partial(pk.paged_decode_attention, scale=scale, interpret=interpret),
        "ours_mma": functools.partial(pk.paged_decode_attention, scale=scale,
                                      interpret=interpret, use_mma=True),
        "xla": functools.partial(reference.paged_decode_attention, scale=scale),
    }
    if bundled is not None:
        pages = context // PAGE
        splits = min(16, pages)
        while pages % splits:
            splits -= 1
        impls["jax_bundled"] = jax.jit(functools.partial(
            lambda q, k, v, t, n, **kw: bundled.paged_attention(q * scale, k, v, t, n, **kw),
            k_splits=splits, interpret=interpret))
    row = {"batch": batch, "context": context, "kv_bytes": kv_bytes}
    run_all(row, impls, (q, k, v, table, lengths),
            lambda t: {"GBps": kv_bytes / t / 1e9, "frac_copy_bw": kv_bytes / t / copy_bw})
    return row


def bench_prefill(rng, prompt_lens, interpret, flops_peak):
    batch, context = len(prompt_lens), max(prompt_lens)
    k, v, table = paged_cache(rng, batch, context)
    total = sum(prompt_lens)
    q = jax.random.normal(jax.random.key(2), (total, HEADS, HEAD_DIM), DTYPE)
    lens = jnp.asarray(prompt_lens, jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(prompt_lens)]), jnp.int32)
    scale = HEAD_DIM ** -0.5
    flops = 2 * sum(n * n for n in prompt_lens) * HEADS * HEAD_DIM  # causal half of 4*n^2*h*d
    impls = {
        "ours": functools.partial(pk.ragged_prefill_attention, scale=scale, interpret=interpret),
        "xla": functools.partial(reference.ragged_prefill_attention, scale=scale),
    }
    row = {"prompt_lens": list(prompt_lens), "flops": flops}
    run_all(row, impls, (q, k, v, table, lens, cu),
            lambda t: {"TFLOPs": flops / t / 1e12, "frac_matmul": flops / t / flops_peak})
    return row


def run_all(row, impls, args, metrics):
    """Time every implementation into ``row``; also record each one's relative error against
    ours (a GPU run doubles as the first on-device correctness check of the kernels) and
    ``speedup_vs_<name>`` = competitor time / our time (> 1 means ours is faster)."""
    outputs = {}
    for name, fn in impls.items():
        t, err = attempt(lambda fn=fn: timeit(fn, *args))
        row[name] = {"error": err} if err else {"ms": t * 1e3, **metrics(t)}
        if not err:
            out, err = attempt(lambda fn=fn: np.asarray(fn(*args), np.float32))
            outputs[name] = out
    ours = outputs.get("ours")
    for name, out in outputs.items():
        if name != "ours" and ours is not None and out is not None:
            row[name]["rel_err_vs_ours"] = float(np.linalg.norm(out - ours) / np.linalg.norm(out))
            row[f"speedup_vs_{name}"] = row[name]["ms"] / row["ours"]["ms"]


def print_table(title, rows, key, metric, frac):
    print(f"\n{title}")
    names = [n for n in rows[0] if isinstance(rows[0][n], dict)]
    print(f"{key:>14} " + " ".join(f"{n:>28}" for n in names) + "  speedups")
    for row in rows:
        cells = []
        for n in names:
            r = row[n]
            cells.append(f"{'ERR':>28}" if "error" in r else
                         f"{r['ms']:9.3f}ms {r[metric]:8.1f} {100 * r[frac]:6.1f}%")
        ratios = " ".join(f"{k[11:]}={v:.2f}x (err {row[k[11:]]['rel_err_vs_ours']:.1e})"
                          for k, v in row.items() if k.startswith("speedup_vs_"))
        label = row.get("label") or f"{row['batch']}x{row['context']}"
        print(f"{label:>14} " + " ".join(cells) + "  " + ratios)


def git_commit():
    return git_state()["commit"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--out", type=pathlib.Path, help="write JSON here (default on GPU: "
                        "benchmarks/results/kernels-<device>-<date>.json)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    rng = np.random.default_rng()
    if on_gpu:
        batches, contexts, prompts = args.batches, args.contexts, [[4096], [1024] * 4]
        copy_bw, flops_peak = copy_bandwidth(2 << 30), matmul_rate(8192)
    else:  # the interpreter is slow: a smoke size that exercises every code path
        batches, contexts, prompts = [2], [64], [[48, 16]]
        copy_bw, flops_peak = copy_bandwidth(64 << 20), matmul_rate(512)
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s, bf16 matmul {flops_peak / 1e12:.2f} TFLOP/s"
          + ("" if on_gpu else "  [CPU smoke run: Pallas interpret mode, numbers meaningless]"))
    decode = [bench_decode(rng, b, c, not on_gpu, copy_bw) for b in batches for c in contexts]
    print_table("decode (ms, GB/s, % of copy bandwidth)", decode, "batch x ctx", "GBps",
                "frac_copy_bw")
    prefill = [bench_prefill(rng, p, not on_gpu, flops_peak) for p in prompts]
    for row in prefill:
        row["label"] = "+".join(map(str, row["prompt_lens"]))
    print_table("prefill (ms, TFLOP/s, % of bf16 matmul)", prefill, "prompts", "TFLOPs",
                "frac_matmul")
    out = args.out
    if out is None and on_gpu:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        kind = device.device_kind.replace(" ", "_")
        out = RESULTS / f"kernels-{kind}-{stamp}.json"
    if out is not None:
        result = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "device": device.device_kind, "platform": device.platform,
            "jax_version": jax.__version__, "commit": git_commit(),
            "command": " ".join(["python -m benchmarks.kernels", *sys.argv[1:]]),
            "interpret": not on_gpu, "copy_bandwidth_GBps": copy_bw / 1e9,
            "bf16_matmul_TFLOPs": flops_peak / 1e12,
            "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                       "page_size": PAGE, "dtype": jnp.dtype(DTYPE).name},
            "decode": decode, "prefill": prefill,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
