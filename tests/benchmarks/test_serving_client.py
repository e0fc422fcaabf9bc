"""``benchmarks.serving``: the load client's statistics and a short run against a scripted SSE server."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from benchmarks import serving as bench
from scalellm_jax.server.background import BackgroundServer

TOKENS_PER_REQUEST = 3


def test_summary_statistics():
    results = [bench.Result(ok=True, latency=0.5, ttft=0.1, chunk_times=[0.1, 0.3, 0.5], output_tokens=3),
               bench.Result(ok=True, latency=1.1, ttft=0.3, chunk_times=[0.3, 1.1], output_tokens=5),
               bench.Result(ok=False, error="HTTP 500")]
    s = bench.summarize(results, duration=2.0, slo_ttft_ms=200, slo_tpot_ms=1000)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (2, 1, 8)
    assert s["request_throughput"] == 1.0 and s["output_tokens_per_s"] == 4.0
    assert s["goodput_requests_per_s"] == 0.5  # only the first meets TTFT <= 200 ms
    assert s["tpot_ms"]["mean"] == pytest.approx(1e3 * (0.2 + 0.2) / 2)  # (0.5-0.1)/2 and (1.1-0.3)/4
    assert s["itl_ms"]["p99"] == pytest.approx(800) and s["ttft_ms"]["p50"] == pytest.approx(100)
    assert s["errors"] == ["HTTP 500"]


async def _scripted_completion(request: web.Request) -> web.StreamResponse:
    """An OpenAI-style stream: one chunk per token, then the usage chunk and [DONE]."""
    body = await request.json()
    assert body["stream"] and body["ignore_eos"] and body["stream_options"] == {"include_usage": True}
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(TOKENS_PER_REQUEST):
        await asyncio.sleep(0.002)
        chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    usage = {"choices": [], "usage": {"completion_tokens": TOKENS_PER_REQUEST}}
    await response.write(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n")
    return response


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": "scripted"}]})


@pytest.fixture(scope="module")
def scripted_server():
    app = web.Application()
    app.router.add_post("/v1/completions", _scripted_completion)
    app.router.add_get("/v1/models", _models)
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"Question {i}?", "output": "A short answer."} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_concurrency_sweep_writes_json_and_plot(scripted_server, dataset, tmp_path):
    out = tmp_path / "serving.json"
    assert bench.main(["--url", scripted_server.url, "--concurrency", "1,4", "--num-prompts", "6",
                       "--dataset", str(dataset), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["server"]["model"] == "scripted" and result["workload"]["num_prompts"] == 6
    assert [(r["target"], r["load"]) for r in result["runs"]] == [("http", 1), ("http", 4)]
    for run in result["runs"]:
        s = run["summary"]
        assert s["completed"] == 6 and s["failed"] == 0 and s["output_tokens"] == 6 * TOKENS_PER_REQUEST
        assert 0 < s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"] and s["itl_ms"]["mean"] > 0
    if result["plot"]:
        assert out.with_suffix(".png").stat().st_size > 0


def test_request_rate_mode(scripted_server, dataset, tmp_path):
    out = tmp_path / "rate.json"
    assert bench.main(["--url", scripted_server.url, "--request-rate", "200", "--num-prompts", "6", "--no-plot",
                       "--dataset", str(dataset), "--out", str(out)]) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert run["mode"] == "request_rate" and run["summary"]["completed"] == 6


def test_missing_dataset_exits_2(tmp_path, capsys):
    assert bench.main(["--url", "http://127.0.0.1:9", "--concurrency", "1", "--dataset",
                       str(tmp_path / "absent.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: --dataset")


def test_overhead_report_pairs_each_repeats_two_targets():
    def run(target, repeat, tok_s, ttft_ms, loop_us, itl_p99_ms=30.0):
        summary = {"output_tokens_per_s": tok_s, "ttft_ms": {"p50": ttft_ms}, "cpu_us_per_token": 100.0,
                   "event_loop_cpu_us_per_token": loop_us, "itl_ms": {"p99": itl_p99_ms}}
        return {"target": target, "mode": "concurrency", "load": 64, "repeat": repeat, "summary": summary}

    # The machine slows down over the run: per-target medians mix fast and slow repeats, pairs do not.
    runs = [run("in-process", 0, 1000, 40, 10), run("http", 0, 980, 42, 30),
            run("http", 1, 490, 82, 31, 31.5), run("in-process", 1, 500, 80, 11),
            run("in-process", 2, 250, 160, 12), run("http", 2, 240, 170, 32)]
    o = bench.overhead_report(runs)["64"]
    assert o["paired_throughput_ratios"] == pytest.approx([0.98, 0.98, 0.96])
    assert o["throughput_ratio"] == pytest.approx(0.98)
    assert o["paired_ttft_p50_added_ms"] == [2, 2, 10] and o["ttft_p50_added_ms"] == 2
    assert o["paired_itl_p99_added_ms"] == [0, 1.5, 0] and o["itl_p99_added_ms"] == 0
    assert o["targets"] == bench.OVERHEAD_TARGETS[64] and o["meets_target"]
    assert o["event_loop_cpu_us_per_token"] == {"http": 31, "in-process": 11}
    assert o["output_tokens_per_s"] == {"http": 490, "in-process": 500}

    runs[2]["summary"]["ttft_ms"]["p50"] = runs[5]["summary"]["ttft_ms"]["p50"] = 200  # pairs +120 and +40
    assert not bench.overhead_report(runs)["64"]["meets_target"]
    for r in runs:
        r["load"] = 8
    assert bench.overhead_report(runs)["8"]["meets_target"] is None  # no target at this concurrency
