"""Ours against vLLM's CPU engine and Hugging Face, side by side on this machine: ``make bench-peers``.

    python -m benchmarks.peers --peer-python .venv-peers/bin/python            # everything
    python -m benchmarks.peers --modes offline --dtypes float32 --repeats 3
    python -m benchmarks.peers --engines ours --modes offline --model tiny     # smoke, no peer env

Every engine gets the same random-weight Mixtral checkpoint (``benchmarks/peers/workload.py``) and
the same workload: AlpacaEval prompts with Mixtral-8x7B-Instruct's real answer lengths, greedy,
EOS ignored.

- **offline**: each engine generates the whole workload in one call, in its own process
  (``benchmarks/peers/offline_engine.py``); output tokens/s exclude loading and warmup.
- **serving**: each engine's OpenAI server (``python -m scalellm_jax.server``, ``vllm serve``)
  under the same load client (``benchmarks.serving``), in closed loops of each ``--concurrency``;
  a level sends ``max(8, 2 × concurrency)`` requests.

Each repeat runs every engine once per dtype, in an order rotated by one each repeat; ratios are
taken within a repeat and reported with their spread. Before any timing counts, the first
float32 answers are cross-checked between engines: engines that disagree are not running the
same model, and the run stops.

vLLM runs with the settings its CPU documentation recommends for throughput on this machine: every
core bound to its OpenMP threads (its default keeps one core back for its front end, which on a
2-core machine halves it), no core reserved, Intel's OpenMP preloaded when the peer environment has
it, a 1 GiB KV cache (the workload needs ~130 MB) and its own block size. Each choice is recorded
in the result.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks.peers.offline_engine import RESULT_PREFIX
from benchmarks.peers.report import agreement, paired_differences, paired_ratios, rotated, spread
from benchmarks.provenance import cpu_description, git_state, output_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENGINES = ("ours", "vllm", "hf")
SERVING_ENGINES = ("ours", "vllm")  # Hugging Face has no serving engine of its own
CHECK_TOKENS = 4
MIN_AGREEMENT = 0.9  # of prompts whose first CHECK_TOKENS float32 answer tokens agree, per engine pair


def vllm_env(peer_python: str) -> tuple[dict, dict]:
    """Environment for a vLLM process, and the settings it records."""
    cores = os.cpu_count() or 1
    settings = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    iomp = pathlib.Path(peer_python).parent.parent / "lib" / "libiomp5.so"  # intel-openmp, a vllm-cpu dependency
    if iomp.is_file():
        settings["LD_PRELOAD"] = str(iomp)
    return os.environ | settings, settings


def ours_env(cache_dir: str) -> dict:
    return os.environ | {"JAX_COMPILATION_CACHE_DIR": cache_dir}  # load time only; never timed


def python_for(engine: str, args) -> str:
    return sys.executable if engine == "ours" else args.peer_python


# ---------------------------------------------------------------------------------------------- offline


def run_offline(engine: str, dtype: str, model_dir, workload, args, log) -> dict:
    env = ours_env(args.compilation_cache_dir) if engine == "ours" else vllm_env(args.peer_python)[0]
    cmd = [python_for(engine, args), "-m", "benchmarks.peers.offline_engine", "--engine", engine,
           "--model-dir", str(model_dir), "--workload", str(workload), "--dtype", dtype,
           "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", str(args.max_model_len), "--keep-tokens", str(CHECK_TOKENS)]
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=out, text=True,
                              timeout=args.timeout_s)
        out.write(done.stdout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{engine} ({dtype}) offline run failed with exit code {done.returncode}; see {log}")


def offline(args, model_dir, workload, log, say) -> dict:
    runs, check = [], None
    for repeat in range(args.repeats):
        for dtype in args.dtypes:
            for engine in rotated(args.engines, repeat):
                r = run_offline(engine, dtype, model_dir, workload, args, log)
                say(f"offline {dtype:9} repeat {repeat} {engine:5} {r['tokens_per_s']:8.1f} tok/s "
                    f"(load {r['load_s']:.0f} s)")
                runs.append({"engine": engine, "dtype": dtype, "repeat": repeat, **r})
            if check is None and dtype == "float32" and len(args.engines) > 1:
                check = agreement({r["engine"]: r["first_tokens"] for r in runs if r["dtype"] == "float32"},
                                  CHECK_TOKENS)
                say(f"greedy agreement on the first {CHECK_TOKENS} tokens (float32): {check}")
                if min(check.values()) < MIN_AGREEMENT:
                    raise RuntimeError(f"engines disagree on float32 greedy answers ({check}): not the same model")
    first = {f"{r['engine']}/{r['dtype']}": r["first_tokens"] for r in runs if r["repeat"] == 0}
    for r in runs:
        del r["first_tokens"]
    return {
        "runs": runs,
        "float32_agreement": check,
        "bfloat16_agreement": agreement({k.split("/")[0]: v for k, v in first.items() if k.endswith("/bfloat16")},
                                        CHECK_TOKENS) if sum(k.endswith("/bfloat16") for k in first) > 1 else None,
        "tokens_per_s": {f"{e}/{d}": spread([r["tokens_per_s"] for r in runs if r["engine"] == e and r["dtype"] == d])
                         for d in args.dtypes for e in args.engines},
        "ratio_ours_over": paired_ratios(runs, "tokens_per_s", group=("dtype",)),
    }


# ---------------------------------------------------------------------------------------------- serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model_dir, dtype: str, args, log_path) -> tuple[subprocess.Popen, str, str]:
    from benchmarks.serving import wait_ready

    port = free_port()
    cmd = [args.peer_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "bench", "--tokenizer-mode", "mistral", "--dtype", dtype,
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--gpu-memory-utilization", "0.5",
           "--seed", "0", "--port", str(port), "--uvicorn-log-level", "warning"]
    log = open(log_path, "a")  # noqa: SIM115 - closed with the process
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=vllm_env(args.peer_python)[0])
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(process, url, log_path, time.monotonic() + args.timeout_s):
        process.terminate()
        raise RuntimeError(f"vLLM server not ready after {args.timeout_s} s; see {log_path}")
    return process, url, shlex.join(cmd)


def start_ours(model_dir, dtype: str, args, log_path) -> tuple[subprocess.Popen, str, str]:
    from benchmarks.serving import start_server

    options = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   max_model_len=args.max_model_len)
    return start_server(str(model_dir), dtype, options, pathlib.Path(log_path),
                        cache_dir=args.compilation_cache_dir, timeout=args.timeout_s)


async def serve_levels(url: str, work: list, levels: list[int]) -> list[dict]:
    from benchmarks.serving import HTTPTarget, run_closed, summarize

    out = []
    async with HTTPTarget(url) as target:
        await run_closed(target.send, work[:4], 4)  # connections and first-use paths
        for level in levels:
            results, duration = await run_closed(target.send, work[:max(8, 2 * level)], level)
            out.append({"concurrency": level, "summary": summarize(results, duration, 1e9, 1e9)})
    return out


def serving(args, model_dir, log, say) -> dict:
    from benchmarks.serving import load_workload, stop_server

    work = load_workload(args.data, max(8, 2 * max(args.concurrency)), args.max_tokens, args.max_prompt_len)
    engines = [e for e in args.engines if e in SERVING_ENGINES]
    runs, commands = [], {}
    for repeat in range(args.repeats):
        for dtype in args.dtypes:
            for engine in rotated(engines, repeat):
                start = start_ours if engine == "ours" else start_vllm
                server_log = log.with_name(f"{log.stem}-{engine}-{dtype}-{repeat}.log")
                process, url, command = start(model_dir, dtype, args, server_log)
                commands[engine] = command
                try:
                    levels = asyncio.run(serve_levels(url, work, args.concurrency))
                finally:
                    stop_server(process)
                for level in levels:
                    s = level["summary"]
                    ttft = s["ttft_ms"]["p50"]
                    say(f"serving {dtype:9} repeat {repeat} {engine:5} c={level['concurrency']:<3} "
                        f"{s['output_tokens_per_s']:8.1f} tok/s  TTFT p50 {'-' if ttft is None else round(ttft)} ms  "
                        f"failed {s['failed']} {s['errors'][:1] if s['failed'] else ''}")
                    runs.append({"engine": engine, "dtype": dtype, "repeat": repeat, **level,
                                 "tokens_per_s": s["output_tokens_per_s"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                                 "failed": s["failed"]})
    group = ("dtype", "concurrency")
    return {"runs": runs, "commands": commands,
            "workload": {"requests_per_level": {c: max(8, 2 * c) for c in args.concurrency},
                         "max_tokens": args.max_tokens, "max_prompt_len": args.max_prompt_len},
            "ratio_ours_over": paired_ratios(runs, "tokens_per_s", group=group),
            "ttft_p50_added_ms": paired_differences(runs, "ttft_p50_ms", group=group)}


# ---------------------------------------------------------------------------------------------- main


def _list(choices):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def parse_args(argv):
    from benchmarks.random_checkpoint import BENCH_MODELS
    from benchmarks.serving import positive_ints
    from benchmarks.workload_files import ALPACA_EVAL

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=_list(ENGINES), default=list(ENGINES))
    parser.add_argument("--modes", type=_list(("offline", "serving")), default=["offline", "serving"])
    parser.add_argument("--dtypes", type=_list(("float32", "bfloat16")), default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 16, 64], help="serving: closed-loop streams")
    parser.add_argument("--peer-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                        help="the Python of the environment with vllm-cpu and transformers (make bench-peers)")
    parser.add_argument("--model", choices=sorted(BENCH_MODELS), default="medium", help="random-weight model shape")
    parser.add_argument("--data", type=pathlib.Path, default=ALPACA_EVAL)
    parser.add_argument("--num-prompts", type=int, default=64, help="offline requests")
    parser.add_argument("--max-prompt-len", type=int, default=256,
                        help="offline: longer prompts are truncated (token ids); serving: skipped (text)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--timeout-s", type=int, default=1800, help="per engine run or server start")
    parser.add_argument("--compilation-cache-dir", default=str(pathlib.Path.home() / ".cache" / "scalellm_jax" / "xla"))
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default benchmarks/runs/peers-<date>.json")
    args = parser.parse_args(argv)
    for name in ("repeats", "num_prompts", "max_prompt_len", "max_tokens", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_prompt_len + args.max_tokens > args.max_model_len:
        parser.error(f"--max-model-len ({args.max_model_len}) must fit --max-prompt-len + --max-tokens")
    if not args.data.is_file():
        parser.error(f"--data: {args.data} not found")
    if set(args.engines) - {"ours"} and not pathlib.Path(args.peer_python).is_file():
        parser.error(f"--peer-python: {args.peer_python} not found; `make bench-peers` builds the peer environment "
                     "(or pass --engines ours)")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or output_dir() / f"peers-{stamp}.json"
    log = pathlib.Path(tempfile.gettempdir()) / f"scalellm-peers-{stamp}.log"
    say = lambda text: print(text, flush=True)  # noqa: E731
    result = {
        "benchmark": "peers", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git, "command": "python -m benchmarks.peers " + shlex.join(raw_argv),
        "device": {"kind": "cpu", **cpu_description()}, "log": str(log),
        "engine_config": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                          "max_model_len": args.max_model_len},
        "vllm_settings": vllm_env(args.peer_python)[1] if "vllm" in args.engines else None,
    }
    say(f"log: {log}")
    from benchmarks.peers.workload import prepare

    with tempfile.TemporaryDirectory(prefix="peers-") as folder:
        model_dir, workload, summary = prepare(pathlib.Path(folder), num_prompts=args.num_prompts,
                                               max_prompt_len=args.max_prompt_len, max_tokens=args.max_tokens,
                                               data=args.data, model=args.model)
        result["model"] = args.model
        result["workload"] = {"data": str(args.data), **summary}
        try:
            if "offline" in args.modes:
                result["offline"] = offline(args, model_dir, workload, log, say)
            if "serving" in args.modes:
                result["serving"] = serving(args, model_dir, log, say)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for mode in ("offline", "serving"):
        for group, peers in (result.get(mode) or {}).get("ratio_ours_over", {}).items():
            for peer, s in peers.items():
                say(f"{mode} {group}: ours/{peer} median {s['median']:.2f}x (range {s['min']:.2f}-{s['max']:.2f})")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
