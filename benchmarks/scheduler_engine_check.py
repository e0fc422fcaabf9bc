"""Real-engine check of the scheduler simulator: fcfs vs alise through ``LLMEngine`` on CPU, and the sim's forecast.

    python -m benchmarks.scheduler_engine_check [--json] [--num-requests 64] [--load 0.9]

Same workload recipe as ``scheduler_sim`` (seeded split of the dataset, predictor trained on one part,
the other replayed with Poisson arrivals and 20% priority-0 requests), made small enough for a CPU:
``--num-requests`` requests, prompts cut to ``--max-prompt-len`` tokens and every real output length
scaled by ``--length-scale`` (capped at ``--max-tokens``; the predictions are scaled alike). Scaling
rather than capping keeps the long tail that makes the policies differ. The engine is the small
random-weight preset of ``offline_throughput`` with ``--max-num-seqs`` seats, few enough that a queue
forms at the chosen load (with many seats nothing ever waits and every policy is fcfs).

Capacity is measured on the engine as in the simulator: fcfs, all requests at t=0, output tokens per
second while requests are queued, over the mean output length. Then fcfs and alise each serve
``--repeats`` Poisson streams at ``--load`` × capacity (metrics pooled, the policy that goes first
alternating); latency runs from a request's planned arrival to the step that returns its last token.
The simulator replays the same streams with the cached calibration for the same geometry and its own
capacity, and the two orderings are compared.

Clock: on a shared machine other jobs slow wall-clock steps by a varying factor (2x and more on a
busy 2-core box), which swamps the difference between policies. By default the engine therefore
runs on ``CpuClock``: this process's CPU seconds, with idle gaps between arrivals skipped, so a step
costs about the same whatever else runs. ``--clock wall`` serves in real time instead. Either way the
absolute seconds are not the simulator's (CPU seconds count both cores' work): compare ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from benchmarks import scheduler_sim as sim
from benchmarks.engine_profile import StepProfile
from benchmarks.provenance import git_state
from benchmarks.sim_calibration import StepTimes
from benchmarks.sim_replay import KVBudget, RunResult, summarize
from benchmarks.sim_workload import (
    FixedLengths,
    Row,
    build_requests,
    length_tables,
    load_rows,
    make_stream,
    split_rows,
)

DEFAULTS = {"num_requests": 64, "max_num_seqs": 8, "max_num_batched_tokens": 256, "max_model_len": 512,
            "max_prompt_len": 128, "max_tokens": 256}


def scaled_workload(args, tokenizer) -> tuple[list[Row], np.ndarray, float]:
    """Replay rows with scaled output lengths, their scaled predictions, and the predictor's fit time."""
    from benchmarks.sim_workload import train_predictor

    rows = load_rows(args.dataset, tokenizer, max_prompt_len=args.max_prompt_len)
    train, replay = split_rows(rows, args.train_fraction, args.seed)
    start = time.perf_counter()
    predictions = train_predictor(train, fast=args.fast_predictor).predict_many([r.text for r in replay])
    fit_s = time.perf_counter() - start

    def scale(n: float) -> int:
        return max(1, min(args.max_tokens, math.ceil(n * args.length_scale)))

    scaled = [dataclasses.replace(r, output_len=scale(r.output_len)) for r in replay]
    return scaled, np.array([max(1.0, p * args.length_scale) for p in predictions]), fit_s


class CpuClock:
    """Seconds of this process's CPU time (all threads: the engine and XLA's workers), plus idle gaps skipped.

    Other jobs on a shared machine slow wall-clock steps by whatever share of the cores they take; the
    CPU time a step costs barely changes, so latencies measured on this clock compare across runs.
    """

    def __init__(self) -> None:
        self._skipped = 0.0

    def __call__(self) -> float:
        return time.process_time() + self._skipped

    def wait_until(self, t: float) -> None:
        self._skipped += max(0.0, t - self())


class WallClock:
    def __call__(self) -> float:
        return time.monotonic()

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self()))


