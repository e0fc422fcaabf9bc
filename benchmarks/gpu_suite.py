"""The GPU evaluation in four stages, each one command that fits a short GPU lease.

    python -m benchmarks.gpu_suite --estimate                 # predicted H200 wall time of each stage, and why
    python -m benchmarks.gpu_suite --stage kernels            # 1: ceilings, kernel correctness, tuning sweep (<= 4 min)
    python -m benchmarks.gpu_suite --stage decode             # 2: decode roofline, compile times, zero recompiles
    python -m benchmarks.gpu_suite --stage serving            # 3: server at 64 streams, then in-process
    python -m benchmarks.gpu_suite --stage hf                 # 4: the Hugging Face baseline
    python -m benchmarks.gpu_suite --stage decode --preset small   # CPU: the same stage at toy sizes (CI)

Each stage writes ``benchmarks/runs/gpu_suite-<stage>-<preset>-<date>.json`` as it goes (after every
measurement, atomically) and a markdown table at the end, with device, jax version, git commit, command
and date. ``--budget-s`` (default: the stage's limit, 240 s for stage 1 and 300 s for the others) is
enforced: loops stop before a measurement that would not finish in time and record what they skipped,
and a watchdog writes the file and exits at the budget should one measurement overrun its prediction.
Exit status: 0 complete (or cut short by the deadline: "status": "partial"), 1 an error, a failed kernel
check or a failed in-process baseline, 3 stopped by the watchdog.

1. ``kernels``: copy bandwidth and bf16 matmul rate; our Pallas decode and prefill kernels against the
   jnp reference on the device (poisoned pages, edge lengths, int8 KV, a sliding window); every tuning
   configuration of ``benchmarks.kernel_tuning`` timed against XLA and jax's bundled kernel.
2. ``decode``: Mixtral-8x7B (random bf16 weights) decode step at batch 1-256 against the memory roofline
   (bytes a step must read: dense weights, the experts the batch reaches, the KV, over the measured copy
   bandwidth), compile time per bucket, and zero compilations after warmup for a mixed workload.
3. ``serving``: ``python -m scalellm_jax.server`` under the load client (``benchmarks.serving``) at 64
   streams with AlpacaEval lengths, then the same workload in-process: HTTP overhead.
4. ``hf``: the same workload through Hugging Face ``generate`` (bf16 on the GPU, padded batches); its
   summary compares with the newest serving result of the same workload.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

from benchmarks import gpu_estimate, gpu_stages, kernel_tuning
from benchmarks.deadline import Deadline, Recorder
from benchmarks.gpu_estimate import LIMITS_S, step_bytes  # noqa: F401 - step_bytes: the roofline, re-exported
from benchmarks.provenance import git_state, output_dir

ROOT = gpu_stages.ROOT
DATA = gpu_stages.DATA
STAGES = tuple(LIMITS_S)  # in the order to run them


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Sizes of one suite run (``PRESETS`` below)."""

    model: str  # a scalellm_jax preset name (random weights)
    dtype: str
    # stage 1
    kernel_shapes: str  # "mixtral" (32/8 heads, head_dim 128, page 16) or "smoke"
    copy_bytes: int
    matmul_n: int
    kernel_decode: tuple[tuple[int, int], ...]  # (batch, context)
    kernel_prefill: tuple[tuple[int, ...], ...]  # prompt lengths per call
    kernel_decode_configs: tuple[str, ...]  # names in benchmarks.kernel_tuning
    kernel_prefill_configs: tuple[str, ...]
    # stage 2
    batches: tuple[int, ...]  # decode batch sizes, most wanted first
    decode_core: int  # the first this many are the stage's plan; the rest run while the deadline allows
    context: int  # tokens per row in the decode measurement
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    check_requests: int  # the zero-compile check's workload
    # stages 3 and 4: the same workload
    concurrency: int
    num_prompts: int
    max_tokens: int  # cap on each request's answer length
    serving_max_num_seqs: int
    serving_max_num_batched_tokens: int
    serving_max_model_len: int
    serving_seq_buckets: tuple[int, ...] | None  # buckets the server warms (None: the engine's full set)
    serving_token_buckets: tuple[int, ...] | None
    hf_batch: int


