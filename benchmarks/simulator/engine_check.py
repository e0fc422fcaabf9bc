"""Real-engine check of the scheduler simulator: fcfs vs alise through ``LLMEngine``, and the sim's forecast.

    python -m benchmarks.simulator.engine_check [--json] [--num-requests 64] [--load 0.9]
    python -m benchmarks.simulator.engine_check --simulate-device h200 --dataset sharegpt --kv-gib 8

On a simulated device (``--simulate-device``, with ``--model``, ``--dataset``, ``--kv-gib``,
``--kv-cache-dtype``, ``--prediction-tau``, ``--swap-space-gb`` as in ``scheduler_sim --device``):
the engine is the real ``LLMEngine`` over ``SimulatedRunner`` (every step sleeps for the device
cost model's time; host work is real), with the simulator's geometry (256 seats, 2048 tokens per
step, 4096 context) and KV pool, on the simulator's own workload (``scheduler_sim.prepare``: the
same rows, predictions and arrival streams, answers ending with EOS at their true lengths, which
no policy sees) at ``--load`` (1.0) × the fcfs capacity each measures on the first stream. Time
is wall-clock. The simulator replays the same streams, and the alise/fcfs ratios are compared.

On CPU (the default):

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

from benchmarks.engine_profile import StepProfile
from benchmarks.provenance import git_state, output_dir
from benchmarks.simulator import scheduler_sim as sim
from benchmarks.simulator.calibration import StepTimes
from benchmarks.simulator.replay import KVBudget, RunResult, summarize
from benchmarks.simulator.workload import (
    FixedLengths,
    build_requests,
    build_sim_requests,
    length_tables,
    make_stream,
    predicted_table,
    split_rows,
)
from scalellm_jax.workloads import WorkloadRow, load_rows

DEFAULTS = {"num_requests": 64, "max_num_seqs": 8, "max_num_batched_tokens": 256, "max_model_len": 512,
            "max_prompt_len": 128, "max_tokens": 256}
DEVICE_DEFAULTS = {"num_requests": 300, "repeats": 2, "load": 1.0}  # geometry: scheduler_sim's (simulator.device)
CPU_ONLY = ("max_prompt_len", "max_tokens", "length_scale", "clock", "calibration")
DEVICE_ONLY = ("model", "kv_gib", "kv_cache_dtype", "prediction_tau", "swap_space_gb")


def scaled_workload(args, tokenizer) -> tuple[list[WorkloadRow], np.ndarray, float]:
    """Replay rows with scaled output lengths, their scaled predictions, and the predictor's fit time."""
    from benchmarks.simulator.workload import train_predictor

    rows = load_rows(args.dataset, tokenizer, max_prompt_len=args.max_prompt_len, too_long="truncate")
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


