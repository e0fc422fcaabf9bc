"""Scheduler simulator: fcfs, priority, alise and an oracle SJF on a real workload, without running a model.

    python -m benchmarks.scheduler_sim --dataset ../shared/data/alpaca_eval_mixtral_8x7b_instruct.jsonl
    python -m benchmarks.scheduler_sim --json            # rows as one JSON list on stdout
    python -m benchmarks.scheduler_sim --calibrate       # re-time the runner first

Workload: the dataset's rows (prompt = Mixtral tokens of ``instruction``, generation length = Mixtral
tokens of the real ``output``, EOS ignored) are split at random; the output-length predictor is
trained on one part and the other part is replayed, ``--num-requests`` requests cycling through
shuffled copies of it, with Poisson arrivals. ``--priority-fraction`` of them (random) get user
priority 0, the rest 1; latency metrics are over all requests.

Machinery: the real ``Scheduler``, policies and ``KVManager`` (page budget of the CPU engine's
default for this geometry, host swap space of the engine's default 4 GiB), stepped on a virtual
clock by step times calibrated from the real ``ModelRunner`` on the small preset
(``sim_calibration``; cached in ``benchmarks/results/scheduler_sim-calibration.json``).

Capacity: the saturated throughput under fcfs with every request arriving at t=0: output tokens per
second while requests are still queued (all seats busy), divided by the stream's mean output length.
Loads are fractions of it. Policies: fcfs, priority, alise (``AlisePolicy`` over the trained
predictor's lengths), oracle (``AlisePolicy`` over the true lengths), all with the default
``AliseConfig``. SLO: ``--slo-factor`` × fcfs mean latency at the lowest load; throughput at the
SLO is the (interpolated) highest load whose mean latency stays within it.
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

from benchmarks.provenance import git_state
from benchmarks.sim_calibration import Geometry, StepTimes, calibrate
from benchmarks.sim_replay import POLICIES, KVBudget, build_policy, simulate, summarize
from benchmarks.sim_workload import (
    FixedLengths,
    build_requests,
    length_tables,
    load_rows,
    make_stream,
    split_rows,
    train_predictor,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_eval_mixtral_8x7b_instruct.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CALIBRATION = RESULTS / "scheduler_sim-calibration.json"
DEFAULT_LOADS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
SWAP_SPACE_BYTES = 4 * 2**30  # EngineConfig.swap_space_gb default
ROW_KEYS = ("policy", "load", "mean_latency_s", "p50_latency_s", "p99_latency_s", "mean_ttft_s",
            "mean_normalized_latency_s", "throughput_rps")
TARGETS = {"load": 0.9, "mean_ratio": 0.5, "p99_ratio": 1.2, "slo_throughput_ratio": 2.0}


# ---------------------------------------------------------------------------------------------- setup


def step_times(args, say) -> StepTimes:
    """The calibration: loaded from ``--calibration``, or measured (and cached) when absent or asked."""
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


def with_seats(times: StepTimes, max_num_seqs: int | None) -> StepTimes:
    """``times`` for fewer seats: decode buckets up to that are calibrated; mixed steps were timed with
    the calibration's full row count (padding rows are nearly free in the ragged path)."""
    if max_num_seqs is None:
        return times
    if not 1 <= max_num_seqs <= times.geometry.max_num_seqs:
        raise ValueError(f"--max-num-seqs must be in [1, {times.geometry.max_num_seqs}] (the calibration's)")
    return dataclasses.replace(times, geometry=dataclasses.replace(times.geometry, max_num_seqs=max_num_seqs))