def drive(engine, requests, clock) -> RunResult:
    """Serve ``requests`` (arrival times relative to now) as they arrive on ``clock``; times per request.

    The scheduler reads the same clock (waiting times for aging); the engine's step-cost model keeps
    measuring wall seconds.
    """
    order = sorted(requests, key=lambda r: r.arrival_time)
    index = {r.request_id: i for i, r in enumerate(order)}
    first, finish = np.full(len(order), np.nan), np.full(len(order), np.nan)
    seen: dict[str, int] = {}
    preempted_before = engine.stats().num_preemptions
    swapper = engine.runner.swapper
    swapped_before = swapper.num_swap_outs if swapper is not None else 0
    nxt = steps = tokens = 0
    saturated = None
    engine.scheduler.clock = clock
    start = clock()
    while nxt < len(order) or engine.has_unfinished():
        now = clock() - start
        while nxt < len(order) and order[nxt].arrival_time <= now:
            r = order[nxt]
            engine.add_request(r.prompt_token_ids, r.sampling_params, request_id=r.request_id, priority=r.priority,
                               arrival_time=start + r.arrival_time)
            nxt += 1
        if not engine.has_unfinished():
            clock.wait_until(start + order[nxt].arrival_time)
            continue
        outputs = engine.step()
        steps += 1
        t = clock() - start
        for o in outputs:
            i = index[o.request_id]
            tokens += len(o.token_ids) - seen.get(o.request_id, 0)
            seen[o.request_id] = len(o.token_ids)
            if o.token_ids and np.isnan(first[i]):
                first[i] = t
            if o.finished:
                finish[i] = t
        if saturated is None and nxt == len(order) and engine.scheduler.num_waiting == 0:
            saturated = tokens / t
    return RunResult(
        arrival=np.array([r.arrival_time for r in order]), first_token=first, finish=finish,
        output_len=np.array([seen[r.request_id] for r in order]),
        priority=np.array([r.priority for r in order]), steps=steps,
        preemptions=engine.stats().num_preemptions - preempted_before,
        swap_outs=(swapper.num_swap_outs if swapper is not None else 0) - swapped_before,
        saturated_tokens_per_s=saturated,
    )


def engine_rows(engine, streams, rows, predictions, load: float, clock, say) -> tuple[dict, list[dict]]:
    """Capacity (fcfs burst of the first stream) and one row per policy at ``load`` × capacity, pooled over
    ``streams``; the policies alternate which goes first, so drifting load from other jobs hits both alike."""
    from scalellm_jax.engine.policies import AliseConfig, make_policy

    def run(policy_name: str, stream, rate: float | None) -> RunResult:
        requests = build_requests(stream, rows, rate, engine.max_model_len)
        lengths = FixedLengths(length_tables(requests, stream, predictions)[0])
        engine.scheduler.policy = make_policy(policy_name, lengths=lengths, costs=engine.step_costs,
                                              alise=AliseConfig())
        return drive(engine, requests, clock)

    profile = StepProfile(engine)  # where the burst run's step time goes, to compare with the calibration
    try:
        burst = run("fcfs", streams[0], None)
    finally:
        profile.remove()
    capacity = capacity_of(burst) | {"profile": profile.report(burst.makespan)}
    say(f"engine capacity: {capacity['capacity_rps']:.3f} req/s")
    runs: dict[str, list[RunResult]] = {"fcfs": [], "alise": []}
    for k, stream in enumerate(streams):
        for policy in ("fcfs", "alise") if k % 2 == 0 else ("alise", "fcfs"):
            runs[policy].append(run(policy, stream, load * capacity["capacity_rps"]))
            say(f"  engine {policy} stream {k}: mean {runs[policy][-1].latency.mean():.2f} s")
    return capacity, [{"policy": p, "load": load, **summarize(r)} for p, r in runs.items()]


def capacity_of(burst: RunResult) -> dict:
    mean_len = float(burst.output_len.mean())
    return {"capacity_rps": burst.saturated_tokens_per_s / mean_len,
            "saturated_tokens_per_s": burst.saturated_tokens_per_s, "mean_output_len": mean_len,
            "burst_rps": len(burst.arrival) / burst.makespan, "mean_step_ms": 1e3 * burst.makespan / burst.steps}


def sim_rows(args, engine, streams, rows, predictions, load: float) -> tuple[dict, list[dict]]:
    """The simulator's forecast for the same streams and engine geometry."""
    from scalellm_jax.engine.policies import AliseConfig

    times = StepTimes.load(args.calibration)
    geometry = dataclasses.replace(times.geometry, max_num_seqs=args.max_num_seqs,
                                   max_num_batched_tokens=args.max_num_batched_tokens,
                                   max_model_len=engine.max_model_len)
    setup = sim.Setup(dataclasses.replace(times, geometry=geometry),
                      KVBudget(engine.kv.num_pages, engine.kv.num_host_pages), rows, predictions, streams)
    burst = sim.run_policy(dataclasses.replace(setup, streams=streams[:1]), "fcfs", None, AliseConfig())[0]
    capacity = capacity_of(burst)
    return capacity, [{"policy": p, "load": load, **summarize(sim.run_policy(setup, p, load * capacity["capacity_rps"],
                                                                               AliseConfig()))}
                      for p in ("fcfs", "alise")]


