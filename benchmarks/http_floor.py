"""The HTTP floor: what aiohttp, uvloop and the kernel cost per streamed token on this host, beside our server.

    python -m benchmarks.http_floor [--concurrency 64] [--num-prompts 256] [--repeats 2] [--step-ms 32]

The floor server streams OpenAI-shaped completion chunks of a fixed size from the same stack as ours
(aiohttp on uvloop, one ``StreamResponse`` per request, outputs handed from a thread to the event loop
with one ``call_soon_threadsafe`` per step, as ``AsyncEngine`` does), but with none of our per-token
work: no engine, detokenizer, metrics or chunk encoding. Its tokens come every ``--step-ms``, as a
simulated H200's would. Our server runs on the simulated H200 (``--simulate-device h200 --model
mixtral-8x7b``), and the same load client drives both, alternating, with the AlpacaEval prompts and
answer lengths. The event loop's CPU per token of each says how much of ours is the stack itself,
which no change to our code can remove, and how much is ours.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.provenance import git_state, output_dir
from benchmarks.serving import (
    SIMULATED_ENGINE,
    HTTPTarget,
    load_workload,
    measure,
    start_server,
    stop_server,
    wait_ready,
)
from benchmarks.workload_files import ALPACA_EVAL

CHUNK = (b'data: {"id":"cmpl-00000000000000000000000000000000","object":"text_completion","created":1,'
         b'"model":"floor","choices":[{"index":0,"text":" word","logprobs":null,"finish_reason":null}]}\n\n')


def serve(port: int, step_s: float) -> None:
    """The floor server (``--serve``): runs until killed."""
    import uvloop
    from aiohttp import web

    streams: dict[object, asyncio.Queue] = {}
    lock = threading.Lock()
    loop = uvloop.new_event_loop()

    def put_all(queues):
        for queue in queues:
            queue.put_nowait(None)

    def steps():  # the engine thread's part: one hand-over per step for every stream
        while True:
            time.sleep(step_s)
            with lock:
                queues = list(streams.values())
            if queues:
                loop.call_soon_threadsafe(put_all, queues)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        queue: asyncio.Queue = asyncio.Queue()
        key = object()
        with lock:
            streams[key] = queue
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(body["max_tokens"]):
                await queue.get()
                await response.write(CHUNK)
        finally:
            with lock:
                del streams[key]
        usage = {"id": "x", "choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        await response.write(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "floor"}]})

    async def health(request):
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    threading.Thread(target=steps, daemon=True).start()
    web.run_app(app, host="127.0.0.1", port=port, loop=loop, access_log=None, print=None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run(args, work, floor_url: str, floor_pid: int, ours_url: str, ours_pid: int) -> list[dict]:
    async with HTTPTarget(floor_url, pid=floor_pid) as floor, HTTPTarget(ours_url, pid=ours_pid) as ours:
        floor.name, ours.name = "floor", "ours"
        return await measure([ours, floor], work, args)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run the floor server only (--port, --step-ms)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--step-ms", type=float, default=32.0, help="the floor's step: about a simulated H200's "
                        "decode step for Mixtral-8x7B at 64 rows")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dataset", type=pathlib.Path, default=ALPACA_EVAL)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(raw)
    if args.serve:
        serve(args.port, args.step_ms / 1e3)
        return 0
    if not args.dataset.is_file():
        print(f"error: --dataset: {args.dataset} not found", file=sys.stderr)
        return 2
    # what ``measure`` reads besides the load levels
    args.concurrency, args.request_rate, args.slo_ttft_ms, args.slo_tpot_ms = [args.concurrency], None, 1e9, 1e9
    work = load_workload(args.dataset, args.num_prompts, None, SIMULATED_ENGINE["max_model_len"] // 2)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    port = args.port or _free_port()
    log = pathlib.Path(tempfile.gettempdir()) / f"scalellm-http-floor-{stamp}.log"
    floor_log = pathlib.Path(tempfile.gettempdir()) / f"scalellm-http-floor-server-{stamp}.log"
    with floor_log.open("w") as output:  # the child keeps its own copy of the file
        floor = subprocess.Popen([sys.executable, "-m", "benchmarks.http_floor", "--serve", "--port", str(port),
                                  "--step-ms", str(args.step_ms)], cwd=pathlib.Path(__file__).parent.parent,
                                 stdout=output, stderr=subprocess.STDOUT)
    ours = None
    try:
        floor_url = f"http://127.0.0.1:{port}"
        if not wait_ready(floor, floor_url, floor_log, time.monotonic() + 60):
            raise RuntimeError("the floor server did not start")
        ours, ours_url, command = start_server("mixtral-8x7b", "bfloat16", SIMULATED_ENGINE, log,
                                               extra_args=["--simulate-device", "h200"])
        runs = asyncio.run(_run(args, work, floor_url, floor.pid, ours_url, ours.pid))
    finally:
        stop_server(floor)
        if ours is not None:
            stop_server(ours)
    loop_us = {name: [r["summary"]["event_loop_cpu_us_per_token"] for r in runs if r["target"] == name]
               for name in ("ours", "floor")}
    result = {"benchmark": "http_floor", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "git": git_state(), "command": "python -m benchmarks.http_floor " + shlex.join(raw),
              "host_cpus": os.cpu_count(), "ours": {"command": command, "device": "SIMULATED h200"},
              "floor": {"step_ms": args.step_ms, "chunk_bytes": len(CHUNK)},
              "event_loop_cpu_us_per_token": loop_us, "runs": runs}
    out = args.out or output_dir() / f"http_floor-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("event loop CPU per token (us):", {k: [round(v, 1) for v in vs] for k, vs in loop_us.items()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