def kv_budget(times: StepTimes, args) -> KVBudget:
    """Device pages like the CPU engine's default; host pages like its default 4 GiB swap space."""
    from scalellm_jax.engine.kv_manager import KVManager

    g = times.geometry
    num_pages = args.num_pages or g.cpu_num_pages
    kv = KVManager(num_pages, g.page_size, g.max_pages_per_seq)
    if kv.num_usable_pages - kv.watermark_pages < g.max_pages_per_seq:  # the scheduler's per-request check
        raise ValueError(f"--num-pages {num_pages} is too small: a request of max_model_len {g.max_model_len} "
                         f"needs {g.max_pages_per_seq} pages plus the null page and the admission watermark")
    model = times.meta.get("model_config")
    if model is None:
        return KVBudget(num_pages, num_pages)
    page_bytes = model["num_layers"] * 2 * model["num_kv_heads"] * g.page_size * model["head_dim"] * 4  # float32
    return KVBudget(num_pages, SWAP_SPACE_BYTES // page_bytes)


@dataclasses.dataclass
class Setup:
    times: StepTimes
    budget: KVBudget
    replay: list
    predictions: np.ndarray
    streams: list


def prepare(args, say) -> Setup:
    from scalellm_jax.tokenizer import MistralTokenizer

    times = with_seats(step_times(args, say), args.max_num_seqs)
    g = times.geometry
    rows = load_rows(args.dataset, MistralTokenizer(), max_prompt_len=g.max_model_len - 1)
    train, replay = split_rows(rows, args.train_fraction, args.seed)
    start = time.perf_counter()
    predictor = train_predictor(train, fast=args.fast_predictor)
    predictions = predictor.predict_many([r.text for r in replay])
    predictor_s = time.perf_counter() - start
    say(f"workload: {len(rows)} rows, predictor trained on {len(train)} in {predictor_s:.1f} s, "
        f"replaying {len(replay)} as {args.num_requests} requests x {args.seeds} seeds")
    streams = [make_stream(len(replay), args.num_requests, args.priority_fraction, args.seed + s)
               for s in range(args.seeds)]
    return Setup(times, kv_budget(times, args), replay, predictions, streams)


# ---------------------------------------------------------------------------------------------- sweep


def run_policy(setup: Setup, policy: str, rate: float | None, alise_config, seats: int | None = None) -> list:
    """One run per stream of ``policy`` at ``rate`` requests/s (None: all at t=0), on ``seats`` seats
    (default: the setup's)."""
    times = with_seats(setup.times, seats)
    runs = []
    for stream in setup.streams:
        requests = build_requests(stream, setup.replay, rate, setup.times.geometry.max_model_len)
        predicted, true = length_tables(requests, stream, setup.predictions)
        pol, costs = build_policy(policy, FixedLengths(predicted), true, alise_config, tuple(times.decode_s))
        runs.append(simulate(requests, pol, costs, times, setup.budget))
    return runs


def measure_capacity(setup: Setup, alise_config) -> dict:
    runs = run_policy(setup, "fcfs", None, alise_config)
    tokens_per_s = float(np.mean([r.saturated_tokens_per_s for r in runs]))
    mean_len = float(np.mean([r.output_len.mean() for r in runs]))
    return {"capacity_rps": tokens_per_s / mean_len, "saturated_tokens_per_s": tokens_per_s,
            "mean_output_len": mean_len, "burst_rps": float(np.mean([len(r.arrival) / r.makespan for r in runs]))}


def sweep(setup: Setup, policies, loads, capacity_rps: float, alise_config, say,
          policy_seats: dict[str, int] | None = None) -> list[dict]:
    """Every policy at every load; ``policy_seats`` caps some policies' seats (a static admission
    limit) while loads stay fractions of the full-seat capacity."""
    rows = []
    for policy in policies:
        seats = (policy_seats or {}).get(policy)
        for load in loads:
            start = time.perf_counter()
            metrics = summarize(run_policy(setup, policy, load * capacity_rps, alise_config, seats))
            rows.append({"policy": policy, "load": load, **metrics, "offered_rps": load * capacity_rps,
                         "seats": seats or setup.times.geometry.max_num_seqs})
            say(f"  {policy:8} load {load:.2f}: mean {metrics['mean_latency_s']:7.1f} s, "
                f"p99 {metrics['p99_latency_s']:7.1f} s ({time.perf_counter() - start:.1f} s)")
    return rows


# ---------------------------------------------------------------------------------------------- analysis


def load_at_slo(rows: list[dict], policy: str, slo_s: float) -> dict:
    """Highest load whose mean latency is within ``slo_s``, interpolated linearly between grid loads.

    ``censored`` is "above" when even the highest load meets it, "below" when the lowest does not.
    """
    pts = sorted((r["load"], r["mean_latency_s"]) for r in rows if r["policy"] == policy)
    if not pts:
        return {"load": None, "censored": None}
    if pts[0][1] > slo_s:
        return {"load": None, "censored": "below"}
    for (l0, m0), (l1, m1) in zip(pts, pts[1:], strict=False):
        if m1 > slo_s:
            return {"load": l0 + (l1 - l0) * (slo_s - m0) / (m1 - m0), "censored": None}
    return {"load": pts[-1][0], "censored": "above"}


def slo_analysis(rows: list[dict], capacity_rps: float, slo_factor: float) -> dict | None:
    """Each policy's load (and request rate) at the SLO ``slo_factor`` × fcfs mean latency at the lowest load."""
    loads = sorted({r["load"] for r in rows})
    base = [r for r in rows if r["policy"] == "fcfs" and r["load"] == loads[0]]
    if not base:
        return None
    slo = slo_factor * base[0]["mean_latency_s"]
    at_slo = {}
    for policy in sorted({r["policy"] for r in rows}):
        point = load_at_slo(rows, policy, slo)
        at_slo[policy] = {**point, "throughput_rps": None if point["load"] is None else point["load"] * capacity_rps}
    return {"mean_latency_slo_s": slo, "definition": f"{slo_factor} x fcfs mean latency at load {loads[0]}",
            "at_slo": at_slo, "alise_over_fcfs": _slo_ratio(at_slo.get("alise"), at_slo.get("fcfs"))}


def _slo_ratio(alise: dict | None, fcfs: dict | None) -> float | None:
    """alise's load at the SLO over fcfs's; None when unknown (either misses it everywhere, or both meet
    it everywhere). When only alise meets it up to the highest load, the ratio is a lower bound."""
    if not alise or not fcfs or alise["load"] is None or fcfs["load"] is None:
        return None
    if fcfs["censored"] == "above":
        return None
    return alise["load"] / fcfs["load"]


def analyze(rows: list[dict], capacity_rps: float, slo_factor: float) -> dict:
    """The targets: alise vs fcfs at the target load, and throughput at the SLO (also at other SLO factors)."""
    by = {(r["policy"], r["load"]): r for r in rows}
    t = TARGETS
    result: dict = {"slo": slo_analysis(rows, capacity_rps, slo_factor)}
    # Other SLO factors, for context (None: outside the load grid for fcfs or alise).
    result["slo_ratio_by_factor"] = {f: (slo_analysis(rows, capacity_rps, f) or {}).get("alise_over_fcfs")
                                     for f in (1.5, 2.0, 3.0, 5.0)}
    fcfs, alise = by.get(("fcfs", t["load"])), by.get(("alise", t["load"]))
    if fcfs and alise:
        result["mean_ratio"] = alise["mean_latency_s"] / fcfs["mean_latency_s"]
        result["p99_ratio"] = alise["p99_latency_s"] / fcfs["p99_latency_s"]
    if result["slo"] and result["slo"]["alise_over_fcfs"] is not None:
        result["slo_throughput_ratio"] = result["slo"]["alise_over_fcfs"]
    result["meets"] = {
        "mean_ratio": _le(result.get("mean_ratio"), t["mean_ratio"]),
        "p99_ratio": _le(result.get("p99_ratio"), t["p99_ratio"]),
        "slo_throughput_ratio": None if "slo_throughput_ratio" not in result
        else result["slo_throughput_ratio"] >= t["slo_throughput_ratio"],
    }
    return result


def _le(value, limit):
    return None if value is None else value <= limit


# ---------------------------------------------------------------------------------------------- report


def print_table(rows: list[dict], analysis: dict, capacity: dict) -> None:
    print(f"\ncapacity {capacity['capacity_rps']:.3f} req/s ({capacity['saturated_tokens_per_s']:.0f} output tok/s "
          f"saturated, mean output {capacity['mean_output_len']:.0f} tokens)")
    print(f"{'policy':9}{'load':>6}{'mean s':>9}{'p50 s':>9}{'p99 s':>9}{'ttft s':>9}{'s/token':>9}{'req/s':>8}"
          f"{'preempt':>9}")
    for r in rows:
        print(f"{r['policy']:9}{r['load']:>6.2f}{r['mean_latency_s']:>9.1f}{r['p50_latency_s']:>9.1f}"
              f"{r['p99_latency_s']:>9.1f}{r['mean_ttft_s']:>9.2f}{r['mean_normalized_latency_s']:>9.3f}"
              f"{r['throughput_rps']:>8.3f}{r['preemptions']:>9}")
    slo = analysis.get("slo")
    if slo:
        print(f"\nSLO {slo['mean_latency_slo_s']:.1f} s mean latency ({slo['definition']}); load within it:")
        for policy, p in slo["at_slo"].items():
            shown = "none" if p["load"] is None else f"{p['load']:.3f}" + (" (or more)" if p["censored"] else "")
            print(f"  {policy:9}{shown}")
    t = TARGETS
    for key, op, limit in (("mean_ratio", "<=", t["mean_ratio"]), ("p99_ratio", "<=", t["p99_ratio"]),
                           ("slo_throughput_ratio", ">=", t["slo_throughput_ratio"])):
        value = analysis.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"target {key} {op} {limit}: {shown} -> {analysis['meets'][key]}")
    shown = ", ".join(f"{f}x: {'n/a' if v is None else f'{v:.3f}'}" for f, v in analysis["slo_ratio_by_factor"].items())
    print(f"alise/fcfs load at other SLO factors: {shown}")


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
            pts = sorted((r["load"], r[key]) for r in rows if r["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
        ax.set_xlabel("load (fraction of fcfs saturated capacity)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if analysis.get("slo"):
        axes[0].axhline(analysis["slo"]["mean_latency_slo_s"], color="gray", linestyle="--", label="SLO")
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduler_sim", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=pathlib.Path, default=DEFAULT_DATA, help="JSONL with instruction/output")
    p.add_argument("--json", action="store_true", help="print the result rows as one JSON list")
    p.add_argument("--calibration", type=pathlib.Path, default=DEFAULT_CALIBRATION, help="step-time JSON")
    p.add_argument("--calibrate", action="store_true", help="re-time the runner and overwrite --calibration")
    p.add_argument("--loads", type=lambda s: tuple(float(x) for x in s.split(",")), default=DEFAULT_LOADS)
    p.add_argument("--policies", type=lambda s: tuple(s.split(",")), default=POLICIES)
    p.add_argument("--num-requests", type=int, default=1000, help="requests per run")
    p.add_argument("--seeds", type=int, default=2, help="arrival streams per point (metrics pooled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--priority-fraction", type=float, default=0.2)
    p.add_argument("--slo-factor", type=float, default=2.0)
    p.add_argument("--num-pages", type=int, default=None, help="device KV pages (default: the CPU engine's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="seats (default and maximum: the calibration's)")
    p.add_argument("--policy-seats", type=_policy_seats, default={},
                   help="fewer seats for some policies, e.g. alise=32,oracle=32 (loads stay relative to the "
                        "full-seat fcfs capacity)")
    p.add_argument("--alise-config", type=_alise_overrides, default={},
                   help="AliseConfig fields to override for alise and oracle, e.g. aging_rate=0.5,overrun_factor=2")
    p.add_argument("--fast-predictor", action="store_true", help="predictor without MiniLM (tests)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results JSON (default: results/ with a date)")
    p.add_argument("--plot", type=pathlib.Path, default=None, help="PNG path (default: next to --out)")
    args = p.parse_args(argv)
    bad = [x for x in args.policies if x not in POLICIES]
    if bad:
        p.error(f"--policies: unknown {bad}; choose from {list(POLICIES)}")
    if args.num_requests < 1 or args.seeds < 1 or not 0 < args.train_fraction < 1 or not args.loads:
        p.error("--num-requests and --seeds must be >= 1, --train-fraction in (0, 1), --loads non-empty")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()
    if not args.dataset.is_file():
        print(f"error: dataset not found: {args.dataset}", file=sys.stderr)
        return 2
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    from scalellm_jax.engine.policies import AliseConfig

    try:
        alise_config = AliseConfig(**args.alise_config)
    except (TypeError, ValueError) as exc:
        print(f"error: --alise-config: {exc}", file=sys.stderr)
        return 2
    try:
        setup = prepare(args, say)
    except ValueError as exc:  # a bad dataset row, an impossible --max-num-seqs or --num-pages
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seats = setup.times.geometry.max_num_seqs
    too_many = {k: v for k, v in args.policy_seats.items() if not 1 <= v <= seats}
    if too_many:
        print(f"error: --policy-seats: {too_many} outside [1, {seats}] (the simulated engine's seats)", file=sys.stderr)
        return 2
    capacity = measure_capacity(setup, alise_config)
    say(f"capacity: {capacity['capacity_rps']:.3f} req/s")
    start = time.perf_counter()
    rows = sweep(setup, args.policies, args.loads, capacity["capacity_rps"], alise_config, say, args.policy_seats)
    analysis = analyze(rows, capacity["capacity_rps"], args.slo_factor)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"scheduler_sim-{stamp}.json"
    plot_path = args.plot or out.with_suffix(".png")
    note = plot(rows, analysis, plot_path)
    result = {
        "benchmark": "scheduler_sim", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git, "command": " ".join(["python -m benchmarks.scheduler_sim", *raw_argv]),
        "dataset": str(args.dataset), "num_replay_rows": len(setup.replay), "num_requests": args.num_requests,
        "seeds": args.seeds, "priority_fraction": args.priority_fraction, "train_fraction": args.train_fraction,
        "predictor": "fast (no MiniLM)" if args.fast_predictor else "default PredictorConfig",
        "alise_config": dataclasses.asdict(alise_config), "policy_seats": args.policy_seats,
        "kv_budget": dataclasses.asdict(setup.budget),
        "geometry": dataclasses.asdict(setup.times.geometry),
        "calibration": setup.times.to_json(), "capacity": capacity, "targets": TARGETS, "analysis": analysis,
        "sweep_s": time.perf_counter() - start, "plot": None if note else str(plot_path), "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps([{k: r[k] for k in ROW_KEYS} for r in rows]))
    else:
        print_table(rows, analysis, capacity)
    say(note or f"plot: {plot_path}")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
