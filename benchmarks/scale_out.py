"""Scale-out layouts side by side: output tokens/s and TTFT at each concurrency, in the GPU regime.

    python -m benchmarks.scale_out                                  # 64, 256, 1,024 streams, 2 repeats
    python -m benchmarks.scale_out --concurrency 64 --layouts one-replica,two-replicas --repeats 3

Every layout serves Mixtral-8x7B on simulated H200s (``--simulate-device``: the step sleeps for the device
cost model's time and costs the host no CPU, so what runs on the host is everything around the model):

- ``one-replica``: one ``python -m scalellm_jax.server``, one GPU, the client straight to it;
- ``two-replicas``: two servers (a GPU each) behind HAProxy with the recipe's config
  (``server/haproxy/haproxy.cfg``: least outstanding requests), the client to HAProxy;
- ``tensor2-two-hosts``: one engine with tensor=2 over two processes (``SCALELLM_COORDINATOR``), one GPU
  each, as on two hosts: process 0 serves and sends every step to process 1 over the engine's lockstep
  channel (the real transport, here over loopback); the cost model puts the tensor-parallel all-reduces
  on the network between hosts (``device_models``: a 400 Gb/s NIC per GPU) instead of NVLink.

A layout is an entry of ``LAYOUTS``: how many GPUs it uses and how to start it (``Layout.start`` returns
the URL the client sends to and the processes it started). All layouts are started first and stay up;
each concurrency level then runs every layout once per repeat, in alternating order (drift on this
shared host hits all of them).

Workload and client are ``benchmarks.serving``'s: AlpacaEval prompts with Mixtral-8x7B-Instruct's real
answer lengths (capped by ``--max-tokens``, ``ignore_eos``), streamed completions, closed loops of
``concurrency`` clients in one asyncio process. The result records, per run, the whole machine's CPU
use (``/proc/stat``; other jobs on a shared host count too) and the cores the layout's processes and the
client used: together near the host's core count means the host, not the simulated GPUs, set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import pathlib
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from benchmarks.load_balancer import HAProxy, haproxy_binary
from benchmarks.provenance import git_state, write_result
from benchmarks.serving import (
    SIMULATED_ENGINE,
    HTTPTarget,
    cpu_seconds,
    load_workload,
    positive_ints,
    run_closed,
    start_server,
    stop_server,
    summarize,
)
from benchmarks.workload_files import ALPACA_EVAL

MODEL = "mixtral-8x7b"


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to serve: ``start(args, stack, log_dir)`` starts it (processes stopped by ``stack``) and
    returns (the URL clients send to, the pids of its processes)."""

    gpus: int
    description: str
    start: Callable[[argparse.Namespace, contextlib.ExitStack, pathlib.Path], tuple[str, list[int]]]
    engine_gpus: int = 1  # GPUs one engine spans


def engine_options(args, engine_gpus: int) -> dict:
    """The engine options of a server whose engine spans ``engine_gpus`` GPUs: ``--engine``'s, with
    ``--seats-per-gpu`` its ``max_num_seqs`` times its GPUs (every GPU of every layout gets as many seats)."""
    options = dict(args.engine_options)
    if args.seats_per_gpu and engine_gpus > 1:
        options["max_num_seqs"] = engine_gpus * options.get("max_num_seqs", SIMULATED_ENGINE["max_num_seqs"])
    return options


def _replica(args, stack: contextlib.ExitStack, log: pathlib.Path, *, extra_args=(), env=None, wait=True,
             engine_gpus: int = 1):
    process, url, _ = start_server(MODEL, "bfloat16", engine_options(args, engine_gpus), log, timeout=300, env=env,
                                   wait=wait,
                                   extra_args=["--simulate-device", args.simulate_device, *extra_args])
    stack.callback(stop_server, process)
    return process, url


def _one_replica(args, stack, log_dir):
    process, url = _replica(args, stack, log_dir / "one-replica.log")
    return url, [process.pid]


def _two_replicas(args, stack, log_dir):
    replicas = [_replica(args, stack, log_dir / f"two-replicas-{k}.log") for k in (1, 2)]
    balancer = stack.enter_context(HAProxy([url.removeprefix("http://") for _, url in replicas]))
    balancer.wait_all_up()
    return balancer.url, [p.pid for p, _ in replicas] + [balancer.process.pid]