def ratios(rows: list[dict]) -> dict:
    by = {r["policy"]: r for r in rows}
    return {k: by["alise"][k] / by["fcfs"][k] for k in ("mean_latency_s", "p99_latency_s", "mean_ttft_s")}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduler_engine_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=pathlib.Path, default=sim.DEFAULT_DATA)
    p.add_argument("--calibration", type=pathlib.Path, default=sim.DEFAULT_CALIBRATION)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    p.add_argument("--length-scale", type=float, default=0.25, help="multiply real output lengths by this")
    p.add_argument("--load", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=3, help="arrival streams (each served by both policies)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="engine time: this process's CPU seconds (robust to other jobs) or wall seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--priority-fraction", type=float, default=0.2)
    p.add_argument("--fast-predictor", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()
    for path in (args.dataset, args.calibration):
        if not path.is_file():
            print(f"error: not found: {path} (run python -m benchmarks.scheduler_sim --calibrate first "
                  "for the calibration)", file=sys.stderr)
            return 2
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    from benchmarks.offline_throughput import model_config
    from scalellm_jax.config import EngineConfig
    from scalellm_jax.engine.engine import LLMEngine
    from scalellm_jax.engine.policies import AliseConfig
    from scalellm_jax.loader import Model
    from scalellm_jax.tokenizer import MistralTokenizer

    rows, predictions, fit_s = scaled_workload(args, MistralTokenizer())
    streams = [make_stream(len(rows), args.num_requests, args.priority_fraction, args.seed + k)
               for k in range(args.repeats)]
    say(f"predictor fitted in {fit_s:.1f} s; {args.num_requests} requests, mean output "
        f"{np.mean([rows[i].output_len for i in streams[0].row_index]):.0f} tokens, {args.repeats} streams")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, aging_rate=AliseConfig().aging_rate)
    engine = LLMEngine(Model.random(model_config(False), seed=0, dtype="float32"), config)
    start = time.perf_counter()
    engine.warmup(progress=False)
    say(f"engine warmup {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    load_before = os.getloadavg()
    clock = CpuClock() if args.clock == "cpu" else WallClock()
    e_capacity, e_rows = engine_rows(engine, streams, rows, predictions, args.load, clock, say)
    engine_s = time.perf_counter() - start
    machine_load = {"before": load_before, "after": os.getloadavg(), "cpu_count": os.cpu_count()}
    s_capacity, s_rows = sim_rows(args, engine, streams, rows, predictions, args.load)
    e_ratio, s_ratio = ratios(e_rows), ratios(s_rows)
    same = (e_ratio["mean_latency_s"] < 1) == (s_ratio["mean_latency_s"] < 1)
    result = {
        "benchmark": "scheduler_engine_check",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git, "command": " ".join(["python -m benchmarks.scheduler_engine_check", *raw_argv]),
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "engine_config": dataclasses.asdict(config) | {"num_pages": engine.kv.num_pages,
                                                        "num_host_pages": engine.kv.num_host_pages},
        "alise_config": dataclasses.asdict(AliseConfig()), "engine_s": engine_s, "machine_load": machine_load,
        "engine": {"capacity": e_capacity, "rows": e_rows, "alise_over_fcfs": e_ratio},
        "sim": {"capacity": s_capacity, "rows": s_rows, "alise_over_fcfs": s_ratio},
        "same_mean_latency_ordering": same,
    }
    out = args.out or sim.RESULTS / f"scheduler_sim-engine-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for name, part in (("engine", result["engine"]), ("sim", result["sim"])):
            cap = part["capacity"]
            print(f"{name:7} capacity {cap['capacity_rps']:.3f} req/s, burst run {cap['mean_step_ms']:.1f} ms per step")
            for bucket, v in cap.get("profile", {}).get("by_bucket", {}).items():
                print(f"    {bucket:>12}: {v['steps']:5} steps, {v['mean_ms']:6.1f} ms")
            for r in part["rows"]:
                print(f"  {r['policy']:6} load {r['load']}: mean {r['mean_latency_s']:.2f} s, p50 "
                      f"{r['p50_latency_s']:.2f}, p99 {r['p99_latency_s']:.2f}, ttft {r['mean_ttft_s']:.2f}, "
                      f"{r['mean_normalized_latency_s']:.4f} s/token, {r['throughput_rps']:.3f} req/s")
            print("  alise/fcfs: " + ", ".join(f"{k} {v:.3f}" for k, v in part["alise_over_fcfs"].items()))
        print(f"same mean-latency ordering: {same}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