PRESETS = {
    # Sized by `--estimate` to fit the limits with the fallback compile times (45 s per 32-layer decode step,
    # 60 s per mixed step): the decode stage compiles 4 of the engine's 25 buckets (batch 16 and 128 only if
    # time is left), the server warms one decode and one mixed bucket (not 15), 128 prompts capped at 256
    # tokens, and stage 1 times two decode shapes.
    "mixtral-8x7b": SuiteConfig(
        model="mixtral-8x7b", dtype="bfloat16", kernel_shapes="mixtral", copy_bytes=2 << 30, matmul_n=8192,
        kernel_decode=((1, 4096), (64, 4096)), kernel_prefill=((4096,), (1024,) * 4),
        kernel_decode_configs=tuple(kernel_tuning.DECODE), kernel_prefill_configs=tuple(kernel_tuning.PREFILL),
        batches=(64, 1, 256, 16, 128), decode_core=3, context=512, max_num_seqs=256, max_num_batched_tokens=2048,
        max_model_len=2048, check_requests=24,
        concurrency=64, num_prompts=128, max_tokens=256, serving_max_num_seqs=64, serving_max_num_batched_tokens=256,
        serving_max_model_len=1024, serving_seq_buckets=(64,), serving_token_buckets=(256,), hf_batch=64,
    ),
    "small": SuiteConfig(
        model="tiny", dtype="float32", kernel_shapes="smoke", copy_bytes=16 << 20, matmul_n=256,
        kernel_decode=((2, 64),), kernel_prefill=((24, 8),),
        kernel_decode_configs=("default", "splits1"), kernel_prefill_configs=("default", "bq16"),
        batches=(4, 1), decode_core=2, context=32, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128,
        check_requests=8,
        concurrency=4, num_prompts=6, max_tokens=8, serving_max_num_seqs=4, serving_max_num_batched_tokens=32,
        serving_max_model_len=128, serving_seq_buckets=(4,), serving_token_buckets=(32,), hf_batch=4,
    ),
}


# ---------------------------------------------------------------------------------------------- report


def summary(results: dict) -> dict:
    """The headline numbers and the issue's targets, from whichever stages ``results`` holds."""
    out: dict = {}
    k = results.get("kernels", {})
    if "correctness" in k:
        out["kernel_correctness_passed"] = sum(r["pass"] for r in k["correctness"])
        out["kernel_correctness_failed"] = sum(not r["pass"] for r in k["correctness"])
        out["kernel_failures"] = len(k.get("failures", []))
    for row in k.get("decode", []) + k.get("prefill", []):
        label = row.get("label") or f"{row['batch']}x{row['context']}"
        kind = "prefill" if "prompt_lens" in row else "decode"
        for key in ("speedup_vs_xla", "speedup_vs_jax_bundled", "best_speedup_vs_xla", "best"):
            if key in row:
                out[f"kernel_{kind}_{label}_{key}"] = row[key]
    d = results.get("decode", {})
    rows = {r["batch"]: r for r in d.get("rows", [])}
    if 64 in rows:
        out["decode_b64_roofline_fraction"] = rows[64]["roofline_fraction"]
        out["decode_b64_target_met"] = rows[64]["roofline_fraction"] >= 0.6
    if "compilations_after_warmup" in d:
        out["zero_compilations_after_warmup"] = d["compilations_after_warmup"] == 0
    if "full_warmup_estimate_s" in d:
        out["warmup_measured_s"] = d["warmup_s"]
        out["warmup_full_estimate_s"] = d["full_warmup_estimate_s"]
        out["warmup_target_met_estimated"] = d["full_warmup_estimate_s"] < 180
    runs = results.get("serving", {}).get("client", {}).get("runs", [])
    ours = next((r["summary"] for r in runs if r["load"] == results["config"]["concurrency"]), None)
    hf = results.get("hf", {}).get("tokens_per_s")
    if hf:
        out["hf_output_tokens_per_s"] = hf
    if ours is not None:
        tps = ours["output_tokens_per_s"]
        out["serving_output_tokens_per_s"] = tps
        out["serving_ttft_p50_ms"] = ours["ttft_ms"]["p50"]
        out["serving_tpot_p50_ms"] = ours["tpot_ms"]["p50"]
        out["serving_e2e_p50_ms"] = ours["e2e_ms"]["p50"]
        overhead = results["serving"].get("overhead")
        if "in_process_error" in results["serving"]:
            out["http_overhead_error"] = results["serving"]["in_process_error"][:300]
        if overhead:
            out["http_vs_in_process_tokens_per_s"] = overhead["throughput_ratio"]
            out["http_added_ttft_p50_ms"] = overhead["ttft_p50_added_ms"]
            out["http_overhead_target_met"] = overhead["meets_target"]
        if hf:
            out["serving_vs_hf"] = tps / hf
            out["serving_vs_hf_target_met"] = tps / hf >= 10
    return out


