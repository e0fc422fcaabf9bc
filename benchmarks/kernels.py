"""Kernel benchmark: on-device correctness and a tuning sweep of our paged attention kernels.

    python -m benchmarks.kernels                 # GPU: ceilings, correctness, sweep; JSON to benchmarks/runs/
    python -m benchmarks.kernels --out r.json    # also write JSON on CPU (interpret mode, smoke sizes)
    python -m benchmarks.kernels --batches 64 --contexts 4096 --budget-s 120

Mixtral attention shapes: 32 query heads, 8 KV heads, head_dim 128, bfloat16, page size 16.

1. Ceilings: device copy bandwidth and bf16 matmul rate.
2. Correctness against the jnp reference (``benchmarks.kernel_correctness``: poisoned pages, edge
   lengths): bf16 KV, int8 KV and a sliding window with the default tuning, and every tuning
   configuration (``benchmarks.kernel_tuning``) on bf16 KV.
3. Speed of every tuning configuration against XLA (the jnp reference under jit) and jax's bundled
   ``jax.experimental.pallas.ops.gpu.paged_attention`` (recorded as missing where that jax lacks
   it): decode at batch x context, reported as achieved GB/s over the K/V bytes that must be read
   and as a fraction of the copy bandwidth; prefill (one long prompt, a batch of shorter ones) as
   TFLOP/s (causal: ``2 * sum(len^2) * heads * head_dim``) and a fraction of the matmul rate. Each
   timed output is also compared with XLA's.

Every measurement checks a ``Deadline`` first and is written to the JSON as it completes. On CPU
the kernels run in the Pallas interpreter at toy shapes: numbers meaningless, harness exercised.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import pathlib
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchmarks import kernel_tuning
from benchmarks.deadline import Deadline, Recorder
from benchmarks.provenance import git_state, output_dir
from pallas_kernels import reference

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as bundled
except ImportError:  # deprecated in jax 0.11, may be removed later
    bundled = None

# Relative error bound ||out - ref|| / ||ref|| by query dtype (the kernel tests' bounds).
TOL = {"bfloat16": 2e-2, "float32": 1e-5}


@dataclasses.dataclass(frozen=True)
class Shapes:
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page: int = 16
    dtype: str = "bfloat16"

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


MIXTRAL = Shapes()
SMOKE = Shapes(heads=8, kv_heads=2, head_dim=32, page=4)  # the same 4:1 GQA group, interpreter-sized


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one kernel run measures (``gpu_suite`` presets and ``main`` build these)."""

    shapes: Shapes = MIXTRAL
    copy_bytes: int = 2 << 30
    matmul_n: int = 8192
    decode: tuple[tuple[int, int], ...] = ((1, 4096), (64, 4096), (256, 4096))  # (batch, context)
    prefill: tuple[tuple[int, ...], ...] = ((4096,), (1024,) * 4)  # prompt lengths per call
    decode_configs: tuple[str, ...] = tuple(kernel_tuning.DECODE)
    prefill_configs: tuple[str, ...] = tuple(kernel_tuning.PREFILL)


# ---------------------------------------------------------------------------------------------- timing


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
    """bf16 matmul FLOP/s for an ``n x n x n`` product (random data: zeros run faster)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    t = timeit(jax.jit(lambda x, y: x @ y), a, a)
    return 2 * n ** 3 / t


def attempt(fn):
    """Run a measurement; failures (OOM, unsupported) become an error string."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - a benchmark row must not kill the sweep
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class Costs:
    """Predicted seconds of the next measurement of a kind: the slowest of the last few, else a fallback."""

    def __init__(self, fallback_s: float):
        self.fallback_s, self.seen = fallback_s, []

    def predict(self) -> float:
        return max(self.seen[-4:]) if self.seen else self.fallback_s

    def add(self, seconds: float) -> None:
        self.seen.append(seconds)


def budget_allows(what: str, costs: Costs, deadline: Deadline | None, rec: Recorder | None) -> bool:
    if deadline is None or deadline.allows(costs.predict()):
        return True
    if rec is not None:
        rec.skip(what, "deadline", deadline, costs.predict())
    return False


# ---------------------------------------------------------------------------------------------- inputs


def paged_cache(rng, batch, context, shapes=MIXTRAL):
    """Random K/V pages for ``batch`` sequences of ``context`` tokens, pages shuffled."""
    pages_per_seq = context // shapes.page
    num_pages = batch * pages_per_seq
    key_k, key_v = jax.random.split(jax.random.key(int(rng.integers(2**31))))
    shape = (shapes.kv_heads, num_pages, shapes.page, shapes.head_dim)
    k = jax.random.normal(key_k, shape, shapes.dtype)
    v = jax.random.normal(key_v, shape, shapes.dtype)
    table = rng.permutation(num_pages)[:batch * pages_per_seq].reshape(batch, pages_per_seq)
    return k, v, jnp.asarray(table, jnp.int32)


# ---------------------------------------------------------------------------------------------- speed


