"""Serving load client: streams OpenAI requests at a server and reports latency and throughput.

    python -m benchmarks.serving --url http://127.0.0.1:8000 --concurrency 1,8,64,256
    python -m benchmarks.serving --url http://127.0.0.1:8000 --request-rate 20 --num-prompts 200
    python -m benchmarks.serving --overhead --model tiny --concurrency 64 --max-tokens 128

Workload: AlpacaEval instructions (``../shared/data``, or ``--dataset``) as completion prompts; each
request asks for exactly as many tokens as Mixtral-8x7B-Instruct's real answer had (Mixtral tokenizer
count, capped by ``--max-tokens``), with ``ignore_eos``. ``--concurrency`` runs closed loops of that
many clients; ``--request-rate`` sends Poisson arrivals at that mean rate (open loop).

Per request: TTFT (send → first content chunk), TPOT ((end − first chunk) / (tokens − 1)), ITL
(gaps between chunks), end-to-end latency; tokens come from ``usage`` (``stream_options``). Goodput
counts requests per second that met both SLOs (``--slo-ttft-ms``, ``--slo-tpot-ms``).

``--overhead`` measures the HTTP layer itself: the same model, engine options and workload run first
through an in-process ``AsyncEngine`` (no HTTP) and then through ``python -m scalellm_jax.server``
started as a subprocess; the result records both and their ratios.

``--simulate-device h200`` (with ``--overhead`` / ``--in-process``) runs both on a simulated device
(``scalellm_jax.engine.simulated_device``): the model step sleeps for the device cost model's time
instead of computing on this host's CPU, so what is measured is everything around the model, in the
GPU regime (a step of tens of milliseconds that costs the host no CPU). Results say so.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import pathlib
import random
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.engine_flags import add_engine_flags, resolve_engine_flags, served_device
from benchmarks.provenance import git_state, output_dir
from benchmarks.random_checkpoint import BENCH_MODELS, write_bench_model
from benchmarks.workload_files import ALPACA_EVAL

ROOT = pathlib.Path(__file__).resolve().parent.parent
OVERHEAD_ENGINE = dict(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=1024)
SIMULATED_ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=4096)  # a GPU deployment's
# HTTP against in-process, by concurrency: output tok/s ratio at least, TTFT p50 and ITL p99 added at most.
OVERHEAD_TARGETS = {64: {"throughput_ratio": 0.98, "ttft_p50_added_ms": 2.0, "itl_p99_added_ms": 2.0},
                    256: {"throughput_ratio": 0.95}}


@dataclasses.dataclass
class Work:
    prompt: str
    prompt_ids: list[int]
    max_tokens: int


@dataclasses.dataclass
class Result:
    ok: bool
    latency: float = 0.0  # end to end
    ttft: float | None = None
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    prompt_tokens: int = 0  # engine_request only (HTTP: not read back)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # engine_request only

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def load_workload(path: pathlib.Path, num_prompts: int, max_tokens: int | None, max_prompt_len: int) -> list[Work]:
    """``num_prompts`` requests from the first rows whose prompts fit ``max_prompt_len`` (longer ones are
    skipped: the prompt goes out as text, so it cannot be cut at a token), the rows again if there are fewer."""
    from scalellm_jax.tokenizer import MistralTokenizer
    from scalellm_jax.workloads import load_rows

    rows = load_rows(path, MistralTokenizer(), max_prompt_len=max_prompt_len, too_long="skip", first=num_prompts)
    work = [Work(r.text, list(r.prompt_ids), min(r.output_len, max_tokens) if max_tokens else r.output_len)
            for r in rows]
    return [work[i % len(work)] for i in range(num_prompts)]  # more prompts than rows: the rows again


# ---------------------------------------------------------------------------------------------- clients


async def http_request(session, url: str, model: str, work: Work) -> Result:
    body = {"model": model, "prompt": work.prompt, "max_tokens": work.max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = Result(ok=False)
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            buffer = b""
            async for data in response.content.iter_any():  # whatever arrived: cheaper than line by line
                now = time.perf_counter() - start
                *events, buffer = (buffer + data).split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: [DONE]"):
                        return _finish(result, time.perf_counter() - start)
                    if event.startswith(b'data: {"error"'):
                        result.error = event[6:].decode()
                        return result
                    if b'"choices":[]' in event:  # the usage chunk
                        result.output_tokens = json.loads(event[6:])["usage"]["completion_tokens"]
                    elif event.startswith(b"data: "):
                        result.chunk_times.append(now)
            result.error = "stream ended without [DONE]"
            return result
    except Exception as exc:  # a failed request is a data point, not the end of the run
        result.error = repr(exc)
        return result


async def engine_request(engine, work: Work) -> Result:
    from scalellm_jax import SamplingParams

    params = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    result = Result(ok=False, prompt_tokens=len(work.prompt_ids))
    try:
        async for out in engine.add_request(work.prompt_ids, params, coalesce=True):
            result.chunk_times.append(time.perf_counter() - start)
            result.output_tokens = len(out.token_ids)
            result.token_ids = out.token_ids
    except Exception as exc:
        result.error = repr(exc)
        return result
    return _finish(result, time.perf_counter() - start)


def _finish(result: Result, latency: float) -> Result:
    result.latency = latency
    result.ttft = result.chunk_times[0] if result.chunk_times else None
    result.ok = result.ttft is not None and result.output_tokens > 0
    if not result.ok and result.error is None:
        result.error = "no output"
    return result


async def run_closed(send, work: list[Work], concurrency: int) -> tuple[list[Result], float]:
    queue = list(reversed(work))
    results: list[Result] = []

    async def client():
        while queue:
            results.append(await send(queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(work)))))
    return results, time.perf_counter() - start


async def run_open(send, work: list[Work], rate: float, seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    for w in work:
        tasks.append(asyncio.create_task(send(w)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- report


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, round(q * (len(values) - 1)))]  # noqa: E731
    return {"mean": 1e3 * statistics.fmean(values), "p50": 1e3 * pick(0.5), "p99": 1e3 * pick(0.99)}


def summarize(results: list[Result], duration: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    good = [r for r in ok if 1e3 * r.ttft <= slo_ttft_ms and (r.tpot is None or 1e3 * r.tpot <= slo_tpot_ms)]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "output_tokens": tokens,
        "request_throughput": len(ok) / duration, "output_tokens_per_s": tokens / duration,
        "goodput_requests_per_s": len(good) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in ok]), "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms(itl), "e2e_ms": _stats_ms([r.latency for r in ok]),
    }


def print_row(label: str, s: dict) -> None:
    f = lambda d: "-" if d["p50"] is None else f"{d['mean']:.1f}/{d['p50']:.1f}/{d['p99']:.1f}"  # noqa: E731
    print(f"{label:>22} {s['completed']:>5}/{s['completed'] + s['failed']:<5} {s['request_throughput']:>7.2f} "
          f"{s['output_tokens_per_s']:>9.1f} {s['goodput_requests_per_s']:>7.2f}  ttft {f(s['ttft_ms'])}  "
          f"tpot {f(s['tpot_ms'])}  itl {f(s['itl_ms'])}  e2e {f(s['e2e_ms'])}")


def plot(runs: list[dict], path: pathlib.Path) -> pathlib.Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((axes[0], lambda s: s["output_tokens_per_s"], ""),
              (axes[1], lambda s: s["ttft_ms"]["p50"], " p50"), (axes[1], lambda s: s["ttft_ms"]["p99"], " p99"),
              (axes[2], lambda s: s["tpot_ms"]["p50"], " p50"), (axes[2], lambda s: s["tpot_ms"]["p99"], " p99"))
    for color, target in zip(("tab:orange", "tab:blue"), sorted({r["target"] for r in runs}), strict=False):
        mine = [r for r in runs if r["target"] == target]
        loads = sorted({r["load"] for r in mine})
        for ax, value, suffix in panels:  # each repeat as a dot, the line through the medians
            ax.scatter([r["load"] for r in mine], [value(r["summary"]) for r in mine], color=color, s=8, alpha=0.4)
            medians = [statistics.median(value(r["summary"]) for r in mine if r["load"] == x) for x in loads]
            ax.plot(loads, medians, "--" if suffix == " p99" else "-", color=color, marker="o", label=target + suffix)
    xlabel = "concurrency" if runs[0]["mode"] == "concurrency" else "request rate (req/s)"
    for ax, title in zip(axes, ("output tokens/s", "TTFT (ms)", "TPOT (ms)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        if runs[0]["mode"] == "concurrency" and len({r["load"] for r in runs}) > 1:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------- targets


def cpu_seconds(pid: int | None = None, *, main_thread: bool = False) -> float | None:
    """CPU time (user + system) used so far by this process, or by process ``pid`` (Linux /proc).

    ``main_thread``: only that process's main thread, where the server (or the in-process client)
    runs its event loop; the engine and XLA work on other threads.
    """
    if pid is None and not main_thread:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    pid = os.getpid() if pid is None else pid
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    try:
        fields = pathlib.Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HTTPTarget:
    """A running server (``--url``), or one this run starts (``--overhead``, then its pid is known)."""

    name = "http"

    def __init__(self, url: str, model: str | None = None, pid: int | None = None):
        self.url, self.model, self.pid = url.rstrip("/"), model, pid

    def cpu_seconds(self) -> float | None:  # client and server together: both are the HTTP path's cost
        server = cpu_seconds(self.pid) if self.pid else None
        return None if server is None else server + cpu_seconds()

    def event_loop_cpu_seconds(self) -> float | None:  # the server's event loop: the HTTP layer's own work
        return cpu_seconds(self.pid, main_thread=True) if self.pid else None

    async def __aenter__(self):
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None))
        if self.model is None:
            async with self.session.get(self.url + "/v1/models") as response:
                self.model = (await response.json())["data"][0]["id"]
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    def send(self, work: Work):
        return http_request(self.session, self.url, self.model, work)


class EngineTarget:
    """The same engine in this process, through ``AsyncEngine`` only: the no-HTTP baseline."""

    name = "in-process"

    def __init__(self, served):
        self.served = served

    def cpu_seconds(self) -> float:
        return cpu_seconds()

    def event_loop_cpu_seconds(self) -> float | None:  # this process's loop: the in-process consumers
        return cpu_seconds(main_thread=True)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        pass

    def send(self, work: Work):
        return engine_request(self.served.engine, work)


def stop_server(process: subprocess.Popen) -> None:
    """Ask a server started by ``start_server`` to exit; kill it if it has not within 30 s."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def server_flags(options: dict) -> list[str]:
    """EngineConfig fields as ``scalellm_jax.server`` flags (a list of sizes, e.g. ``decode_buckets``, as 16,64)."""
    flags = []
    for key, value in options.items():
        if value is None:  # the server's default
            continue
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        flags += ["--" + key.replace("_", "-"), text]
    return flags