def swap_outs(engine) -> int:
    """Requests swapped out so far: the ``KVSwapper``'s count, or the simulated runner's."""
    runner = engine.runner
    counter = runner if engine.simulated is not None else runner.swapper
    return counter.num_swap_outs if counter is not None else 0


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
    swapped_before = swap_outs(engine)
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
        # tokens > 0: with asynchronous dispatch a step returns the previous step's tokens
        if saturated is None and nxt == len(order) and engine.scheduler.num_waiting == 0 and tokens > 0:
            saturated = tokens / t
    return RunResult(
        arrival=np.array([r.arrival_time for r in order]), first_token=first, finish=finish,
        output_len=np.array([seen[r.request_id] for r in order]),
        priority=np.array([r.priority for r in order]), steps=steps,
        preemptions=engine.stats().num_preemptions - preempted_before,
        swap_outs=swap_outs(engine) - swapped_before,
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


# ------------------------------------------------------------------------------ simulated device


def swap_space_gb(args) -> float:
    return args.swap_space_gb if args.swap_space_gb is not None else sim.DEFAULT_SWAP_SPACE_GB


def device_setup(args, say):
    """``scheduler_sim``'s setup (step costs, KV budget, rows, predictions, streams) for these options."""
    argv = ["--device", args.simulate_device, "--model", args.model or "mixtral-8x7b", "--dataset", args.dataset,
            "--num-requests", str(args.num_requests), "--seeds", str(args.repeats), "--seed", str(args.seed),
            "--train-fraction", str(args.train_fraction), "--priority-fraction", str(args.priority_fraction),
            "--swap-space-gb", str(swap_space_gb(args))]
    for name in ("kv_gib", "kv_cache_dtype", "prediction_tau", "max_num_seqs", "max_num_batched_tokens",
                 "max_model_len"):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.fast_predictor:
        argv.append("--fast-predictor")
    return sim.prepare(sim.parse_args(argv), say)


def device_engine(args, setup):
    """The real engine on the simulated device with the simulator's geometry, KV pool and swap space."""
    from scalellm_jax.config import EngineConfig, preset
    from scalellm_jax.engine.engine import LLMEngine
    from scalellm_jax.engine.simulated_device import SimulatedDevice
    from scalellm_jax.loader import Model

    g = setup.times.geometry
    model = Model(preset(args.model or "mixtral-8x7b"), params=None, dtype="bfloat16")
    config = EngineConfig(max_num_seqs=g.max_num_seqs, max_num_batched_tokens=g.max_num_batched_tokens,
                          max_model_len=g.max_model_len, page_size=g.page_size, num_pages=setup.budget.num_pages,
                          kv_cache_dtype="int8" if args.kv_cache_dtype == "int8" else "auto",
                          swap_space_gb=swap_space_gb(args))
    device = SimulatedDevice(args.simulate_device, model.config, seed=args.seed)
    engine = LLMEngine(model, config, simulated=device)
    if (engine.kv.num_pages, engine.kv.num_host_pages) != (setup.budget.num_pages, setup.budget.num_host_pages):
        raise RuntimeError(f"engine KV pages {engine.kv.num_pages} + host {engine.kv.num_host_pages} differ from the "
                           f"simulator's {setup.budget.num_pages} + {setup.budget.num_host_pages}")
    return engine, config


def device_engine_rows(engine, setup, load: float, say) -> tuple[dict, list[dict]]:
    """fcfs capacity from a burst of the first stream, then fcfs and alise on every stream at ``load`` ×
    that (alternating which goes first), on the wall clock; answers end at their true lengths."""
    from scalellm_jax.engine.policies import AliseConfig, make_policy

    runs_so_far = iter(range(1_000_000))
    g = setup.times.geometry

    def run(policy_name: str, stream, rate: float | None) -> RunResult:
        requests, true = build_sim_requests(stream, setup.replay, rate, g.max_model_len,
                                            id_prefix=f"run{next(runs_so_far)}-")
        engine.simulated.lengths_by_request.clear()
        engine.simulated.lengths_by_request.update(true)
        lengths = FixedLengths(predicted_table(requests, stream, setup.predictions))
        engine.scheduler.policy = make_policy(policy_name, lengths=lengths, costs=engine.step_costs,
                                              alise=AliseConfig())
        result = drive(engine, requests, WallClock())
        wrong = [r.request_id for r, n in zip(sorted(requests, key=lambda r: r.arrival_time), result.output_len,
                                              strict=True) if n != true[r.request_id]]
        if wrong:
            raise RuntimeError(f"requests {wrong[:4]} did not end at their true length")
        return result

    capacity = capacity_of(run("fcfs", setup.streams[0], None))
    say(f"engine capacity: {capacity['capacity_rps']:.3f} req/s ({capacity['mean_step_ms']:.1f} ms per step)")
    runs: dict[str, list[RunResult]] = {"fcfs": [], "alise": []}
    for k, stream in enumerate(setup.streams):
        for policy in ("fcfs", "alise") if k % 2 == 0 else ("alise", "fcfs"):
            runs[policy].append(run(policy, stream, load * capacity["capacity_rps"]))
            say(f"  engine {policy} stream {k}: mean {runs[policy][-1].latency.mean():.2f} s")
    return capacity, [{"policy": p, "load": load, **summarize(r)} for p, r in runs.items()]


def device_sim_rows(setup, load: float) -> tuple[dict, list[dict]]:
    """The simulator on the same setup, capacity measured the engine's way (a burst of the first stream)."""
    from scalellm_jax.engine.policies import AliseConfig

    burst = sim.run_policy(dataclasses.replace(setup, streams=setup.streams[:1]), "fcfs", None, AliseConfig())[0]
    capacity = capacity_of(burst)
    rate = load * capacity["capacity_rps"]
    return capacity, [{"policy": p, "load": load, **summarize(sim.run_policy(setup, p, rate, AliseConfig()))}
                      for p in ("fcfs", "alise")]


RATIO_KEYS = ("mean_latency_s", "p99_latency_s", "mean_ttft_s", "mean_normalized_latency_s")


TIE = 0.03  # alise/fcfs within this of 1 is neither better nor worse (the no-regression tolerance)


def ordering(ratio: float) -> int:
    """-1: alise better than fcfs, 1: worse, 0: a tie."""
    return 0 if abs(ratio - 1) <= TIE else (-1 if ratio < 1 else 1)


def ratios(rows: list[dict]) -> dict:
    by = {r["policy"]: r for r in rows}
    return {k: by["alise"][k] / by["fcfs"][k] for k in RATIO_KEYS}


def parse_args(argv):
    from device_models import DEVICES

    p = argparse.ArgumentParser(prog="python -m benchmarks.simulator.engine_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--simulate-device", choices=list(DEVICES), default=None,
                   help="serve on this simulated GPU with scheduler_sim --device's geometry and workload")
    p.add_argument("--dataset", default=None, help="a .jsonl of instruction/output rows (default: AlpacaEval); "
                   "with --simulate-device also alpaca | sharegpt")
    p.add_argument("--calibration", type=pathlib.Path, default=None, help="CPU step-time JSON (CPU only)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    for name in DEFAULTS:
        geometry = name.startswith("max_num") or name == "max_model_len"
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {DEFAULTS[name]} on CPU" + ("; the simulator's with --simulate-device"
                                                                  if geometry else ""))
    p.add_argument("--length-scale", type=float, default=None, help="multiply real output lengths by this (CPU: 0.25)")
    p.add_argument("--load", type=float, default=None, help="fraction of fcfs capacity (0.9 on CPU, 1.0 simulated)")
    p.add_argument("--repeats", type=int, default=None, help="arrival streams, each served by both policies (3; 2)")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="CPU only: engine time is this process's CPU seconds (default; robust to other jobs) or wall")
    p.add_argument("--model", default=None, help="with --simulate-device: mixtral-8x7b (default) or mixtral-8x22b")
    p.add_argument("--kv-gib", type=float, default=None, help="with --simulate-device: KV pool of this many GiB")
    p.add_argument("--kv-cache-dtype", choices=("bf16", "int8"), default=None, help="with --simulate-device")
    p.add_argument("--prediction-tau", type=float, default=None,
                   help="with --simulate-device: noisy-oracle predictions at this Kendall tau (see scheduler_sim)")
    p.add_argument("--swap-space-gb", type=float, default=None, help="with --simulate-device (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--priority-fraction", type=float, default=0.2)
    p.add_argument("--fast-predictor", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    device = args.simulate_device is not None
    wrong_mode = [n for n in (CPU_ONLY + ("max_prompt_len", "max_tokens") if device else DEVICE_ONLY)
                  if getattr(args, n) is not None]
    if wrong_mode:
        p.error(f"--{wrong_mode[0].replace('_', '-')}: " + ("CPU only (the simulated device replays real lengths)"
                                                             if device else "only with --simulate-device"))
    if device and (args.model or "mixtral-8x7b") not in ("mixtral-8x7b", "mixtral-8x22b"):
        p.error(f"--model: the engine serves mixtral-8x7b or mixtral-8x22b, got {args.model!r}")
    defaults = {"length_scale": 0.25, "load": 0.9, "repeats": 3, "clock": "cpu",
                "calibration": sim.DEFAULT_CALIBRATION, "dataset": str(sim.DEFAULT_DATA)} | DEFAULTS
    if device:
        defaults = {"dataset": "alpaca"} | DEVICE_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not device:
        args.dataset = pathlib.Path(args.dataset)
    if args.repeats < 1 or args.num_requests < 1 or not args.load > 0:
        p.error("--repeats and --num-requests must be >= 1, --load > 0")
    return args


def device_main(args, say) -> dict:
    start = time.perf_counter()
    setup = device_setup(args, say)
    engine, config = device_engine(args, setup)
    say(f"workload ready in {time.perf_counter() - start:.1f} s; {engine.simulated.describe()}")
    start, load_before = time.perf_counter(), os.getloadavg()
    e_capacity, e_rows = device_engine_rows(engine, setup, args.load, say)
    engine_s = time.perf_counter() - start
    s_capacity, s_rows = device_sim_rows(setup, args.load)
    return {
        "engine_config": dataclasses.asdict(config) | {"num_host_pages": engine.kv.num_host_pages},
        "simulated_device": engine.simulated.describe(), "device_steps": setup.times.describe(),
        "workload": setup.workload, "engine_s": engine_s, "clock": "wall",
        "machine_load": {"before": load_before, "after": os.getloadavg(), "cpu_count": os.cpu_count()},
        "engine": {"capacity": e_capacity, "rows": e_rows, "alise_over_fcfs": ratios(e_rows)},
        "sim": {"capacity": s_capacity, "rows": s_rows, "alise_over_fcfs": ratios(s_rows)},
    }


def cpu_main(args, say) -> dict:
    from benchmarks.offline_throughput import model_config
    from scalellm_jax.config import EngineConfig
    from scalellm_jax.engine.engine import LLMEngine
    from scalellm_jax.loader import Model
    from scalellm_jax.tokenizer import MistralTokenizer

    rows, predictions, fit_s = scaled_workload(args, MistralTokenizer())
    streams = [make_stream(len(rows), args.num_requests, args.priority_fraction, args.seed + k)
               for k in range(args.repeats)]
    say(f"predictor fitted in {fit_s:.1f} s; {args.num_requests} requests, mean output "
        f"{np.mean([rows[i].output_len for i in streams[0].row_index]):.0f} tokens, {args.repeats} streams")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len)
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
    return {
        "engine_config": dataclasses.asdict(config) | {"num_pages": engine.kv.num_pages,
                                                        "num_host_pages": engine.kv.num_host_pages},
        "engine_s": engine_s, "clock": args.clock, "machine_load": machine_load,
        "engine": {"capacity": e_capacity, "rows": e_rows, "alise_over_fcfs": ratios(e_rows)},
        "sim": {"capacity": s_capacity, "rows": s_rows, "alise_over_fcfs": ratios(s_rows)},
    }


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()
    needed = [] if args.simulate_device else [args.dataset, args.calibration]
    for path in needed:
        if not path.is_file():
            print(f"error: not found: {path} (run python -m benchmarks.simulator --calibrate first "
                  "for the calibration)", file=sys.stderr)
            return 2
    if args.simulate_device and not sim.dataset_path(args.dataset).is_file():
        print(f"error: --dataset: not found: {sim.dataset_path(args.dataset)} (alpaca | sharegpt | PATH)",
              file=sys.stderr)
        return 2
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    from scalellm_jax.engine.policies import AliseConfig

    part = device_main(args, say) if args.simulate_device else cpu_main(args, say)
    e_ratio, s_ratio = part["engine"]["alise_over_fcfs"], part["sim"]["alise_over_fcfs"]
    same = {k: ordering(e_ratio[k]) == ordering(s_ratio[k]) for k in RATIO_KEYS}
    result = {
        "benchmark": "scheduler_engine_check",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git, "command": " ".join(["python -m benchmarks.simulator.engine_check", *raw_argv]),
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "alise_config": dataclasses.asdict(AliseConfig()), **part,
        "same_mean_latency_ordering": same["mean_latency_s"], "same_ordering": same,
    }
    out = args.out or output_dir() / f"scheduler_sim-engine-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
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
        print(f"same ordering (alise better, worse or within {TIE:.0%} of fcfs on both): "
              + ", ".join(f"{k} {v}" for k, v in same.items()) + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
