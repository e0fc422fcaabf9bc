"""Soak: a long run of mixed, hostile traffic against a server process, then checks that nothing leaked.

    python -m benchmarks.soak [--requests 10000] [--concurrency 96] [--disconnect-fraction 0.3]
                              [--overload-factor 10] [--model PATH|PRESET] [--server-args '...']

It starts ``python -m scalellm_jax.server`` (the built-in demo model unless ``--model``), then:

1. greedy answers to a few fixed prompts (the "before" texts); a warm-up of ``--warmup-requests`` of
   the same mix (first-use allocations are not a leak); the server's RSS;
2. the soak: ``--requests`` requests, ``--concurrency`` at a time, each drawn at random: chat or
   completions, streamed or not, ``n`` 1-3, temperature 0 / 0.7 / 1, top-p, top-k, a seed, 1-32
   tokens. A ``--disconnect-fraction`` of them hang up on purpose, at a random phase: while sending
   the body, after sending it (before any answer), or in the middle of a stream;
3. an overload phase: ``--overload-factor`` × the concurrency at once, until ``--overload-requests``
   were sent (the server answers what it cannot queue with 429);
4. once the server is idle: KV pages still held, RSS again, and the greedy answers again.

It reports requests sent, completed, disconnected on purpose, 4xx by code, 5xx, hung (no answer
within ``--request-timeout-s``), other failures, KV pages in use after, RSS before/after and whether
the greedy texts are identical, as JSON in ``benchmarks/runs/soak-<date>.json``; the exit code is
1 when a target is missed (any 5xx, hung request or leaked page; RSS growth over ``--max-rss-growth``;
different greedy texts).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import json
import pathlib
import random
import shlex
import sys
import tempfile
import time
from urllib.parse import urlparse

import aiohttp

from benchmarks.provenance import git_state, output_dir
from benchmarks.serving import start_server, stop_server
from benchmarks.workload_files import ALPACA_EVAL

# The demo model (``python -m scalellm_jax.server`` without --model).
DEMO = ("tiny", {"max_num_seqs": 16, "max_num_batched_tokens": 32, "max_model_len": 2048})
MAX_N = 3  # choices per request at most: the queue the server gets unless told (MAX_N x --concurrency) holds the
# soak phase, so only the overload phase meets 429s
GREEDY_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:",
                  "1, 2, 3, 4,", "Translate to German: good morning", "The quick brown fox", "Q: What is 7 x 8?\nA:")
FALLBACK_PROMPTS = ("Write a haiku about the sea.", "Explain recursion to a child.", "Give me a recipe for soup.",
                    "What is the tallest mountain?", "Summarize the plot of Hamlet.")


@dataclasses.dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    disconnected: int = 0  # hung up on purpose
    hung: int = 0
    failed: int = 0  # no HTTP answer we could read, not on purpose
    status: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # 4xx/5xx by code
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def report(self) -> dict:
        return {"sent": self.sent, "completed": self.completed, "disconnected_on_purpose": self.disconnected,
                "hung": self.hung, "failed": self.failed,
                "4xx": {str(k): v for k, v in sorted(self.status.items()) if 400 <= k < 500},
                "5xx": sum(v for k, v in self.status.items() if k >= 500),
                "failure_kinds": dict(self.failures.most_common(10))}


def _body(rng: random.Random, prompts: list[str], model: str, chat: bool, stream: bool) -> dict:
    body = {"model": model, "max_tokens": rng.randint(1, 32), "n": rng.randint(1, MAX_N), "stream": stream,
            "temperature": rng.choice([0.0, 0.7, 1.0])}
    if rng.random() < 0.5:
        body["top_p"] = round(rng.uniform(0.5, 1.0), 3)
    if rng.random() < 0.5:
        body["top_k"] = rng.choice([-1, 5, 40])
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(2**31)
    prompt = rng.choice(prompts)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


async def _complete(session: aiohttp.ClientSession, url: str, body: dict, tally: Tally) -> None:
    async with session.post(url, json=body) as response:
        if response.status >= 400:
            tally.status[response.status] += 1
            await response.read()
            return
        if body["stream"]:
            ended = errored = False
            async for line in response.content:
                ended = ended or line.strip() == b"data: [DONE]"
                errored = errored or line.startswith(b'data: {"error"')
            if not ended:
                raise aiohttp.ClientPayloadError("stream ended without [DONE]")
            if errored:  # a failure after the stream started: counted as its own kind
                raise ValueError("an error event in the stream")
        else:
            answer = await response.json()
            if len(answer["choices"]) != body["n"]:
                raise ValueError(f"{len(answer['choices'])} choices for n={body['n']}")
        tally.completed += 1


async def _hang_up(url: str, body: dict, phase: str, rng: random.Random) -> None:
    """Send the request by hand and close the connection at ``phase``: sending, sent, or streaming."""
    parsed = urlparse(url)
    payload = json.dumps(body).encode()
    head = (f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
    try:
        if phase == "sending":
            writer.write(head + payload[: rng.randint(0, len(payload) - 1)])
            await writer.drain()
            return
        writer.write(head + payload)
        await writer.drain()
        if phase == "streaming":
            for _ in range(rng.randint(1, 3)):  # the headers, then a chunk or two
                if not await reader.readline():
                    break
    finally:
        writer.transport.abort()  # a hang-up, not a graceful close


async def _one(session, base: str, rng: random.Random, prompts, model: str, disconnect: float, timeout: float,
               tally: Tally) -> None:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    body = _body(rng, prompts, model, chat, stream)
    url = base + ("/v1/chat/completions" if chat else "/v1/completions")
    tally.sent += 1
    try:
        async with asyncio.timeout(timeout):
            if rng.random() < disconnect:
                phase = rng.choice(["sending", "sent", "streaming"] if stream else ["sending", "sent"])
                await _hang_up(url, body, phase, rng)
                tally.disconnected += 1
            else:
                await _complete(session, url, body, tally)
    except TimeoutError:
        tally.hung += 1
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        tally.failed += 1
        tally.failures[type(exc).__name__] += 1


async def _drive(base: str, count: int, concurrency: int, seed: int, prompts, model: str, disconnect: float,
                 timeout: float) -> tuple[Tally, float]:
    tally = Tally()
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=concurrency)
    start = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        remaining = iter(range(count))

        async def worker():
            for _ in remaining:
                await _one(session, base, random.Random(rng.random()), prompts, model, disconnect, timeout, tally)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally, time.monotonic() - start


async def _greedy(base: str, model: str) -> list[str]:
    async with aiohttp.ClientSession() as session:
        texts = []
        for prompt in GREEDY_PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0.0}
            async with session.post(base + "/v1/completions", json=body) as response:
                response.raise_for_status()
                texts.append((await response.json())["choices"][0]["text"])
        return texts


async def _metrics(base: str) -> dict[str, float]:
    """The server's unlabelled samples from ``/metrics``, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        text = await response.text()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