def start_server(model: str, dtype: str, options: dict, log_path: pathlib.Path, *, extra_args=(),
                 cache_dir: str = "", timeout: float = 900.0, env: dict | None = None,
                 wait: bool = True) -> tuple[subprocess.Popen, str, str]:
    """Start ``python -m scalellm_jax.server`` on a free port (engine ``options`` as flags, ``env`` added to
    this process's environment); wait for /health unless ``wait`` is False (a follower process serves none)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "scalellm_jax.server", "--model", model, "--served-model-name", "bench",
           "--port", str(port), "--dtype", dtype, "--max-queued-requests", "100000",
           "--compilation-cache-dir", cache_dir]
    cmd += [*server_flags(options), *extra_args]
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env=None if env is None else {**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    if wait and not wait_ready(process, url, log_path, time.monotonic() + timeout):
        process.terminate()
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {log_path}")
    return process, url, " ".join(cmd)


def wait_ready(process: subprocess.Popen, url: str, log_path: pathlib.Path, deadline: float) -> bool:
    """Poll the server's /health until it answers 200 (True) or ``time.monotonic()`` passes ``deadline``."""
    import urllib.request

    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)  # polling another process's port: there is nothing to wait on
    return False


async def measure(targets, work: list[Work], args) -> list[dict]:
    levels = args.concurrency or [args.request_rate]
    mode = "concurrency" if args.concurrency else "request_rate"
    runs = []
    for target in targets:  # a few requests first: connections, first-use paths
        await run_closed(target.send, work[:4], 4)
    for load in levels:
        for repeat in range(args.repeats):
            for target in targets if repeat % 2 == 0 else targets[::-1]:  # alternate: drift hits both
                cpu, loop_cpu = target.cpu_seconds(), target.event_loop_cpu_seconds()
                if mode == "concurrency":
                    results, duration = await run_closed(target.send, work, load)
                else:
                    results, duration = await run_open(target.send, work, load, args.seed + repeat)
                summary = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
                per_token = 1e6 / max(1, summary["output_tokens"])
                if cpu is not None:  # machine-load-independent cost: CPU time per generated token
                    summary["cpu_us_per_token"] = per_token * (target.cpu_seconds() - cpu)
                if loop_cpu is not None:
                    summary["event_loop_cpu_us_per_token"] = per_token * (target.event_loop_cpu_seconds() - loop_cpu)
                print_row(f"{target.name} {mode[:4]}={load:g}", summary)
                runs.append({"target": target.name, "mode": mode, "load": load, "repeat": repeat, "summary": summary})
    return runs


