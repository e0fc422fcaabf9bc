"""Bad requests get OpenAI-style 4xx bodies naming the field; auth, queue limits, loading and engine failures."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from server_helpers import MODEL, call, kv_pages_in_use, metric, wait_until

from scalellm_jax.engine.request import RequestStatus
from scalellm_jax.server.app import STATE

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


def _error(response, status: int, param: str | None):
    code, _, body = response
    assert code == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    if param:
        assert error["message"].startswith(param)
    return error["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, "model"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "3"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_k": 1.5}, "top_k"),
    ("/v1/completions", {**COMPLETION, "seed": -1}, "seed"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ["x"] * 17}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ["x", 3]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ("/v1/completions", {**COMPLETION, "frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {**COMPLETION, "echo": "yes"}, "echo"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"x": 3}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"40000": 3}}, "logit_bias"),  # outside the vocabulary
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {**COMPLETION, "best_of": 2}, "best_of"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 80}, "prompt"),  # longer than the 64-token context
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 500}, "prompt"),  # 2,500 characters: tokenized in the pool
    ("/v1/completions", {**COMPLETION, "prompt": [1, 40000]}, "prompt"),  # outside the vocabulary
    ("/v1/completions", {"prompt": "Hi"}, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 80}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 500}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
])
def test_bad_fields_are_400_naming_the_field(server, path, body, param):
    _error(call(server.url + path, body), 400, param)


def test_a_bad_prompt_in_a_batch_leaves_nothing_running(server, served):
    _error(call(server.url + "/v1/completions", {**COMPLETION, "prompt": ["Hi", "word " * 80], "n": 2}), 400, "prompt")
    wait_until(lambda: not served.engine.engine.has_unfinished() and kv_pages_in_use(served) == 0)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", "{\"model\": \"\u00e9\"".encode()])
def test_malformed_bodies_are_400(server, raw):
    message = _error(call(server.url + "/v1/completions", raw), 400, None)
    assert "JSON" in message


def test_unknown_routes_and_methods_answer_json(server):
    _error(call(server.url + "/v1/embeddings", {}), 404, None)
    _error(call(server.url + "/v1/completions", method="GET"), 405, None)


def test_api_key_guards_v1_only(make_server):
    server = make_server(api_key="sekret")
    _error(call(server.url + "/v1/models"), 401, None)
    _error(call(server.url + "/v1/completions", COMPLETION, headers={"Authorization": "Bearer wrong"}), 401, None)
    ok = call(server.url + "/v1/completions", COMPLETION, headers={"Authorization": "Bearer sekret"})
    assert ok[0] == 200 and ok[2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert call(server.url + "/health")[0] == 200
    assert call(server.url + "/metrics")[0] == 200


def test_full_queue_is_429_with_retry_after(make_server, served):
    server = make_server(max_queued_requests=0)  # room for max_num_seqs (4) engine requests in all
    # more than the server could ever hold: a 400 that says why, not a 429 to retry forever
    message = _error(call(server.url + "/v1/completions", {**COMPLETION, "n": 3, "prompt": ["a", "b"]}), 400, "n")
    assert "6 engine requests" in message and "(4:" in message

    async def main():
        long = {**COMPLETION, "max_tokens": 60, "ignore_eos": True, "stream": True, "n": 2}
        async with aiohttp.ClientSession() as session:
            first = await session.post(server.url + "/v1/completions", json=long)
            second = await session.post(server.url + "/v1/completions", json=long)
            assert (first.status, second.status) == (200, 200)
            async with session.post(server.url + "/v1/completions", json=COMPLETION) as third:
                status, headers, body = third.status, third.headers, await third.json()
            first.close()
            second.close()
            return status, headers, body

    status, headers, body = asyncio.run(main())
    assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"
    wait_until(lambda: kv_pages_in_use(served) == 0)
    assert call(server.url + "/v1/completions", COMPLETION)[0] == 200  # slots are released


def test_health_is_503_while_loading(make_server, served):
    server = make_server(model=None)
    assert call(server.url + "/health")[:3:2] == (503, {"status": "loading"})
    _error(call(server.url + "/v1/completions", COMPLETION), 503, None)
    assert call(server.url + "/metrics")[0] == 200

    async def ready():
        server.app[STATE].ready(served)

    server.call(ready())
    assert call(server.url + "/health")[:3:2] == (200, {"status": "ok"})
    assert call(server.url + "/v1/completions", COMPLETION)[0] == 200


def test_engine_failure_fails_only_that_request(server, served, monkeypatch):
    engine = served.engine.engine
    add = engine.add
    poison = 31999

    def failing_add(request):
        if poison in request.prompt_token_ids:
            raise RuntimeError("injected failure")
        return add(request)

    monkeypatch.setattr(engine, "add", failing_add)

    async def main():
        async with aiohttp.ClientSession() as session:
            async def post(prompt):
                async with session.post(server.url + "/v1/completions", json={**COMPLETION, "prompt": prompt}) as r:
                    return r.status, await r.json()

            return await asyncio.gather(post([1, poison]), post([1, 5, 6]))

    (bad_status, bad), (good_status, good) = asyncio.run(main())
    assert bad_status == 500 and "injected failure" in bad["error"]["message"]
    assert good_status == 200 and good["usage"]["completion_tokens"] == 2


def test_detokenizer_failure_is_a_500_and_the_server_goes_on(server, served, monkeypatch):
    tokenizer = served.engine.engine.tokenizer

    class Broken:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode(self, ids):
            raise UnicodeError("injected decode failure")

    monkeypatch.setattr(served.engine.engine, "tokenizer", Broken())
    message = _error(call(server.url + "/v1/completions", COMPLETION), 500, None)
    assert repr(RequestStatus.FINISHED_ERROR.finish_reason) in message
    monkeypatch.undo()
    assert call(server.url + "/v1/completions", COMPLETION)[0] == 200
    wait_until(lambda: kv_pages_in_use(served) == 0)


def test_metrics_expose_the_documented_names(server):
    assert call(server.url + "/v1/completions", COMPLETION)[0] == 200
    text = call(server.url + "/metrics")[2]
    for name in ("scalellm_time_to_first_token_seconds_bucket", "scalellm_inter_token_latency_seconds_bucket",
                 "scalellm_e2e_request_latency_seconds_bucket", "scalellm_request_queue_time_seconds_bucket",
                 "scalellm_num_requests_running", "scalellm_num_requests_waiting", "scalellm_num_requests_swapped",
                 "scalellm_kv_cache_usage_ratio", "scalellm_kv_cache_pages_in_use", "scalellm_num_preemptions_total",
                 "scalellm_prompt_tokens_total", "scalellm_kv_cache_pages_cached",
                 "scalellm_prefix_cache_queries_total", "scalellm_prefix_cache_hits_total",
                 "scalellm_generation_tokens_total"):
        assert f"\n{name}" in text, name
    for histogram in ("time_to_first_token", "request_queue_time", "e2e_request_latency"):
        assert metric(server.url, f"scalellm_{histogram}_seconds_count") > 0, histogram
    wait_until(lambda: metric(server.url, "scalellm_kv_cache_pages_in_use") == 0)
