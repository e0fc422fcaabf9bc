"""Scheduler simulator: fcfs, priority, alise and an oracle SJF on a real workload, without running a model.

    python -m benchmarks.simulator                                       # CPU-calibrated small preset, AlpacaEval
    python -m benchmarks.simulator --device a100-40gb --model opt-13b --dataset sharegpt
    python -m benchmarks.simulator --device h200 --model mixtral-8x7b --kv-gib 8 --kv-cache-dtype int8 \\
        --baseline benchmarks/results/scheduler_sim-<bf16 run>.json  # int8 KV at the bf16 run's SLO
    python -m benchmarks.simulator --json            # rows as one JSON list on stdout
    python -m benchmarks.simulator --calibrate       # re-time the CPU runner first

Workload (``workload``): ``--dataset alpaca`` (default; real Mixtral answer lengths, the
output-length predictor trained on one part of the rows and the other part replayed), ``sharegpt``
(the real ShareGPT first prompts with documented synthetic heavy-tailed answer lengths, and noisy
oracle predictions at Kendall tau ``--prediction-tau``), or a PATH (``.jsonl`` like alpaca, ``.json``
like sharegpt). ``--num-requests`` requests cycle through shuffled copies of the replay rows, with
Poisson arrivals; ``--priority-fraction`` of them (random) get user priority 0, the rest 1; latency
metrics are over all requests. Requests ask for as many tokens as fit in the context and end with
EOS at their true length, so no policy but the oracle sees it.

Machinery (``replay``): the real ``Scheduler``, policies and ``KVManager`` stepped on a virtual
clock. Step times: without ``--device``, calibrated from the real ``ModelRunner`` on the small CPU
preset (``calibration``; cached in ``benchmarks/results/scheduler_sim-calibration.json``), with
the CPU engine's default page pool and ``--swap-space-gb`` of host swap. With ``--device`` (and
``--model``, ``--kv-cache-dtype``): the ``device_models`` cost model of each step on a *modelled*
device (datasheet figures and assumed efficiencies, not a GPU run), the KV pool from the engine's
memory plan (or ``--kv-gib``), 256 seats, 2048 tokens per step, 4096-token context (``device``).

Capacity: the saturated throughput under fcfs with every request arriving at t=0: output tokens per
second while requests are still queued (all seats or all KV pages busy), divided by the stream's
mean output length, per arrival stream. Loads are fractions of it (load 1.0 is the fcfs knee), each
stream's of its own; rates (``offered_rps``, ``rate_rps``) are loads times the streams' mean capacity.
Policies: fcfs, priority, alise (``AlisePolicy`` over the predictions), oracle (``AlisePolicy`` over
the true lengths), all with the default ``AliseConfig``.

SLO: mean normalized latency (latency / output tokens, averaged over requests) within
``--slo-factor`` (2) × fcfs's at the lowest load, or ``--slo-normalized-latency-s`` (so runs with
different KV dtypes compare at one SLO; ``--baseline`` takes it from an earlier result). Each
policy's rate at the SLO is the (interpolated) highest request rate whose mean normalized latency
stays within it; ``rate_at_slo`` is that over fcfs's in the same run, ``rate_vs_baseline_fcfs`` over
the baseline run's fcfs.

Targets (issue 16), at load 1.0 where KV pages bind (the capacity run's mean batch is below 90% of
the seats): alise/fcfs mean normalized latency <= 0.45, mean latency <= 0.70, p99 <= 1.3, TTFT <= 0.2;
rate within the SLO >= 1.4x fcfs; alise (int8 KV) >= 2.5x fcfs of a bf16 ``--baseline``. Where KV
does not bind: alise within 3% of fcfs (mean and mean normalized latency) at every load <= 1.0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import numpy as np

from benchmarks.provenance import RESULTS, git_state, output_dir
from benchmarks.simulator.calibration import Geometry, StepTimes, calibrate
from benchmarks.simulator.replay import POLICIES, KVBudget, build_policy, simulate, summarize
from benchmarks.simulator.workload import (
    DEFAULT_PREDICTION_TAU,
    FixedLengths,
    HeavyTailedLengths,
    build_sim_requests,
    kendall_tau,
    load_prompt_rows,
    make_stream,
    noisy_predictions,
    predicted_table,
    split_rows,
    train_predictor,
)
from benchmarks.workload_files import ALPACA_EVAL, SHAREGPT
from scalellm_jax.workloads import load_rows

DATASETS = {"alpaca": ALPACA_EVAL, "sharegpt": SHAREGPT}
DEFAULT_DATA = DATASETS["alpaca"]
DEFAULT_CALIBRATION = RESULTS / "scheduler_sim-calibration.json"
DEFAULT_LOADS = (0.4, 0.6, 0.8, 1.0, 1.2, 1.4)
DEFAULT_SWAP_SPACE_GB = 4.0  # EngineConfig.swap_space_gb default
ROW_KEYS = ("policy", "load", "mean_latency_s", "p50_latency_s", "p99_latency_s", "mean_ttft_s",
            "mean_normalized_latency_s", "throughput_rps")
SLO_ROW_KEYS = ("rate_rps", "rate_at_slo")
KV_BOUND_FILL = 0.9  # the capacity run's mean rows per step below this fraction of the seats: KV binds
TARGETS = {  # issue 16, deliverable 4
    "load": 1.0,
    "kv_bound": {"normalized_ratio": ("<=", 0.45), "mean_ratio": ("<=", 0.70), "p99_ratio": ("<=", 1.3),
                 "ttft_ratio": ("<=", 0.2), "rate_at_slo": (">=", 1.4), "rate_vs_baseline_fcfs": (">=", 2.5)},
    "not_kv_bound": {"max_ratio_up_to_load_1": ("<=", 1.03)},
}


# ---------------------------------------------------------------------------------------------- setup


def cpu_step_times(args, say) -> StepTimes:
    """The CPU calibration: loaded from ``--calibration``, or measured (and cached) when absent or asked."""
    if args.calibration.is_file() and not args.calibrate:
        times = StepTimes.load(args.calibration)
        say(f"calibration: {args.calibration}")
        return times
    from benchmarks.offline_throughput import model_config

    say("calibrating step times on the real runner (small preset) ...")
    times = calibrate(Geometry(), model_config(False), progress=say)
    times.save(args.calibration)
    say(f"wrote {args.calibration}")
    return times


def with_seats(times, max_num_seqs: int | None):
    """``times`` (``StepTimes`` or ``DeviceSteps``) for ``max_num_seqs`` seats (None: unchanged)."""
    return times.with_seats(max_num_seqs)


def cpu_kv_budget(times: StepTimes, args) -> KVBudget:
    """Device pages like the CPU engine's default; host pages from ``--swap-space-gb``."""
    from scalellm_jax.engine.kv_manager import KVManager

    g = times.geometry
    num_pages = args.num_pages or g.cpu_num_pages
    kv = KVManager(num_pages, g.page_size, g.max_pages_per_seq)
    if kv.num_usable_pages - kv.watermark_pages < g.max_pages_per_seq:  # the scheduler's per-request check
        raise ValueError(f"--num-pages {num_pages} is too small: a request of max_model_len {g.max_model_len} "
                         f"needs {g.max_pages_per_seq} pages plus the null page and the admission watermark")
    model = times.meta.get("model_config")
    swap_bytes = int(args.swap_space_gb * 2**30)
    if model is None:
        return KVBudget(num_pages, num_pages)
    page_bytes = model["num_layers"] * 2 * model["num_kv_heads"] * g.page_size * model["head_dim"] * 4  # float32
    return KVBudget(num_pages, swap_bytes // page_bytes)


def device_step_times(args):
    from benchmarks.simulator.device import DEVICE_GEOMETRY, device_steps

    g = DEVICE_GEOMETRY
    geometry = Geometry(page_size=g.page_size, max_num_seqs=args.max_num_seqs or g.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens or g.max_num_batched_tokens,
                        max_model_len=args.max_model_len or g.max_model_len)
    if geometry.max_num_batched_tokens < geometry.max_num_seqs:
        raise ValueError(f"--max-num-batched-tokens ({geometry.max_num_batched_tokens}) must be >= --max-num-seqs "
                         f"({geometry.max_num_seqs}) so every running decode fits in a step")
    return device_steps(args.device, args.model or "mixtral-8x7b", kv_cache_dtype=args.kv_cache_dtype or "bf16",
                        geometry=geometry, kv_gib=args.kv_gib, num_pages=args.num_pages,
                        swap_space_gb=args.swap_space_gb, swap_compression=args.swap_compression or "none")


@dataclasses.dataclass
class Setup:
    times: object  # StepTimes (CPU calibration) or device.DeviceSteps
    budget: KVBudget
    replay: list
    predictions: np.ndarray
    streams: list
    workload: dict = dataclasses.field(default_factory=dict)  # what the rows and predictions are


def dataset_path(spec: str) -> pathlib.Path:
    return DATASETS.get(spec, pathlib.Path(spec))


def prepare(args, say) -> Setup:
    from scalellm_jax.tokenizer import MistralTokenizer

    if args.device:
        times = device_step_times(args)
        budget = KVBudget(times.num_pages, times.num_host_pages)
    else:
        times = with_seats(cpu_step_times(args, say), args.max_num_seqs)
        budget = cpu_kv_budget(times, args)
    g = times.geometry
    path = dataset_path(args.dataset)
    tokenizer = MistralTokenizer()
    workload: dict = {"dataset": str(path)}
    start = time.perf_counter()
    if path.suffix == ".json":  # prompts only: synthetic heavy-tailed lengths, noisy-oracle predictions
        lengths = HeavyTailedLengths(max_len=g.max_model_len - 1)
        replay = load_prompt_rows(path, tokenizer, lengths, args.seed, max_prompt_len=g.max_model_len - 1)
        workload |= {"answer_lengths": "synthetic", "lengths": lengths.describe()}
        tau = DEFAULT_PREDICTION_TAU if args.prediction_tau is None else args.prediction_tau
        rows = replay
    else:
        rows = load_rows(path, tokenizer, max_prompt_len=g.max_model_len - 1, too_long="truncate")
        train, replay = split_rows(rows, args.train_fraction, args.seed)
        workload |= {"answer_lengths": "real (Mixtral tokens of each row's output)",
                     "num_train_rows": len(train)}
        tau = args.prediction_tau
    true = np.array([min(r.output_len, g.max_model_len - len(r.prompt_ids)) for r in replay])
    if tau is None:
        predictor = train_predictor(train, fast=args.fast_predictor)
        predictions = predictor.predict_many([r.text for r in replay])
        kind = "fast (no MiniLM)" if args.fast_predictor else "default PredictorConfig"
        workload["predictions"] = {"kind": "trained predictor", "predictor": kind,
                                   "kendall_tau_on_replay": kendall_tau(predictions, true)}
    else:
        predictions, sigma, measured = noisy_predictions(true, tau, args.seed)
        workload["predictions"] = {
            "kind": "noisy oracle: exp(m + s^2/(s^2 + sigma^2) (log true + sigma z - m)), z ~ N(0, 1) per row "
                    "(seeded by --seed; m, s: log-mean and log-sd of the true lengths)",
            "prediction_tau": tau, "sigma": sigma, "kendall_tau_on_replay": measured}
    prompt = np.array([len(r.prompt_ids) for r in replay])
    workload |= {"num_rows": len(rows), "num_replay_rows": len(replay),
                 "prompt_tokens": {"mean": float(prompt.mean()), "p50": float(np.median(prompt)),
                                   "p99": float(np.percentile(prompt, 99)), "max": int(prompt.max())},
                 "output_tokens": {"mean": float(true.mean()), "p50": float(np.median(true)),
                                   "p99": float(np.percentile(true, 99)), "max": int(true.max())}}
    say(f"workload: {len(rows)} rows from {path.name}, predictions ({workload['predictions']['kind'][:20]}, "
        f"tau {workload['predictions']['kendall_tau_on_replay']:.3f}) in {time.perf_counter() - start:.1f} s, "
        f"replaying {len(replay)} as {args.num_requests} requests x {args.seeds} seeds")
    streams = [make_stream(len(replay), args.num_requests, args.priority_fraction, args.seed + s)
               for s in range(args.seeds)]
    return Setup(times, budget, replay, predictions, streams, workload)


# ---------------------------------------------------------------------------------------------- sweep


def run_policy(setup: Setup, policy: str, rate, alise_config, seats: int | None = None) -> list:
    """One run per stream of ``policy`` at ``rate`` requests/s (one number, or one per stream; None: all
    at t=0), on ``seats`` seats (default: the setup's)."""
    times = with_seats(setup.times, seats)
    rates = list(rate) if isinstance(rate, (list, tuple)) else [rate] * len(setup.streams)
    runs = []
    for stream, stream_rate in zip(setup.streams, rates, strict=True):
        requests, true = build_sim_requests(stream, setup.replay, stream_rate, times.geometry.max_model_len)
        predicted = predicted_table(requests, stream, setup.predictions)
        pol, costs = build_policy(policy, FixedLengths(predicted), true, alise_config, times.decode_buckets)
        runs.append(simulate(requests, pol, costs, times, setup.budget, true))
    return runs


def measure_capacity(setup: Setup, alise_config) -> dict:
    """fcfs's saturated capacity of every stream (each stream's requests all at t=0), and their mean.

    Each stream's loads are fractions of its own capacity: where KV pages bind, the burst throughput
    depends on the stream's mix (up to ~30% apart between 1000-request streams), and a common rate
    would put one stream past its knee and another below it at the same nominal load.
    """
    runs = run_policy(setup, "fcfs", None, alise_config)
    per_stream = [r.saturated_tokens_per_s / r.output_len.mean() for r in runs]
    tokens_per_s = float(np.mean([r.saturated_tokens_per_s for r in runs]))
    mean_len = float(np.mean([r.output_len.mean() for r in runs]))
    rows = float(np.mean([r.saturated_rows for r in runs]))
    seats = setup.times.geometry.max_num_seqs
    return {"capacity_rps": float(np.mean(per_stream)), "per_stream_capacity_rps": [float(c) for c in per_stream],
            "saturated_tokens_per_s": tokens_per_s, "mean_output_len": mean_len,
            "burst_rps": float(np.mean([len(r.arrival) / r.makespan for r in runs])),
            "saturated_mean_rows": rows, "seats": seats, "kv_bound": rows < KV_BOUND_FILL * seats}


def sweep(setup: Setup, policies, loads, capacity: dict, alise_config, say,
          policy_seats: dict[str, int] | None = None) -> list[dict]:
    """Every policy at every load (each stream at that fraction of its own capacity); ``policy_seats``
    caps some policies' seats (a static admission limit) while loads stay fractions of the full-seat
    capacity."""
    rows = []
    for policy in policies:
        seats = (policy_seats or {}).get(policy)
        for load in loads:
            start = time.perf_counter()
            rates = [load * c for c in capacity["per_stream_capacity_rps"]]
            metrics = summarize(run_policy(setup, policy, rates, alise_config, seats))
            rows.append({"policy": policy, "load": load, **metrics, "offered_rps": load * capacity["capacity_rps"],
                         "seats": seats or setup.times.geometry.max_num_seqs})
            say(f"  {policy:8} load {load:.2f}: mean {metrics['mean_latency_s']:7.1f} s, "
                f"p99 {metrics['p99_latency_s']:7.1f} s, norm {metrics['mean_normalized_latency_s']:.4f} s/tok "
                f"({time.perf_counter() - start:.1f} s)")
    return rows


# ---------------------------------------------------------------------------------------------- analysis


def load_at_slo(rows: list[dict], policy: str, slo_s: float, key: str = "mean_latency_s") -> dict:
    """Highest load whose ``key`` is within ``slo_s``, interpolated linearly between grid loads.

    ``censored`` is "above" when even the highest load meets it, "below" when the lowest does not.
    """
    pts = sorted((r["load"], r[key]) for r in rows if r["policy"] == policy and r["load"] != "slo")
    if not pts:
        return {"load": None, "censored": None}
    if pts[0][1] > slo_s:
        return {"load": None, "censored": "below"}
    for (l0, m0), (l1, m1) in zip(pts, pts[1:], strict=False):
        if m1 > slo_s:
            return {"load": l0 + (l1 - l0) * (slo_s - m0) / (m1 - m0), "censored": None}
    return {"load": pts[-1][0], "censored": "above"}


def slo_analysis(rows: list[dict], capacity_rps: float, slo_s: float | None, slo_factor: float,
                 baseline: dict | None = None) -> dict | None:
    """Each policy's highest request rate within the normalized-latency SLO: ``slo_s``, else ``slo_factor`` ×
    fcfs's mean normalized latency at the lowest load; ratios to fcfs (and to ``baseline``'s fcfs)."""
    key = "mean_normalized_latency_s"
    loads = sorted({r["load"] for r in rows})
    if slo_s is None:
        base = [r for r in rows if r["policy"] == "fcfs" and r["load"] == loads[0]]
        if not base:
            return None
        slo_s = slo_factor * base[0][key]
        definition = f"{slo_factor} x fcfs mean normalized latency at load {loads[0]}"
    else:
        definition = "given (--slo-normalized-latency-s or --baseline)"
    at_slo = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        point = load_at_slo(rows, policy, slo_s, key)
        at_slo[policy] = {**point, "rate_rps": None if point["load"] is None else point["load"] * capacity_rps}
    fcfs = at_slo.get("fcfs")
    base_fcfs = (baseline or {}).get("fcfs_rate_rps")
    for p in at_slo.values():
        p["rate_at_slo"] = _rate_ratio(p, fcfs)
        p["rate_at_slo_lower_bound"] = p["rate_at_slo"] is not None and p["censored"] == "above"
        p["rate_vs_baseline_fcfs"] = (None if p["rate_rps"] is None or not base_fcfs
                                      else p["rate_rps"] / base_fcfs)
    return {"normalized_latency_slo_s": slo_s, "definition": definition, "at_slo": at_slo,
            "baseline": baseline}


def _rate_ratio(policy: dict, fcfs: dict | None) -> float | None:
    """The policy's rate at the SLO over fcfs's; None when unknown (fcfs misses it everywhere or meets it
    everywhere). When only the policy meets it up to the highest load, the ratio is a lower bound."""
    if not fcfs or policy["rate_rps"] is None or fcfs["rate_rps"] is None or fcfs["censored"] == "above":
        return None
    return policy["rate_rps"] / fcfs["rate_rps"]


def slo_rows(slo: dict | None) -> list[dict]:
    """One row per policy with ``"load": "slo"``: its rate within the SLO and that over fcfs's."""
    if not slo:
        return []
    out = []
    for policy, p in slo["at_slo"].items():
        row = {k: None for k in ROW_KEYS} | {"policy": policy, "load": "slo", "rate_rps": p["rate_rps"],
                                                 "rate_at_slo": p["rate_at_slo"],
                                                 "slo_normalized_latency_s": slo["normalized_latency_slo_s"],
                                                 "censored": p["censored"]}
        if p["rate_vs_baseline_fcfs"] is not None:
            row["rate_vs_baseline_fcfs"] = p["rate_vs_baseline_fcfs"]
        out.append(row)
    return out


def _check(value, op_limit) -> bool | None:
    if value is None:
        return None
    op, limit = op_limit
    return value <= limit if op == "<=" else value >= limit


def analyze(rows: list[dict], capacity: dict, slo: dict | None) -> dict:
    """alise vs fcfs at the target load, the SLO rates, and the issue's targets (met / not met / n/a)."""
    by = {(r["policy"], r["load"]): r for r in rows}
    result: dict = {"slo": slo, "kv_bound": capacity.get("kv_bound")}
    fcfs, alise = by.get(("fcfs", TARGETS["load"])), by.get(("alise", TARGETS["load"]))
    ratios = {}
    if fcfs and alise:
        for name, key in (("normalized_ratio", "mean_normalized_latency_s"), ("mean_ratio", "mean_latency_s"),
                          ("p99_ratio", "p99_latency_s"), ("ttft_ratio", "mean_ttft_s")):
            ratios[name] = alise[key] / fcfs[key] if fcfs[key] else None
    at = (slo or {}).get("at_slo", {}).get("alise", {})
    ratios["rate_at_slo"] = at.get("rate_at_slo")
    ratios["rate_vs_baseline_fcfs"] = at.get("rate_vs_baseline_fcfs")
    worst = [max(by[("alise", x)][k] / by[("fcfs", x)][k] for k in ("mean_latency_s", "mean_normalized_latency_s"))
             for (p, x) in by if p == "alise" and x <= TARGETS["load"] and ("fcfs", x) in by]
    ratios["max_ratio_up_to_load_1"] = max(worst) if worst else None
    result["alise_over_fcfs"] = ratios
    regime = "kv_bound" if capacity.get("kv_bound") else "not_kv_bound"
    result["regime"] = regime
    result["targets"] = {name: {"target": f"{op} {limit}", "value": ratios.get(name),
                                "met": _check(ratios.get(name), (op, limit))}
                         for name, (op, limit) in TARGETS[regime].items()}
    if at.get("censored") == "above":  # alise meets the SLO at every load: its rate ratios are lower bounds
        for name in ("rate_at_slo", "rate_vs_baseline_fcfs"):
            t = result["targets"].get(name)
            if t is not None and t["value"] is not None:
                t["lower_bound"] = True
                if not t["met"]:
                    t["met"] = None  # unknown: a higher load might still meet it (extend --loads)
    return result


# ---------------------------------------------------------------------------------------------- report


def print_table(rows: list[dict], analysis: dict, capacity: dict) -> None:
    print(f"\ncapacity {capacity['capacity_rps']:.3f} req/s ({capacity['saturated_tokens_per_s']:.0f} output tok/s "
          f"saturated, mean output {capacity['mean_output_len']:.0f} tokens, mean batch "
          f"{capacity['saturated_mean_rows']:.0f} of {capacity['seats']} seats: "
          f"{'KV-bound' if capacity['kv_bound'] else 'not KV-bound'})")
    print(f"{'policy':9}{'load':>6}{'mean s':>9}{'p50 s':>9}{'p99 s':>9}{'ttft s':>9}{'s/token':>9}{'req/s':>8}"
          f"{'preempt':>9}")
    for r in rows:
        print(f"{r['policy']:9}{r['load']:>6.2f}{r['mean_latency_s']:>9.1f}{r['p50_latency_s']:>9.1f}"
              f"{r['p99_latency_s']:>9.1f}{r['mean_ttft_s']:>9.2f}{r['mean_normalized_latency_s']:>9.4f}"
              f"{r['throughput_rps']:>8.3f}{r['preemptions']:>9}")
    slo = analysis.get("slo")
    if slo:
        print(f"\nSLO {slo['normalized_latency_slo_s']:.4f} s/token mean normalized latency ({slo['definition']}); "
              "highest rate within it:")
        for policy, p in slo["at_slo"].items():
            shown = "none" if p["rate_rps"] is None else f"{p['rate_rps']:.3f} req/s" + (
                " (or more)" if p["censored"] == "above" else "")
            more = " or more" if p["rate_at_slo_lower_bound"] else ""
            ratio = "" if p["rate_at_slo"] is None else f", {p['rate_at_slo']:.2f}x fcfs{more}"
            base = "" if p["rate_vs_baseline_fcfs"] is None else f", {p['rate_vs_baseline_fcfs']:.2f}x baseline fcfs"
            print(f"  {policy:9}{shown}{ratio}{base}")
    print(f"\ntargets ({analysis['regime'].replace('_', ' ')}, alise / fcfs at load {TARGETS['load']}):")
    for name, t in analysis["targets"].items():
        shown = "n/a" if t["value"] is None else f"{t['value']:.3f}" + ("+" if t.get("lower_bound") else "")
        verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"  {name:24} {t['target']:>8}: {shown:>7} -> {verdict}")