def overhead_report(runs: list[dict]) -> dict:
    """HTTP vs in-process at each load, against ``OVERHEAD_TARGETS`` where the load has one.

    Each repeat runs both targets back to back, so the headline figures are medians over repeats of
    the paired ratio (tok/s) and paired differences (TTFT p50, ITL p99): machine-speed drift between
    repeats, which moves both targets of a pair together, cancels. Medians of each target's own
    figures are kept alongside.
    """
    report = {}
    for load in sorted({r["load"] for r in runs}):
        at_load = {(r["target"], r["repeat"]): r["summary"] for r in runs if r["load"] == load}
        repeats = sorted(rep for target, rep in at_load if target == "http" and ("in-process", rep) in at_load)

        def median(target, key, at_load=at_load, repeats=repeats):
            values = [v for rep in repeats if (v := key(at_load[target, rep])) is not None]
            return statistics.median(values) if values else math.nan

        def paired(op, key, at_load=at_load, repeats=repeats):
            pairs = [(key(at_load["http", rep]), key(at_load["in-process", rep])) for rep in repeats]
            return [op(h, i) for h, i in pairs if h is not None and i is not None]

        tok = lambda s: s["output_tokens_per_s"]  # noqa: E731
        ttft = lambda s: s["ttft_ms"]["p50"]  # noqa: E731
        itl = lambda s: (s.get("itl_ms") or {}).get("p99")  # noqa: E731
        ratios, added, itl_added = paired(lambda h, i: h / i, tok), paired(lambda h, i: h - i, ttft), paired(
            lambda h, i: h - i, itl)
        cpu = {t: median(t, lambda s: s.get("cpu_us_per_token")) for t in ("http", "in-process")}
        figures = {"throughput_ratio": statistics.median(ratios), "ttft_p50_added_ms": statistics.median(added),
                   "itl_p99_added_ms": statistics.median(itl_added) if itl_added else None}
        targets = OVERHEAD_TARGETS.get(int(load)) if float(load).is_integer() else None
        report[str(load)] = {
            **figures,
            "paired_throughput_ratios": ratios, "paired_ttft_p50_added_ms": added,
            "paired_itl_p99_added_ms": itl_added,
            "output_tokens_per_s": {t: median(t, tok) for t in ("http", "in-process")},
            "ttft_p50_ms": {t: median(t, ttft) for t in ("http", "in-process")},
            "itl_p99_ms": {t: median(t, itl) for t in ("http", "in-process")},
            # the throughput ratio a CPU-bound host would see: in-process CPU per token / HTTP's (server + client)
            "cpu_us_per_token": cpu, "cpu_ratio": cpu["in-process"] / cpu["http"],
            # the HTTP layer's own work (server event loop) against the in-process consumers' loop
            "event_loop_cpu_us_per_token": {t: median(t, lambda s: s.get("event_loop_cpu_us_per_token"))
                                            for t in ("http", "in-process")},
            "targets": targets,
            "meets_target": None if targets is None else all(_meets(key, figures[key], limit)
                                                             for key, limit in targets.items()),
        }
    return report


