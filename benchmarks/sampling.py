"""Sampling cost by batch composition: what top-p or top-k on some rows adds to a temperature-only batch.

    python -m benchmarks.sampling                       # batch 64, Mixtral's 32000 vocabulary, JSON to benchmarks/runs/
    python -m benchmarks.sampling --batches 16 64 --rounds 9

Times the jitted ``engine.sampling.sample`` (the engine's sampler) on ``[batch, vocab]`` float32 logits for
each batch composition, and the previous method (a full descending sort of every row, as vLLM's CPU sampler
does) for the same compositions. Two kinds of logits: ``peaked`` (a trained model's: a few likely tokens and a
long tail; top-p 0.9 stays inside the top-64 candidates for most rows) and ``flat`` (a random-weight model's:
top-p 0.9 reaches deep into the vocabulary, so every top-p row takes the exact bisection path). The cases run
in rotation, once per round, and each round's time is the median of ``--calls`` blocked calls; the result
reports the median over rounds and the spread (min/max round). Then end to end (``--engine-streams``): requests
through ``LLM.generate`` on the tiny model, with temperature only, top-p, top-k, penalties, a logit bias or
min-p on every request. The issue's
target: one top-p row in a batch of
64 costs at most 1.2x a temperature-only batch.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.provenance import git_state, output_dir
from scalellm_jax.engine import sampling

TARGET_RATIO = 1.2  # one top-p row at batch 64 vs temperature only
CASES = {  # name -> per row (temperature, top_k, top_p) given the row index and batch size
    "greedy": lambda i, b: (0.0, 0, 1.0),
    "temperature": lambda i, b: (0.8, 0, 1.0),
    "one_top_p": lambda i, b: (0.8, 0, 0.9) if i == 0 else (0.8, 0, 1.0),
    "one_top_k": lambda i, b: (0.8, 40, 1.0) if i == 0 else (0.8, 0, 1.0),
    "all_top_p": lambda i, b: (0.8, 0, 0.9),
    "all_top_k_top_p": lambda i, b: (0.8, 50, 0.95),
    "mixed_45pct_top_p": lambda i, b: (0.8, 0, 0.9) if (i * 20) % 44 < 9 else (0.8, 0, 1.0),
}


def logits(kind: str, batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "flat":
        return rng.standard_normal((batch, vocab)).astype(np.float32)
    slope = rng.uniform(1.0, 3.0, (batch, 1))  # per-row peakedness
    rank_logits = -slope * np.log1p(np.arange(vocab))[None, :] + 0.3 * rng.standard_normal((batch, vocab))
    return np.stack([rng.permutation(row) for row in rank_logits]).astype(np.float32)


def sort_thresholds(scaled, top_k, top_p, floor):
    """The previous method: sort each row, cut at the k-th (and the floor), then where the cumulative mass
    reaches top_p."""
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = (rank < jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]) & (desc >= floor[:, None])
    probs = jax.nn.softmax(jnp.where(keep, desc, -jnp.inf), axis=-1)
    keep &= (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (rank == 0)
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1)


def samplers() -> dict:
    return {"candidates_bisection": jax.jit(sampling.sample),
            "full_sort": jax.jit(functools.partial(sampling.sample, thresholds=sort_thresholds))}


def time_call(fn, args, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(batch: int, vocab: int, kinds: list[str], rounds: int, calls: int, methods: dict) -> list[dict]:
    keys, steps = sampling.row_keys(jnp.arange(batch)), jnp.zeros(batch, jnp.int32)
    setups = []
    for kind in kinds:
        x = jnp.asarray(logits(kind, batch, vocab))
        for case, row in CASES.items():
            t, k, p = (np.array(v) for v in zip(*(row(i, batch) for i in range(batch)), strict=True))
            args = (x, keys, steps, jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32))
            for method, fn in methods.items():
                jax.block_until_ready(fn(*args))  # compile and warm
                setups.append(((kind, case, method), fn, args))
    samples: dict = {key: [] for key, _, _ in setups}
    for r in range(rounds):  # rotate the starting case each round so no case always follows the same one
        order = setups[r % len(setups):] + setups[: r % len(setups)]
        for key, fn, args in order:
            samples[key].append(time_call(fn, args, calls))
    rows = []
    for (kind, case, method), ts in samples.items():
        base = samples[(kind, "temperature", method)]
        ratios = [a / b for a, b in zip(ts, base, strict=True)]
        rows.append({"batch": batch, "vocab": vocab, "logits": kind, "case": case, "method": method,
                     "ms_median": 1e3 * float(np.median(ts)), "ms_min": 1e3 * min(ts), "ms_max": 1e3 * max(ts),
                     "vs_temperature_median": float(np.median(ratios)), "vs_temperature_min": min(ratios),
                     "vs_temperature_max": max(ratios)})
    return rows


ENGINE_CASES = {"temperature": {}, "top_p_0.9": {"top_p": 0.9}, "top_k_40": {"top_k": 40},
                # logit controls (a device history row per request): what they add to a temperature-only batch
                "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
                "logit_bias": {"logit_bias": {t: 2.0 for t in range(1000, 1010)}},
                "min_p_0.05": {"min_p": 0.05}}


def engine_bench(streams: int, tokens: int, repeats: int) -> list[dict]:
    """The issue's end-to-end case: ``streams`` requests of ``tokens`` tokens through ``LLM.generate`` on the
    tiny random-weight model (flat logits: the exact-search path), every request with the case's filter;
    the cases alternate over ``repeats``."""
    from scalellm_jax import LLM, SamplingParams

    llm = LLM("tiny", dtype="float32", max_num_seqs=streams, max_num_batched_tokens=256)
    prompts = [[1, *range(100 + i, 110 + i)] for i in range(streams)]
    times: dict = {case: [] for case in ENGINE_CASES}
    for r in range(repeats + 1):  # the first round warms up every case
        for case, extra in ENGINE_CASES.items():
            params = SamplingParams(max_tokens=tokens, temperature=0.8, seed=r, ignore_eos=True, **extra)
            start = time.perf_counter()
            llm.generate(prompt_token_ids=prompts, sampling_params=params)
            if r:
                times[case].append(time.perf_counter() - start)
    base = times["temperature"]
    return [{"streams": streams, "tokens": tokens, "case": case, "s_median": float(np.median(ts)),
             "s_min": min(ts), "s_max": max(ts),
             "vs_temperature_median": float(np.median([a / b for a, b in zip(ts, base, strict=True)]))}
            for case, ts in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--logits", nargs="+", choices=["peaked", "flat"], default=["peaked", "flat"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="blocked calls per case per round (median)")
    parser.add_argument("--methods", nargs="+", choices=["candidates_bisection", "full_sort"],
                        default=["candidates_bisection", "full_sort"])
    parser.add_argument("--engine-streams", type=int, default=16, help="end to end: requests (0: skip)")
    parser.add_argument("--engine-tokens", type=int, default=32)
    parser.add_argument("--engine-repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, help="default: benchmarks/runs/sampling-<date>.json")
    args = parser.parse_args(argv)
    methods = {k: v for k, v in samplers().items() if k in args.methods}
    rows = []
    for batch in args.batches:
        for row in bench(batch, args.vocab, args.logits, args.rounds, args.calls, methods):
            rows.append(row)
            print(f"batch {batch:4d} {row['logits']:6s} {row['case']:18s} {row['method']:21s} "
                  f"{row['ms_median']:8.2f} ms  x{row['vs_temperature_median']:.2f} of temperature-only "
                  f"(rounds {row['vs_temperature_min']:.2f}-{row['vs_temperature_max']:.2f})", flush=True)
    engine_rows = (engine_bench(args.engine_streams, args.engine_tokens, args.engine_repeats)
                   if args.engine_streams else [])
    for row in engine_rows:
        print(f"engine, {row['streams']} streams x {row['tokens']} tokens, {row['case']:12s} {row['s_median']:6.2f} s "
              f"(x{row['vs_temperature_median']:.2f} of temperature-only; {row['s_min']:.2f}-{row['s_max']:.2f} s)")
    verdicts = [{"batch": r["batch"], "logits": r["logits"], "ratio": r["vs_temperature_median"],
                 "target": TARGET_RATIO, "met": r["vs_temperature_median"] <= TARGET_RATIO}
                for r in rows if r["case"] == "one_top_p" and r["method"] == "candidates_bisection"
                and r["batch"] == 64]
    for v in verdicts:
        print(f"target: one top-p row at batch 64 ({v['logits']}) x{v['ratio']:.2f} <= x{TARGET_RATIO}: "
              f"{'met' if v['met'] else 'MISSED'}")
    now = datetime.datetime.now(datetime.UTC)
    out = args.out or output_dir() / f"sampling-{now.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    out.write_text(json.dumps({
        "benchmark": "sampling",
        "date": now.isoformat(timespec="seconds"),
        "device": {"kind": device.device_kind, "platform": device.platform, "cpu_count": os.cpu_count(),
                   "processor": platform.processor() or platform.machine()},
        "versions": {"jax": jax.__version__},
        "git": git_state(),
        "command": " ".join(["python -m benchmarks.sampling", *(argv if argv is not None else sys.argv[1:])]),
        "config": {"rounds": args.rounds, "calls": args.calls, "candidates": sampling.CANDIDATES,
                   "filter_rows": sampling.FILTER_ROWS, "cases": list(CASES),
                   "timing": "per round the median of blocked calls; cases rotate within each round"},
        "targets": verdicts,
        "results": rows,
        "engine": engine_rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
