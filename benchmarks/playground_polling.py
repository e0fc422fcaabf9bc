"""Does an open playground slow serving? The HTTP overhead load with and without pages polling ``/state``.

    python -m benchmarks.playground_polling [--pages 1,10] [--concurrency 64] [--num-prompts 256] [--repeats 3]

One server on the simulated H200 (``--simulate-device h200 --model mixtral-8x7b``, as ``benchmarks.http_floor``
runs it: the model takes no CPU, so whatever the polling costs shows in the event loop and in the tokens'
timing), the AlpacaEval prompts and answer lengths at 64 streams, measured as several targets that alternate
over repeats: no page open, then N pages open, each polling ``/state`` at the page's own interval (read from
``playground.js``, one poll after the previous one answered, as the page's timer does) for as long as the
load runs. Reported per polling target, paired with the no-page run of the same repeat: the tokens/s ratio,
the added TTFT p50 and ITL p99, and the server event loop's CPU per token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import re
import shlex
import statistics
import sys
import tempfile

from benchmarks.provenance import git_state, output_dir
from benchmarks.serving import (
    SIMULATED_ENGINE,
    HTTPTarget,
    http_request,
    load_workload,
    measure,
    positive_ints,
    start_server,
    stop_server,
)
from benchmarks.workload_files import ALPACA_EVAL
from scalellm_jax.server.playground import STATIC


def page_interval_s() -> float:
    """The live panel's polling interval, as the page has it."""
    found = re.search(r"const STATE_INTERVAL_MS = (\d+);", (STATIC / "playground.js").read_text())
    if found is None:
        raise RuntimeError("playground.js no longer declares STATE_INTERVAL_MS")
    return int(found.group(1)) / 1e3


class PollingTarget(HTTPTarget):
    """The server while ``pages`` playground tabs poll ``/state``: the polling runs exactly while this target's
    load runs (from its first request in flight to its last), so other targets' runs see none of it."""

    def __init__(self, url: str, pid: int, pages: int, interval_s: float):
        super().__init__(url, pid=pid)
        self.name = "no page" if pages == 0 else f"{pages} page{'s' if pages > 1 else ''} polling"
        self.pages, self.interval_s = pages, interval_s
        self.polls = 0
        self._in_flight = 0
        self._tabs: list[asyncio.Task] = []

    async def _tab(self, offset_s: float) -> None:
        await asyncio.sleep(offset_s)  # tabs opened at different moments
        while True:
            async with self.session.get(self.url + "/state") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"/state answered {response.status}")
            self.polls += 1
            await asyncio.sleep(self.interval_s)

    def send(self, work):
        return self._send(work)

    async def _send(self, work):
        if self._in_flight == 0 and self.pages:
            self._tabs = [asyncio.create_task(self._tab(self.interval_s * i / self.pages)) for i in range(self.pages)]
        self._in_flight += 1
        try:
            return await http_request(self.session, self.url, self.model, work)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                for tab in self._tabs:
                    tab.cancel()
                self._tabs = []


def _paired(runs: list[dict], target: str, key) -> list[float]:
    """``key(target's summary, no page's summary)`` for each repeat that has both."""
    by = {(r["target"], r["repeat"]): r["summary"] for r in runs}
    return [key(by[target, rep], by["no page", rep]) for (name, rep) in sorted(by)
            if name == target and ("no page", rep) in by]


def report(runs: list[dict], targets: list[PollingTarget], seconds: dict[str, float]) -> dict:
    out = {}
    for target in targets:
        if target.pages == 0:
            continue
        ratio = _paired(runs, target.name, lambda p, n: p["output_tokens_per_s"] / n["output_tokens_per_s"])
        ttft = _paired(runs, target.name, lambda p, n: p["ttft_ms"]["p50"] - n["ttft_ms"]["p50"])
        itl = _paired(runs, target.name, lambda p, n: p["itl_ms"]["p99"] - n["itl_ms"]["p99"])
        loop = _paired(runs, target.name, lambda p, n: (p["event_loop_cpu_us_per_token"],
                                                        n["event_loop_cpu_us_per_token"]))
        out[target.name] = {
            "pages": target.pages, "polls": target.polls, "polls_per_s": target.polls / seconds[target.name],
            "throughput_ratio": statistics.median(ratio), "paired_throughput_ratios": ratio,
            "ttft_p50_added_ms": statistics.median(ttft), "paired_ttft_p50_added_ms": ttft,
            "itl_p99_added_ms": statistics.median(itl), "paired_itl_p99_added_ms": itl,
            "event_loop_cpu_us_per_token": {"polling": [p for p, _ in loop], "no page": [n for _, n in loop]},
        }
    return out


async def _run(args, work, url: str, pid: int) -> tuple[list[dict], list[PollingTarget], dict[str, float]]:
    targets = [PollingTarget(url, pid, pages, args.interval_s) for pages in [0, *args.pages]]
    for target in targets:
        await target.__aenter__()
    try:
        runs = await measure(targets, work, args)
    finally:
        for target in targets:
            await target.__aexit__(None, None, None)
    seconds = {t.name: sum(r["summary"]["duration_s"] for r in runs if r["target"] == t.name) for t in targets}
    return runs, targets, seconds


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.playground_polling",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=positive_ints, default=[1, 10], help="open pages of each polling target")
    parser.add_argument("--interval-ms", type=float, default=None, help="poll interval (default: the page's)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dataset", type=pathlib.Path, default=ALPACA_EVAL)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(raw)
    if not args.dataset.is_file():
        print(f"error: --dataset: {args.dataset} not found", file=sys.stderr)
        return 2
    if args.interval_ms is not None and args.interval_ms <= 0:
        print("error: --interval-ms must be > 0", file=sys.stderr)
        return 2
    args.interval_s = page_interval_s() if args.interval_ms is None else args.interval_ms / 1e3
    # what ``measure`` reads besides the load levels
    args.concurrency, args.request_rate, args.slo_ttft_ms, args.slo_tpot_ms = [args.concurrency], None, 1e9, 1e9
    work = load_workload(args.dataset, args.num_prompts, None, SIMULATED_ENGINE["max_model_len"] // 2)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = pathlib.Path(tempfile.gettempdir()) / f"scalellm-playground-polling-{stamp}.log"
    server, url, command = start_server("mixtral-8x7b", "bfloat16", SIMULATED_ENGINE, log,
                                        extra_args=["--simulate-device", "h200"])
    try:
        runs, targets, seconds = asyncio.run(_run(args, work, url, server.pid))
    finally:
        stop_server(server)
    figures = report(runs, targets, seconds)
    result = {"benchmark": "playground_polling",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git": git_state(),
              "command": "python -m benchmarks.playground_polling " + shlex.join(raw), "host_cpus": os.cpu_count(),
              "server": {"command": command, "device": "SIMULATED h200"}, "poll_interval_s": args.interval_s,
              "report": figures, "runs": runs}
    out = args.out or output_dir() / f"playground_polling-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, f in figures.items():
        print(f"{name}: {f['polls_per_s']:.1f} polls/s, tok/s ratio {f['throughput_ratio']:.3f} "
              f"(pairs {', '.join(f'{r:.3f}' for r in f['paired_throughput_ratios'])}), "
              f"TTFT p50 {f['ttft_p50_added_ms']:+.2f} ms, ITL p99 {f['itl_p99_added_ms']:+.2f} ms, "
              f"event loop us/token {f['event_loop_cpu_us_per_token']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