def _bundled_decode(context: int, shapes: Shapes, interpret: bool):
    pages = context // shapes.page
    splits = min(16, pages)
    while pages % splits:
        splits -= 1
    scale = shapes.scale
    return jax.jit(functools.partial(
        lambda q, k, v, t, n, **kw: bundled.paged_attention(q * scale, k, v, t, n, **kw),
        k_splits=splits, interpret=interpret))


def bench_decode(rng, batch, context, interpret, copy_bw, *, shapes=MIXTRAL, configs=None, **budget):
    """One decode shape: every tuning configuration in ``configs`` (default: all), XLA, jax's kernel."""
    configs = tuple(kernel_tuning.DECODE) if configs is None else configs
    k, v, table = paged_cache(rng, batch, context, shapes)
    q = jax.random.normal(jax.random.key(1), (batch, shapes.heads, shapes.head_dim), shapes.dtype)
    lengths = jnp.full((batch,), context, jnp.int32)
    kv_bytes = 2 * batch * context * shapes.kv_heads * shapes.head_dim * jnp.dtype(shapes.dtype).itemsize
    impls = {"xla": functools.partial(reference.paged_decode_attention, scale=shapes.scale)}
    impls.update({f"ours/{c}": functools.partial(pk.paged_decode_attention, scale=shapes.scale,
                                                 interpret=interpret, **kernel_tuning.DECODE[c]) for c in configs})
    if bundled is not None:
        impls["jax_bundled"] = _bundled_decode(context, shapes, interpret)
    row = {"batch": batch, "context": context, "kv_bytes": kv_bytes, "impls": {}}
    if bundled is None:
        row["impls"]["jax_bundled"] = {"error": f"jax.experimental.pallas.ops.gpu.paged_attention is not in "
                                                f"jax {jax.__version__}"}
    run_all(row, impls, (q, k, v, table, lengths), shapes,
            lambda t: {"GBps": kv_bytes / t / 1e9, "frac_copy_bw": kv_bytes / t / copy_bw},
            label=f"decode {batch}x{context}", **budget)
    return row


def bench_prefill(rng, prompt_lens, interpret, flops_peak, *, shapes=MIXTRAL, configs=None, **budget):
    """One ragged prefill call of ``prompt_lens`` fresh prompts: every configuration, and XLA."""
    configs = tuple(kernel_tuning.PREFILL) if configs is None else configs
    k, v, table = paged_cache(rng, len(prompt_lens), max(prompt_lens), shapes)
    q = jax.random.normal(jax.random.key(2), (sum(prompt_lens), shapes.heads, shapes.head_dim), shapes.dtype)
    lens = jnp.asarray(prompt_lens, jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(prompt_lens)]), jnp.int32)
    flops = 2 * sum(n * n for n in prompt_lens) * shapes.heads * shapes.head_dim  # causal half of 4*n^2*h*d
    impls = {"xla": functools.partial(reference.ragged_prefill_attention, scale=shapes.scale)}
    impls.update({f"ours/{c}": functools.partial(pk.ragged_prefill_attention, scale=shapes.scale,
                                                 interpret=interpret, **kernel_tuning.PREFILL[c]) for c in configs})
    row = {"prompt_lens": list(prompt_lens), "label": "+".join(map(str, prompt_lens)), "flops": flops, "impls": {}}
    run_all(row, impls, (q, k, v, table, lens, cu), shapes,
            lambda t: {"TFLOPs": flops / t / 1e12, "frac_matmul": flops / t / flops_peak},
            label=f"prefill {row['label']}", **budget)
    return row


def run_all(row, impls, args, shapes, metrics, *, label="", deadline=None, rec=None, costs=None):
    """Time every implementation into ``row["impls"]`` (XLA first: each other output's ``rel_err_vs_xla``
    is checked against the tolerance), then ``speedup_vs_<xla|jax_bundled>`` = their time / our default
    configuration's, and the same for the fastest configuration (> 1: ours is faster)."""
    costs = costs or Costs(5.0)
    ref = None
    for name, fn in impls.items():
        if not budget_allows(f"{label} {name}", costs, deadline, rec):
            row["impls"][name] = {"skipped": "deadline"}
            continue
        start = time.monotonic()
        t, err = attempt(lambda fn=fn: timeit(fn, *args))
        entry = {"error": err} if err else {"ms": t * 1e3, **metrics(t)}
        if not err:
            out, err = attempt(lambda fn=fn: np.asarray(fn(*args), np.float32))
            if name == "xla":
                ref = out
            elif out is not None and ref is not None:
                rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
                entry.update(rel_err_vs_xla=rel, ok=bool(rel <= TOL[shapes.dtype]))
        costs.add(time.monotonic() - start)
        row["impls"][name] = entry
        print(f"  {label:>18} {name:22} " + (f"ERROR {entry['error']}" if "error" in entry else
              f"{entry['ms']:9.3f} ms" + (f"  err {entry['rel_err_vs_xla']:.1e}" if "rel_err_vs_xla" in entry
                                          else "")), flush=True)
        if rec is not None:
            rec.save()
    timed = {n: e["ms"] for n, e in row["impls"].items() if "ms" in e}
    ours = {n: ms for n, ms in timed.items() if n.startswith("ours/")}
    if ours:
        row["best"] = min(ours, key=ours.get)
        for other in ("xla", "jax_bundled"):
            if other in timed:
                if "ours/default" in ours:
                    row[f"speedup_vs_{other}"] = timed[other] / ours["ours/default"]
                row[f"best_speedup_vs_{other}"] = timed[other] / ours[row["best"]]
    if rec is not None:
        rec.save()