async def _idle(base: str, timeout: float = 60.0) -> dict[str, float]:
    """The server's metrics once nothing runs or waits (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        values = await _metrics(base)
        busy = values.get("scalellm_num_requests_running", 0) + values.get("scalellm_num_requests_waiting", 0)
        if not busy or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.2)  # polling another process: there is nothing to wait on


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


MAX_PROMPT_CHARS = 1000  # longer prompts are skipped: the soak measures stability, not long prefills


def load_prompts(path: pathlib.Path, limit: int = 500) -> list[str]:
    """The first ``limit`` prompts of at most ``MAX_PROMPT_CHARS`` characters (the built-in few without a file)."""
    from scalellm_jax.workloads import read_rows

    if not path.is_file():
        return list(FALLBACK_PROMPTS)
    return [r.instruction for r in read_rows(path) if len(r.instruction) <= MAX_PROMPT_CHARS][:limit]


async def soak(args, base: str, pid: int, model: str, simulated: bool) -> dict:
    prompts = load_prompts(args.dataset)
    await _drive(base, 8, 4, args.seed, prompts, model, 0.0, args.request_timeout_s)  # first-use paths
    before = None if simulated else await _greedy(base, model)
    await _drive(base, args.warmup_requests, args.concurrency, args.seed + 3, prompts, model,
                 args.disconnect_fraction, args.request_timeout_s)
    await _idle(base)
    rss_before = rss_bytes(pid)
    main, main_s = await _drive(base, args.requests, args.concurrency, args.seed + 1, prompts, model,
                                args.disconnect_fraction, args.request_timeout_s)
    print(f"soak: {main.report()} in {main_s:.0f} s", flush=True)
    overload, overload_s = await _drive(base, args.overload_requests, args.concurrency * args.overload_factor,
                                        args.seed + 2, prompts, model, args.disconnect_fraction,
                                        args.request_timeout_s)
    print(f"overload: {overload.report()} in {overload_s:.0f} s", flush=True)
    values = await _idle(base)
    rss_after = rss_bytes(pid)
    after = None if simulated else await _greedy(base, model)
    pages = int(values.get("scalellm_kv_cache_pages_in_use", -1))
    growth = rss_after / rss_before - 1
    identical = None if simulated else before == after
    checks = {"no_5xx": main.report()["5xx"] + overload.report()["5xx"] == 0,
              "none_hung": main.hung + overload.hung == 0, "no_pages_held": pages == 0,
              "rss_growth_within_limit": growth <= args.max_rss_growth,
              "greedy_identical": identical}
    return {"soak": {**main.report(), "seconds": round(main_s, 1)},
            "overload": {**overload.report(), "seconds": round(overload_s, 1),
                         "concurrency": args.concurrency * args.overload_factor},
            "kv_pages_in_use_after": pages,
            # n > 1 and the shared chat template make prefix-cache hits; their pages must come back too
            "prefix_cache_hits": int(values.get("scalellm_prefix_cache_hits_total", 0)),
            "still_running_or_waiting_after": values.get("scalellm_num_requests_running", 0)
            + values.get("scalellm_num_requests_waiting", 0),
            "rss_bytes": {"before": rss_before, "after": rss_after, "growth": round(growth, 4)},
            "greedy": {"prompts": len(GREEDY_PROMPTS), "identical": identical,
                       "note": "not applicable on a simulated device: its tokens are random" if simulated else None},
            "checks": checks, "targets_met": all(v is not False for v in checks.values())}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=96)
    parser.add_argument("--disconnect-fraction", type=float, default=0.3)
    parser.add_argument("--warmup-requests", type=int, default=500, help="the same mix before the RSS baseline")
    parser.add_argument("--overload-factor", type=int, default=10, help="overload concurrency = this x --concurrency")
    parser.add_argument("--overload-requests", type=int, default=None,
                        help="requests sent in the overload phase (default: 2 x its concurrency)")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="a request with no answer by then "
                        "is counted as hung")
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--model", default=None, help="a checkpoint folder or preset (default: the demo model)")
    parser.add_argument("--server-args", default="", help="extra server flags (default queue: --max-queued-requests "
                        f"{MAX_N} x --concurrency)")
    parser.add_argument("--dataset", type=pathlib.Path, default=ALPACA_EVAL, help="prompts (instruction rows); "
                        "a few built-in prompts when the file is missing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.warmup_requests < 0:
        parser.error("--warmup-requests must be >= 0")
    for name in ("requests", "concurrency", "overload_factor"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.disconnect_fraction <= 1:
        parser.error("--disconnect-fraction must be in [0, 1]")
    if args.overload_requests is None:
        args.overload_requests = 2 * args.concurrency * args.overload_factor
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    extra = shlex.split(args.server_args)
    if "--max-queued-requests" not in extra:
        extra += ["--max-queued-requests", str(MAX_N * args.concurrency)]
    simulated = "--simulate-device" in extra
    model, options = (args.model, {}) if args.model else DEMO
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = pathlib.Path(tempfile.gettempdir()) / f"scalellm-soak-{stamp}.log"
    process, base, command = start_server(model, "float32" if not simulated else "bfloat16", options, log,
                                          extra_args=extra)
    try:
        result = asyncio.run(soak(args, base, process.pid, "bench", simulated))
    finally:
        stop_server(process)
    result = {"benchmark": "soak", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "git": git_state(), "command": "python -m benchmarks.soak " + shlex.join(raw),
              "server": {"command": command, "log": str(log), "simulated": simulated},
              "settings": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
                           if k != "out"}, **result}
    out = args.out or output_dir() / f"soak-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("kv_pages_in_use_after", "rss_bytes", "greedy", "checks")}, indent=1))
    print(f"wrote {out}")
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