def plot(rows: list[dict], analysis: dict, path: pathlib.Path) -> str | None:
    """Latency vs load per policy (mean, p99, normalized); returns a note instead when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not importable ({exc}); pip install matplotlib"
    panels = (("mean_latency_s", "mean latency (s)"), ("p99_latency_s", "p99 latency (s)"),
              ("mean_normalized_latency_s", "mean normalized latency (s/token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for policy in POLICIES:
            pts = sorted((r["load"], r[key]) for r in rows if r["policy"] == policy and r["load"] != "slo")
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
        ax.set_xlabel("load (fraction of fcfs saturated capacity)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if analysis.get("slo"):
        axes[2].axhline(analysis["slo"]["normalized_latency_slo_s"], color="gray", linestyle="--", label="SLO")
        axes[2].legend()
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------- CLI


def _alise_overrides(text: str) -> dict:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE,... got {text!r}")
    return {k.strip(): float(v) for k, v in pairs}


def _policy_seats(text: str) -> dict[str, int]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 or pair[0].strip() not in POLICIES or not pair[1].strip().isdigit() for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected POLICY=SEATS,... with POLICY one of {list(POLICIES)}, got {text!r}")
    return {k.strip(): int(v) for k, v in pairs}


def _loads(text: str) -> tuple[float, ...]:
    try:
        loads = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(x <= 0 for x in loads):
        raise argparse.ArgumentTypeError(f"loads must be > 0, got {text!r}")
    return loads


DEVICE_ONLY = ("model", "kv_cache_dtype", "kv_gib", "max_num_batched_tokens", "max_model_len", "swap_compression")


def parse_args(argv):
    from device_models import DEVICES, MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.simulator", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="alpaca",
                   help="alpaca | sharegpt | PATH (.jsonl with instruction/output, or a .json list of {prompt})")
    p.add_argument("--json", action="store_true", help="print the result rows as one JSON list")
    p.add_argument("--calibration", type=pathlib.Path, default=DEFAULT_CALIBRATION, help="CPU step-time JSON")
    p.add_argument("--calibrate", action="store_true", help="re-time the CPU runner and overwrite --calibration")
    p.add_argument("--device", choices=list(DEVICES), default=None,
                   help="step times from the device cost model of this (modelled) GPU instead of the CPU calibration")
    p.add_argument("--model", choices=list(MODELS), default=None, help="model shape with --device (mixtral-8x7b)")
    p.add_argument("--kv-cache-dtype", choices=("bf16", "int8"), default=None, help="KV pages with --device (bf16)")
    p.add_argument("--kv-gib", type=float, default=None, help="KV pool of this many GiB instead of the memory plan's")
    p.add_argument("--swap-space-gb", type=float, default=DEFAULT_SWAP_SPACE_GB, help="host swap space (engine's 4)")
    p.add_argument("--swap-compression", choices=("none", "int8"), default=None, help="swapped pages' dtype (none)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="per-step tokens with --device (2048)")
    p.add_argument("--max-model-len", type=int, default=None, help="context with --device (4096)")
    p.add_argument("--loads", type=_loads, default=DEFAULT_LOADS, help="fractions of fcfs's saturated capacity")
    p.add_argument("--policies", type=lambda s: tuple(s.split(",")), default=POLICIES)
    p.add_argument("--num-requests", type=int, default=1000, help="requests per run")
    p.add_argument("--seeds", type=int, default=2, help="arrival streams per point (metrics pooled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--priority-fraction", type=float, default=0.2)
    p.add_argument("--prediction-tau", type=float, default=None,
                   help=f"noisy-oracle predictions at this Kendall tau (default: {DEFAULT_PREDICTION_TAU} for a "
                        "dataset without answers, the trained predictor otherwise)")
    p.add_argument("--slo-factor", type=float, default=2.0, help="SLO = this x fcfs normalized latency at the "
                                                                 "lowest load")
    p.add_argument("--slo-normalized-latency-s", type=float, default=None, help="the SLO in s/token instead")
    p.add_argument("--baseline", type=pathlib.Path, default=None,
                   help="an earlier result (e.g. the bf16 run): its SLO, and rates over its fcfs rate")
    p.add_argument("--num-pages", type=int, default=None, help="device KV pages (default: the engine's plan)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="seats (default: 256 with --device; the calibration's, and at most that, without)")
    p.add_argument("--policy-seats", type=_policy_seats, default={},
                   help="fewer seats for some policies, e.g. alise=32,oracle=32 (loads stay relative to the "
                        "full-seat fcfs capacity)")
    p.add_argument("--alise-config", type=_alise_overrides, default={},
                   help="AliseConfig fields to override for alise and oracle, e.g. aging_rate=0.5,overrun_factor=2")
    p.add_argument("--fast-predictor", action="store_true", help="predictor without MiniLM (tests)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results JSON (default: benchmarks/runs/, dated)")
    p.add_argument("--plot", type=pathlib.Path, default=None, help="PNG path (default: next to --out)")
    args = p.parse_args(argv)
    bad = [x for x in args.policies if x not in POLICIES]
    if bad:
        p.error(f"--policies: unknown {bad}; choose from {list(POLICIES)}")
    if "fcfs" not in args.policies:
        p.error("--policies: must include fcfs (capacity, the SLO and every ratio are relative to it)")
    if args.num_requests < 1 or args.seeds < 1 or not 0 < args.train_fraction < 1:
        p.error("--num-requests and --seeds must be >= 1, --train-fraction in (0, 1)")
    if args.device is None:
        given = [name for name in DEVICE_ONLY if getattr(args, name) is not None]
        if given:
            p.error(f"--{given[0].replace('_', '-')}: only with --device (the CPU calibration fixes it)")
    for name in ("kv_gib", "slo_normalized_latency_s", "prediction_tau"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.prediction_tau is not None and args.prediction_tau > 1:
        p.error(f"--prediction-tau must be in (0, 1], got {args.prediction_tau}")
    if args.swap_space_gb < 0:
        p.error(f"--swap-space-gb must be >= 0, got {args.swap_space_gb}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "num_pages"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_model_len is not None and args.max_model_len < 2:
        p.error(f"--max-model-len must be >= 2, got {args.max_model_len}")
    return args


def read_baseline(path: pathlib.Path) -> dict:
    """The SLO and fcfs rate of an earlier result file (``ValueError`` naming ``--baseline``)."""
    try:
        result = json.loads(path.read_text())
        slo = result["analysis"]["slo"]
        fcfs = slo["at_slo"]["fcfs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--baseline {path}: not a scheduler_sim result with an SLO analysis ({exc})") from None
    return {"path": str(path), "command": result.get("command"), "normalized_latency_slo_s":
            slo["normalized_latency_slo_s"], "fcfs_rate_rps": fcfs["rate_rps"], "fcfs_censored": fcfs["censored"]}


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()
    if not dataset_path(args.dataset).is_file():
        print(f"error: dataset not found: {dataset_path(args.dataset)} (--dataset alpaca | sharegpt | PATH)",
              file=sys.stderr)
        return 2
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    from scalellm_jax.engine.policies import AliseConfig

    try:
        alise_config = AliseConfig(**args.alise_config)
    except (TypeError, ValueError) as exc:
        print(f"error: --alise-config: {exc}", file=sys.stderr)
        return 2
    try:
        baseline = read_baseline(args.baseline) if args.baseline else None
        setup = prepare(args, say)
    except ValueError as exc:  # a bad dataset row, an impossible --max-num-seqs, --num-pages, --kv-gib, --model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seats = setup.times.geometry.max_num_seqs
    too_many = {k: v for k, v in args.policy_seats.items() if not 1 <= v <= seats}
    if too_many:
        print(f"error: --policy-seats: {too_many} outside [1, {seats}] (the simulated engine's seats)", file=sys.stderr)
        return 2
    if args.device:
        say(f"MODELLED device (cost model, not a GPU run): {args.device}, {args.model or 'mixtral-8x7b'}, "
            f"{setup.times.memory['source']}, {setup.budget.num_pages} pages, {setup.budget.num_host_pages} host pages")
    start = time.perf_counter()
    capacity = measure_capacity(setup, alise_config)
    say(f"capacity: {capacity['capacity_rps']:.3f} req/s, mean batch {capacity['saturated_mean_rows']:.1f} of "
        f"{capacity['seats']} seats ({'KV-bound' if capacity['kv_bound'] else 'not KV-bound'})")
    rows = sweep(setup, args.policies, args.loads, capacity, alise_config, say, args.policy_seats)
    slo_s = args.slo_normalized_latency_s
    if slo_s is None and baseline:
        slo_s = baseline["normalized_latency_slo_s"]
    slo = slo_analysis(rows, capacity["capacity_rps"], slo_s, args.slo_factor, baseline)
    analysis = analyze(rows, capacity, slo)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or output_dir() / f"scheduler_sim-{stamp}.json"
    plot_path = args.plot or out.with_suffix(".png")
    note = plot(rows, analysis, plot_path)
    if args.device:
        step_model = {"kind": "device cost model (modelled device, NOT a GPU run)", **setup.times.describe()}
    else:
        step_model = {"kind": "CPU calibration of the small preset", "calibration": setup.times.to_json()}
    result = {
        "benchmark": "scheduler_sim", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git, "command": " ".join(["python -m benchmarks.simulator", *raw_argv]),
        "dataset": str(dataset_path(args.dataset)), "workload": setup.workload,
        "num_replay_rows": len(setup.replay), "num_requests": args.num_requests,
        "seeds": args.seeds, "seed": args.seed, "priority_fraction": args.priority_fraction,
        "train_fraction": args.train_fraction,
        "requests": "max_tokens = max_model_len - prompt (as a client that sets none), EOS at the true length",
        "alise_config": dataclasses.asdict(alise_config), "policy_seats": args.policy_seats,
        "kv_budget": dataclasses.asdict(setup.budget), "geometry": dataclasses.asdict(setup.times.geometry),
        "step_model": step_model, "capacity": capacity, "loads": "fractions of capacity.capacity_rps (fcfs, "
        "all requests at t=0: output tokens/s while requests queue, over the mean output length)",
        "targets": TARGETS, "analysis": analysis,
        "sweep_s": time.perf_counter() - start, "plot": None if note else str(plot_path),
        "rows": rows, "slo_rows": slo_rows(slo),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps([{k: r[k] for k in ROW_KEYS} for r in rows] + slo_rows(slo)))
    else:
        print_table(rows, analysis, capacity)
    say(note or f"plot: {plot_path}")
    say(f"wrote {out}")
    return 0