def _tensor2_two_hosts(args, stack, log_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    tp = ["--tensor-parallel-size", "2"]
    # process 1 first (it waits for process 0 at the coordinator); stopped after process 0, which releases it
    follower, _ = _replica(args, stack, log_dir / "tensor2-two-hosts-1.log", extra_args=tp, wait=False,
                           env=_process_env(coordinator, 1), engine_gpus=2)
    leader, url = _replica(args, stack, log_dir / "tensor2-two-hosts-0.log", extra_args=tp,
                           env=_process_env(coordinator, 0), engine_gpus=2)
    return url, [leader.pid, follower.pid]


def _process_env(coordinator: str, rank: int) -> dict:
    return {"SCALELLM_COORDINATOR": coordinator, "SCALELLM_NUM_PROCESSES": "2", "SCALELLM_PROCESS_ID": str(rank)}


LAYOUTS = {
    "one-replica": Layout(1, "one server, one GPU, the client straight to it", _one_replica),
    "two-replicas": Layout(2, "two servers (a GPU each) behind HAProxy (server/haproxy/haproxy.cfg, leastconn)",
                           _two_replicas),
    "tensor2-two-hosts": Layout(2, "one engine with tensor=2 over two processes (a GPU each, as on two hosts, the "
                                "all-reduces over the network), the client to process 0", _tensor2_two_hosts,
                                engine_gpus=2),
}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat's first line."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def compare(runs: list[dict], layouts: list[str]) -> dict:
    """Per concurrency: each layout's medians, and each layout against the first as paired ratios."""
    report = {}
    base = layouts[0]
    for level in sorted({r["concurrency"] for r in runs}):
        at = {(r["layout"], r["repeat"]): r["summary"] for r in runs if r["concurrency"] == level}
        repeats = sorted({rep for _, rep in at})
        entry = {}
        for name in layouts:
            mine = [at[name, rep] for rep in repeats if (name, rep) in at]
            entry[name] = {
                "output_tokens_per_s": statistics.median(s["output_tokens_per_s"] for s in mine),
                "output_tokens_per_s_per_gpu": statistics.median(s["output_tokens_per_s"] for s in mine)
                / LAYOUTS[name].gpus,
                "ttft_p50_ms": statistics.median(s["ttft_ms"]["p50"] for s in mine),
                "ttft_p99_ms": statistics.median(s["ttft_ms"]["p99"] for s in mine),
                "each_repeat_tokens_per_s": [s["output_tokens_per_s"] for s in mine],
                "each_repeat_ttft_p50_ms": [s["ttft_ms"]["p50"] for s in mine],
                "each_repeat_ttft_p99_ms": [s["ttft_ms"]["p99"] for s in mine],
                "machine_cpu_busy": [s["machine_cpu_busy"] for s in mine],
                "layout_cpu_cores": [s["layout_cpu_cores"] for s in mine],
                "client_cpu_cores": [s["client_cpu_cores"] for s in mine],
                "failed": sum(s["failed"] for s in mine),
            }
            if name != base:
                pairs = [(at[name, rep], at[base, rep]) for rep in repeats if (name, rep) in at and (base, rep) in at]
                entry[name][f"throughput_ratio_vs_{base}"] = [a["output_tokens_per_s"] / b["output_tokens_per_s"]
                                                               for a, b in pairs]
                entry[name][f"ttft_p50_ratio_vs_{base}"] = [a["ttft_ms"]["p50"] / b["ttft_ms"]["p50"] for a, b in pairs]
        report[str(level)] = entry
    return report


def processes_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by these processes (all their threads)."""
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


async def measure(urls: dict[str, str], pids: dict[str, list[int]], work, args) -> list[dict]:
    runs = []
    async with contextlib.AsyncExitStack() as stack:
        targets = {name: await stack.enter_async_context(HTTPTarget(url, model="bench")) for name, url in urls.items()}
        for target in targets.values():  # first use: connections, first-request paths
            await run_closed(target.send, work[:8], 8)
        names = list(urls)
        for level in args.concurrency:
            count = max(args.num_prompts, args.prompts_per_stream * level)
            batch = [work[i % len(work)] for i in range(count)]
            for repeat in range(args.repeats):
                for name in names if repeat % 2 == 0 else names[::-1]:  # alternate: drift hits every layout
                    busy, total = machine_cpu()
                    served, client = processes_cpu(pids[name]), cpu_seconds()
                    results, duration = await run_closed(targets[name].send, batch, level)
                    busy2, total2 = machine_cpu()
                    summary = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
                    # The whole machine (shared: other jobs count too), and the cores this layout's
                    # processes (servers, HAProxy) and the client used: what the host gave the run.
                    summary["machine_cpu_busy"] = (busy2 - busy) / max(1, total2 - total)
                    summary["layout_cpu_cores"] = (processes_cpu(pids[name]) - served) / duration
                    summary["client_cpu_cores"] = (cpu_seconds() - client) / duration
                    ttft = summary["ttft_ms"]
                    print(f"{name:>14} c={level:<5} rep {repeat}: {summary['completed']:>5} ok {summary['failed']} "
                          f"failed  {summary['output_tokens_per_s']:8.0f} tok/s  TTFT p50 {ttft['p50']:8.1f} "
                          f"p99 {ttft['p99']:8.1f} ms  host CPU {100 * summary['machine_cpu_busy']:.0f}%, cores: "
                          f"servers {summary['layout_cpu_cores']:.2f} client {summary['client_cpu_cores']:.2f}",
                          flush=True)
                    runs.append({"layout": name, "concurrency": level, "repeat": repeat, "requests": count,
                                 "summary": summary})
    return runs


def _layouts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=_layouts, default=list(LAYOUTS),
                        help=f"comma-separated, the first is the ratios' baseline (default {','.join(LAYOUTS)})")
    parser.add_argument("--concurrency", type=positive_ints, default=[64, 256, 1024], help="closed-loop client counts")
    parser.add_argument("--num-prompts", type=int, default=256, help="requests per run at least")
    parser.add_argument("--prompts-per-stream", type=int, default=2,
                        help="requests per run at least this many times the concurrency")
    parser.add_argument("--max-tokens", type=int, default=128, help="cap on each request's real answer length")
    parser.add_argument("--max-prompt-len", type=int, default=512, help="skip longer prompts")
    parser.add_argument("--repeats", type=int, default=2, help="runs per layout and level, alternating layouts")
    parser.add_argument("--simulate-device", default="h200", help="the simulated GPU of every replica")
    parser.add_argument("--engine", default=None, help="EngineConfig fields as JSON for every server "
                        f"(default {SIMULATED_ENGINE})")
    parser.add_argument("--seats-per-gpu", action="store_true",
                        help="an engine over several GPUs gets max_num_seqs times its GPUs (default: every engine "
                             "the same options)")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--dataset", type=pathlib.Path, default=ALPACA_EVAL)
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="result JSON (default benchmarks/runs/, benchmarks/results/ with SCALELLM_RECORD=1)")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "prompts_per_stream", "max_tokens", "max_prompt_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    from device_models import DEVICES

    if args.simulate_device not in DEVICES:
        parser.error(f"--simulate-device: unknown {args.simulate_device!r}; choose one of {', '.join(DEVICES)}")
    import json

    try:
        args.engine_options = json.loads(args.engine) if args.engine else dict(SIMULATED_ENGINE)
    except ValueError as exc:
        parser.error(f"--engine: not JSON ({exc})")
    if "two-replicas" in args.layouts and haproxy_binary() is None:
        parser.error("--layouts two-replicas: haproxy is not installed (apt-get install haproxy)")
    if not args.dataset.is_file():
        parser.error(f"--dataset: {args.dataset} not found (expected ../shared/data/{ALPACA_EVAL.name})")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()
    work = load_workload(args.dataset, max(args.num_prompts, args.prompts_per_stream * max(args.concurrency)),
                         args.max_tokens, args.max_prompt_len)
    result = {
        "benchmark": "scale_out", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git, "command": "python -m benchmarks.scale_out " + shlex.join(raw_argv),
        "device": f"SIMULATED {args.simulate_device} per GPU (device_models cost model: the step sleeps, no model "
                  f"runs); host: {os.cpu_count()} CPU cores shared by the servers, HAProxy and the client",
        "model": MODEL, "engine_options": args.engine_options, "seats_per_gpu": args.seats_per_gpu,
        "layouts": {name: {"gpus": LAYOUTS[name].gpus, "description": LAYOUTS[name].description,
                           "engine_options": engine_options(args, LAYOUTS[name].engine_gpus)}
                    for name in args.layouts},
        "workload": {"dataset": str(args.dataset), "max_tokens_cap": args.max_tokens, "distinct_requests": len(work),
                     "mean_output_tokens": statistics.fmean(w.max_tokens for w in work)},
    }
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="scale-out-logs-") as logs:
        urls, pids = {}, {}
        for name in args.layouts:
            started = time.monotonic()
            urls[name], pids[name] = LAYOUTS[name].start(args, stack, pathlib.Path(logs))
            print(f"{name}: {urls[name]} (pids {pids[name]}) up in {time.monotonic() - started:.1f} s", flush=True)
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            result["runs"] = runner.run(measure(urls, pids, work, args))
    result["comparison"] = compare(result["runs"], args.layouts)
    for level, entry in result["comparison"].items():
        for name, figures in entry.items():
            ratio = figures.get(f"throughput_ratio_vs_{args.layouts[0]}")
            print(f"c={level:>5} {name:>14}: {figures['output_tokens_per_s']:8.0f} tok/s "
                  f"({figures['output_tokens_per_s_per_gpu']:.0f}/GPU), TTFT p50 {figures['ttft_p50_ms']:.0f} "
                  f"p99 {figures['ttft_p99_ms']:.0f} ms" + (f", tok/s ratio {[round(r, 3) for r in ratio]}"
                                                           if ratio else ""))
    write_result("scale_out-simulated", result, args.out)
    return 0 if all(r["summary"]["failed"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
