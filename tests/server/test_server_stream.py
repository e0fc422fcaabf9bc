"""Raw Server-Sent Events, and client disconnects: streaming or not, they free the request's KV pages."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
from server_helpers import MODEL, kv_pages_in_use, metric, wait_until

from scalellm_jax.server import protocol


async def _events(response: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing (one data line, blank line after)."""
    body = (await response.read()).decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def _post(url: str, body: dict):
    async def go():
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
            return response.status, response.headers, await _events(response)

    return asyncio.run(go())


def test_chat_stream_is_well_formed_sse(server):
    status, headers, events = _post(server.url + "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Grüße 👋"}], "max_tokens": 6, "n": 2, "seed": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [protocol.ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert len({c.id for c in chunks}) == 1
    *content, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    for index in (0, 1):
        mine = [c.choices[0] for c in content if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and all(c.delta.role is None for c in mine[1:])
        assert mine[-1].finish_reason == "length" and all(c.finish_reason is None for c in mine[:-1])
        assert sum(len(c.logprobs.content) for c in mine) == 6


def test_completion_stream_without_usage(server):
    status, _, events = _post(server.url + "/v1/completions", {
        "model": MODEL, "prompt": [1, 415, 5565], "max_tokens": 3, "ignore_eos": True, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert [protocol.CompletionResponse.model_validate(c).object for c in chunks] == ["text_completion"] * len(chunks)


def test_200_streaming_clients_with_random_disconnects_leave_no_kv_pages(server, served):
    rng = random.Random(7)
    plans = [(rng.randint(1, 6), rng.choice([None, 0, 1, 2])) for _ in range(200)]  # (max_tokens, leave after)

    async def client(session, max_tokens, leave_after):
        body = {"model": MODEL, "prompt": f"Story {max_tokens}", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}
        async with session.post(server.url + "/v1/completions", json=body) as response:
            assert response.status == 200
            lines = 0
            async for line in response.content:
                if line.startswith(b"data: "):
                    lines += 1
                    if leave_after is not None and lines > leave_after:
                        response.close()  # hang up mid-stream
                        return None
            return lines

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*(client(session, n, k) for n, k in plans))

    results = asyncio.run(main())
    for (max_tokens, leave_after), lines in zip(plans, results, strict=True):
        if leave_after is None or leave_after >= max_tokens + 1:
            assert lines is not None and lines >= 2  # text chunk(s) + [DONE]
    wait_until(lambda: kv_pages_in_use(served) == 0 and not served.engine.engine.has_unfinished())
    served.engine.engine.kv.check_invariants()


def test_non_streaming_disconnect_aborts_the_request(server, served):
    finished = metric(server.url, "scalellm_requests_finished_total", finish_reason="length")
    generated = metric(server.url, "scalellm_generation_tokens_total")

    async def main():
        body = {"model": MODEL, "prompt": "Long", "max_tokens": 60, "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(session.post(server.url + "/v1/completions", json=body))
            while served.engine.stats.num_running == 0:  # the engine has the request: hang up
                await asyncio.sleep(0.005)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    wait_until(lambda: kv_pages_in_use(served) == 0 and not served.engine.engine.has_unfinished(), timeout=10)
    # aborted, not run to its 60 tokens
    assert metric(server.url, "scalellm_requests_finished_total", finish_reason="length") == finished
    assert metric(server.url, "scalellm_generation_tokens_total") - generated < 60