def _kernel_lines(k: dict) -> list[str]:
    lines = []
    if "ceilings" in k:
        c = k["ceilings"]
        lines += [f"Ceilings: copy {c['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul {c['bf16_matmul_TFLOPs']:.1f} "
                  "TFLOP/s", ""]
    for kind, metric, frac in (("decode", "GBps", "frac_copy_bw"), ("prefill", "TFLOPs", "frac_matmul")):
        if k.get(kind):
            lines += [f"| {kind} | impl | ms | {metric} | % of ceiling | err vs XLA |", "|---|---|---|---|---|---|"]
            for row in k[kind]:
                label = row.get("label") or f"{row['batch']}x{row['context']}"
                lines += [f"| {label} | {name} | {e['ms']:.3f} | {e[metric]:.1f} | {100 * e[frac]:.0f}% | "
                          + (f"{e['rel_err_vs_xla']:.1e} |" if "rel_err_vs_xla" in e else "— |") if "ms" in e else
                          f"| {label} | {name} | {e.get('error') or e.get('skipped')} | | | |"
                          for name, e in row["impls"].items()]
            lines.append("")
    return lines


def markdown(results: dict) -> str:
    lines = [f"# GPU suite stage {results['stage']}: {results['device']} — {results['date']} — "
             f"commit {results['git']['commit'][:12]} — {results['status']}", ""]
    lines += _kernel_lines(results.get("kernels", {}))
    d = results.get("decode", {})
    if d.get("rows"):
        lines += ["| batch | step ms | roofline ms | fraction | tokens/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['step_ms']:.2f} | {r['roofline_ms']:.2f} "
                  f"| {100 * r['roofline_fraction']:.0f}% | {r['tokens_per_s']:.0f} |" for r in d["rows"]]
        lines.append("")
    lines += ["| check | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in results.get("summary", {}).items()]
    if results.get("skipped"):
        lines += ["", "Skipped (deadline):", *(f"- {s['what']}" for s in results["skipped"])]
    errors = [f"- {name}: {r['error']}" for name, r in results.items() if isinstance(r, dict) and r.get("error")]
    if results.get("error"):
        errors.append(f"- {results['error']}")
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def device_info(stage: str) -> tuple[str, str]:
    """(device name, platform). The serving and HF stages must not start JAX's GPU client (it would take
    the memory the server or the HF model needs): they ask nvidia-smi."""
    if stage in ("kernels", "decode"):
        import jax

        device = jax.devices()[0]
        return device.device_kind, device.platform
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
        return out.splitlines()[0], "gpu"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "cpu", "cpu"


def _prepare_process(stage: str) -> None:
    import jax

    if stage in ("serving", "hf"):
        jax.config.update("jax_platforms", "cpu")  # this process stays off the GPU (see device_info)
    elif stage == "decode":
        try:  # the engine's memory plan needs XLA's allocator to allow gpu_memory_utilization (0.9)
            from scalellm_jax.engine.memory import configure_allocator
        except ImportError:
            return
        configure_allocator(0.9)


def _compare_serving(results: dict, out: pathlib.Path, path: pathlib.Path | None) -> dict:
    """For the HF stage: the serving result of the same workload (``path``, else the newest beside ``out``)."""
    found = sorted(out.parent.glob(f"gpu_suite-serving-{results['preset']}-*.json")) if path is None else [path]
    keys = ("concurrency", "num_prompts", "max_tokens", "model")
    for candidate in reversed(found):
        serving = json.loads(candidate.read_text())
        if all(serving.get("config", {}).get(k) == results["config"][k] for k in keys) and "serving" in serving:
            results["compared_with"] = candidate.name
            return {**results, "serving": serving["serving"]}
    results["compared_with"] = None
    return results


def run_stage(stage: str, cfg: SuiteConfig, args, raw_argv: list[str], start: float) -> int:
    _prepare_process(stage)
    import jax

    ct = gpu_estimate.compile_times(args.compile_check)
    deadline = Deadline(LIMITS_S[stage] if args.budget_s is None else args.budget_s, start=start)
    name, platform = device_info(stage)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or output_dir() / f"gpu_suite-{stage}-{args.preset}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "benchmark": "gpu_suite", "stage": stage, "stage_number": STAGES.index(stage) + 1, "preset": args.preset,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": name,
        "platform": platform, "jax": jax.__version__, "git": git_state(),
        "command": " ".join(["python -m benchmarks.gpu_suite", *raw_argv]), "budget_s": deadline.budget_s,
        "predicted_s": gpu_estimate.estimate(cfg, args.compile_check)[stage]["total_s"], "status": "running",
        "config": dataclasses.asdict(cfg), "compile_times": {k: v[0] for k, v in ct.items()}, "skipped": [],
    }
    rec = Recorder(out, results)
    rec.save()
    rec.arm(deadline)
    print(f"== stage {results['stage_number']} {stage}: budget {deadline.budget_s:.0f} s, writing {out}", flush=True)
    try:
        getattr(gpu_stages, stage)(cfg, rec, deadline, gpu_stages.Context(ct, out.parent, args.dataset))
    except Exception as exc:  # noqa: BLE001 - what was measured is kept; the error is recorded
        traceback.print_exc()
        results["error"] = gpu_stages._error(exc)
    rec.disarm()
    results["wall_s"] = deadline.elapsed()
    full = _compare_serving(results, out, args.serving_result) if stage == "hf" else results
    results["summary"] = summary(full)
    results["status"] = "error" if "error" in results else "partial" if results["skipped"] else "complete"
    rec.save()
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')} ({results['wall_s']:.0f} s)")
    serving = results.get("serving", {})
    failed = ("error" in results or results.get("kernels", {}).get("failures")
              or "in_process_error" in serving or "client_error" in serving)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()  # the stage's budget counts from here
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--estimate", action="store_true", help="print each stage's predicted H200 wall time; "
                        "exit 1 if a stage is predicted over its limit")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-8x7b")
    parser.add_argument("--budget-s", type=float, help="the stage's time budget (default: its limit)")
    parser.add_argument("--out", type=pathlib.Path,
                        help="result JSON (default benchmarks/runs/gpu_suite-<stage>-<preset>-<date>.json)")
    parser.add_argument("--compile-check", help="a gpu_compile_check JSON for compile times (default: the newest "
                        "in benchmarks/results; 'none': the fallbacks)")
    parser.add_argument("--dataset", type=pathlib.Path, default=DATA, help="serving, hf: the AlpacaEval workload "
                        f"(default {DATA.relative_to(ROOT.parent)} beside the repository)")
    parser.add_argument("--serving-result", type=pathlib.Path, help="hf: the serving stage's JSON to compare with "
                        "(default: the newest with the same workload beside --out)")
    args = parser.parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    cfg = PRESETS[args.preset]
    if args.estimate:
        est = gpu_estimate.estimate(cfg, args.compile_check)
        print(gpu_estimate.report(est))
        return 0 if all(est[s]["fits"] for s in STAGES) else 1
    if args.stage is None:
        parser.error("give --stage (" + ", ".join(STAGES) + ") or --estimate")
    if args.stage in ("serving", "hf") and not args.dataset.is_file():
        print(f"error: workload data not found: {args.dataset} (the serving and hf stages need it; see --dataset)",
              file=sys.stderr)
        return 2
    if args.serving_result is not None and not args.serving_result.is_file():
        parser.error(f"--serving-result: {args.serving_result} not found")
    return run_stage(args.stage, cfg, args, raw_argv, start)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