def _meets(key: str, value: float | None, limit: float) -> bool:
    if value is None:
        return False
    return value >= limit if key == "throughput_ratio" else value <= limit


# ---------------------------------------------------------------------------------------------- main


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers, each >= 1 (concurrency levels, page counts)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--overhead", action="store_true",
                        help="start the server for --model and compare it with the in-process AsyncEngine")
    target.add_argument("--in-process", action="store_true",
                        help="only the in-process AsyncEngine for --model (no HTTP): --overhead's baseline on its "
                        "own, for a host where two copies of the model do not fit; pair it with a --url run of the "
                        "same workload through overhead_report (benchmarks.gpu_suite does)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=positive_ints, help="closed-loop client counts, e.g. 1,8,64,256")
    load.add_argument("--request-rate", type=float, help="Poisson arrivals per second (open loop)")
    parser.add_argument("--dataset", type=pathlib.Path, default=ALPACA_EVAL, help=f"the {ALPACA_EVAL.name} file")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on each request's answer length")
    parser.add_argument("--max-prompt-len", type=int, default=512, help="skip longer prompts")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per load level (alternating targets)")
    parser.add_argument("--seed", type=int, default=0, help="arrival-time seed for --request-rate")
    parser.add_argument("--model", default="tiny", help="--overhead/--in-process: a preset, a checkpoint folder, "
                        f"or bench:NAME (one of {', '.join(BENCH_MODELS)}: random weights written to a temporary "
                        "checkpoint folder the targets load; see benchmarks/random_checkpoint.py)")
    add_engine_flags(parser, OVERHEAD_ENGINE, SIMULATED_ENGINE, scope="--overhead/--in-process: ")
    parser.add_argument("--server-args", default="", help="--overhead: extra server flags, e.g. "
                        "'--stream-interval-ms 100'")
    parser.add_argument("--compilation-cache-dir", default=str(pathlib.Path.home() / ".cache" / "scalellm_jax" / "xla"))
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results JSON (default benchmarks/runs/serving-<date>.json; the plot goes next to it)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.request_rate is not None and args.request_rate <= 0:
        parser.error("--request-rate must be > 0")
    for name in ("num_prompts", "repeats", "max_prompt_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.bench_model = args.model.removeprefix("bench:") if args.model.startswith("bench:") else None
    if args.bench_model is not None and args.bench_model not in BENCH_MODELS:
        parser.error(f"--model: unknown {args.model!r}; bench models: {', '.join(BENCH_MODELS)}")
    if resolve_engine_flags(parser, args, OVERHEAD_ENGINE, SIMULATED_ENGINE) and args.url:
        parser.error("--simulate-device: for --overhead or --in-process (a --url server is started by you)")
    return args


async def _run(args, work: list[Work], result: dict, log_path: pathlib.Path) -> list[dict]:
    if args.url:
        async with HTTPTarget(args.url) as http:
            result["server"] = {"url": args.url, "model": http.model}
            return await measure([http], work, args)
    import jax

    from scalellm_jax.server.loading import build_served_model

    if args.compilation_cache_dir:  # shared with the server subprocess: it compiles nothing new
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    with tempfile.TemporaryDirectory(prefix="serving-bench-model-") as folder:
        model = args.model if args.bench_model is None else str(write_bench_model(args.bench_model, folder))
        served = build_served_model("bench", model, dtype=args.dtype, simulate_device=args.simulate_device,
                                    **args.engine_options)
        device, simulated = served_device(served)
        result["server"] = {"model": args.model, "dtype": args.dtype, "engine_options": args.engine_options,
                            "device": device}
        if simulated is not None:
            result["simulated_device"] = simulated
        extra_args = shlex.split(args.server_args)
        if args.simulate_device:
            extra_args += ["--simulate-device", args.simulate_device]
        if args.in_process:
            try:
                return await measure([EngineTarget(served)], work, args)
            finally:
                served.engine.shutdown()
        process, url, command = start_server(
            model, args.dtype, args.engine_options, log_path, extra_args=extra_args,
            cache_dir=args.compilation_cache_dir)
        result["server"].update(command=command, log=str(log_path))
        try:
            async with HTTPTarget(url, pid=process.pid) as http:
                return await measure([EngineTarget(served), http], work, args)
        finally:
            stop_server(process)
            served.engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()
    if not args.dataset.is_file():
        print(f"error: --dataset: {args.dataset} not found (expected ../shared/data/{ALPACA_EVAL.name})",
              file=sys.stderr)
        return 2
    work = load_workload(args.dataset, args.num_prompts, args.max_tokens, args.max_prompt_len)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or output_dir() / f"serving-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "serving", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git, "command": "python -m benchmarks.serving " + shlex.join(raw_argv),
        "client": {"cpu_count": os.cpu_count(), "platform": sys.platform},
        "workload": {"dataset": str(args.dataset), "num_prompts": len(work), "max_tokens_cap": args.max_tokens,
                     "prompt_tokens": sum(len(w.prompt_ids) for w in work),
                     "requested_output_tokens": sum(w.max_tokens for w in work)},
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
    }
    print(f"{'':>22} {'ok/all':<11} {'req/s':>7} {'tok/s':>9} {'good/s':>7}  (ms: mean/p50/p99)")
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        log = pathlib.Path(tempfile.gettempdir()) / f"scalellm-serving-{stamp}.log"  # --overhead's server
        result["runs"] = runner.run(_run(args, work, result, log))
    if args.overhead:
        result["overhead"] = overhead_report(result["runs"])
        for load, o in result["overhead"].items():
            loop_us = o["event_loop_cpu_us_per_token"]
            itl = "n/a" if o["itl_p99_added_ms"] is None else f"{o['itl_p99_added_ms']:+.2f} ms"
            print(f"overhead at {load} (median of paired repeats): HTTP/in-process tok/s {o['throughput_ratio']:.3f}, "
                  f"TTFT p50 {o['ttft_p50_added_ms']:+.2f} ms, ITL p99 {itl} (targets {o['targets']}: "
                  f"{o['meets_target']}); CPU per token in-process/HTTP {o['cpu_ratio']:.3f}; server event loop "
                  f"{loop_us['http']:.1f} us/token")
    if not args.no_plot:
        png = plot(result["runs"], out.with_suffix(".png"))
        result["plot"] = str(png) if png else None
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["summary"]["failed"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