# ---------------------------------------------------------------------------------------------- the run


def run(plan: Plan, rec: Recorder, deadline: Deadline | None = None, *, into: dict | None = None,
        fallback_s: float = 5.0) -> None:
    """Ceilings, correctness, then the sweep, into ``into`` (default ``rec.results``), saved after every
    measurement; ``fallback_s`` predicts a measurement's time until some are measured."""
    from benchmarks import kernel_correctness  # it imports this module's helpers

    r = rec.results if into is None else into
    interpret = jax.devices()[0].platform != "gpu"
    rng = np.random.default_rng(0)
    r.update(interpret=interpret, shapes=dataclasses.asdict(plan.shapes),
             tuning={"decode": {c: kernel_tuning.DECODE[c] for c in plan.decode_configs},
                     "prefill": {c: kernel_tuning.PREFILL[c] for c in plan.prefill_configs}},
             jax_bundled_available=bundled is not None)
    copy_bw, flops = copy_bandwidth(plan.copy_bytes), matmul_rate(plan.matmul_n)
    r["ceilings"] = {"copy_bandwidth_GBps": copy_bw / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}
    print(f"ceilings: copy {copy_bw / 1e9:.1f} GB/s, bf16 matmul {flops / 1e12:.2f} TFLOP/s", flush=True)
    rec.save()
    r["correctness"] = []
    kernel_correctness.correctness(rng, plan, interpret, rows=r["correctness"], deadline=deadline, rec=rec,
                                   fallback_s=fallback_s)
    budget = {"deadline": deadline, "rec": rec, "costs": Costs(fallback_s)}
    r["decode"], r["prefill"] = [], []
    for batch, context in plan.decode:
        r["decode"].append({"batch": batch, "context": context, "impls": {}})  # visible while it runs
        r["decode"][-1] = bench_decode(rng, batch, context, interpret, copy_bw, shapes=plan.shapes,
                                       configs=plan.decode_configs, **budget)
    for prompts in plan.prefill:
        r["prefill"].append({"prompt_lens": list(prompts), "impls": {}})
        r["prefill"][-1] = bench_prefill(rng, list(prompts), interpret, flops, shapes=plan.shapes,
                                         configs=plan.prefill_configs, **budget)
    rec.save()


def failures(results: dict) -> list[str]:
    """Our correctness rows that failed and our timed outputs off the XLA reference (jax's kernel is only
    reported)."""
    bad = [f"correctness {r['kernel']}/{r['case']}/{r['config']}" for r in results.get("correctness", [])
           if not r["pass"]]
    for key in ("decode", "prefill"):
        for row in results.get(key, []):
            label = row.get("label") or f"{row.get('batch')}x{row.get('context')}"
            bad += [f"{key} {label} {name}: rel_err_vs_xla {e['rel_err_vs_xla']:.2e}"
                    for name, e in row["impls"].items() if name.startswith("ours/") and e.get("ok") is False]
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--budget-s", type=float, help="stop measuring (recording what was skipped) after this")
    parser.add_argument("--out", type=pathlib.Path, help="write JSON here (default on GPU: "
                        "benchmarks/runs/kernels-<device>-<date>.json)")
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s) if args.budget_s else None
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    if on_gpu:
        plan = Plan(decode=tuple((b, c) for b in args.batches for c in args.contexts))
    else:  # the interpreter is slow: a smoke size that exercises every code path
        plan = Plan(shapes=SMOKE, copy_bytes=64 << 20, matmul_n=512, decode=((2, 64),), prefill=((48, 16),))
        print("CPU smoke run: Pallas interpret mode, toy shapes, numbers meaningless")
    out = args.out
    if out is None and on_gpu:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = output_dir() / f"kernels-{device.device_kind.replace(' ', '_')}-{stamp}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, {  # without a path (CPU, no --out) it only prints
        "benchmark": "kernels", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
        "git": git_state(), "command": " ".join(["python -m benchmarks.kernels", *(argv or sys.argv[1:])]),
    })
    run(plan, rec, deadline)
    bad = failures(rec.results)
    for line in bad:
        print(f"FAILED {line}")
    if rec.results.get("skipped"):
        print(f"skipped (deadline): {len(rec.results['skipped'])} measurements")
    if out is not None:
        print(f"\nwrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
