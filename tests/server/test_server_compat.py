"""What third-party clients send by default: neutral values of fields we do not implement, unknown fields,
guidellm's continuous usage, stop token ids, vLLM's /tokenize and /detokenize, /version, a model by id, CORS."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest
from server_helpers import MODEL, call

from scalellm_jax.server import app as app_module

# LangChain's ``OpenAI`` (completions) default body
LANGCHAIN_COMPLETION = {"model": MODEL, "prompt": ["Hello"], "temperature": 0.7, "top_p": 1, "frequency_penalty": 0,
                        "presence_penalty": 0, "n": 1, "logit_bias": {}, "max_tokens": 4, "seed": None,
                        "logprobs": None, "best_of": 1, "stream": False}
# ``ChatOpenAI`` and chat UIs: neutral tool and format fields, platform-only fields
CHAT_DEFAULTS = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": False,
                 "n": 1, "temperature": 0.7, "top_p": 0.95, "tools": None, "tool_choice": "none",
                 "response_format": {"type": "text"}, "parallel_tool_calls": False, "store": False,
                 "metadata": {"app": "x"}, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                 "logit_bias": None, "echo": False, "skip_special_tokens": True, "stop_token_ids": []}


def test_client_defaults_with_neutral_values_are_served(server):
    status, _, body = call(server.url + "/v1/completions", LANGCHAIN_COMPLETION)
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    status, _, body = call(server.url + "/v1/chat/completions", CHAT_DEFAULTS)
    assert status == 200, body


def test_unknown_fields_are_ignored_with_one_warning_per_name(server, caplog, monkeypatch):
    monkeypatch.setattr(app_module, "_UNKNOWN_FIELDS", app_module._OncePerName(limit=3))
    with caplog.at_level(logging.WARNING, logger=app_module.logger.name):
        for extra in ({"x_custom": 1}, {"x_custom": 2, "another": "a"}, {"x1": 0, "x2": 0, "x3": 0, "x4": 0}):
            status, _, body = call(server.url + "/v1/completions", {**LANGCHAIN_COMPLETION, **extra})
            assert status == 200, body
    lines = [r.getMessage() for r in caplog.records if r.name == app_module.logger.name]
    assert sum("'x_custom'" in line for line in lines) == 1 and sum("'another'" in line for line in lines) == 1
    assert len(lines) == 4 and "no more are logged" in lines[-1]  # a bounded set: made-up names cannot flood


def test_best_of_equal_to_n_is_neutral(server):
    assert call(server.url + "/v1/completions", {**LANGCHAIN_COMPLETION, "n": 2, "best_of": 2})[0] == 200
    status, _, body = call(server.url + "/v1/completions", {**LANGCHAIN_COMPLETION, "n": 2, "best_of": 3})
    assert status == 400 and body["error"]["param"] == "best_of"


def _events(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = response.read().decode().split("\n\n")
    assert lines[-2] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-2]]


def test_guidellm_stream_with_continuous_usage_stats(server):
    body = {"model": MODEL, "prompt": "Count", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _events(server.url + "/v1/completions", body)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    prompt = last["usage"]["prompt_tokens"]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == prompt and c["usage"]["total_tokens"] == prompt + n
               for c, n in zip(chunks, counts, strict=True))
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    # without include_usage (as vLLM): no usage at all
    body["stream_options"] = {"continuous_usage_stats": True}
    assert all(e["usage"] is None for e in _events(server.url + "/v1/completions", body) if "usage" in e)


def test_stop_token_ids_end_the_choice(server):
    body = {"model": MODEL, "prompt": [1, 330, 1000], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    ids = call(server.url + "/tokenize", {"prompt": call(server.url + "/v1/completions", body)[2]["choices"][0]
                                          ["text"], "add_special_tokens": False})[2]["tokens"]
    status, _, out = call(server.url + "/v1/completions", {**body, "stop_token_ids": [ids[2]], "logprobs": 0})
    assert status == 200 and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] <= 3


def test_tokenize_and_detokenize_as_vllm(server, served):
    tokenizer = served.tokenizer
    status, _, body = call(server.url + "/tokenize", {"model": MODEL, "prompt": "Hello world",
                                                      "return_token_strs": True})
    assert status == 200 and body["tokens"] == tokenizer.encode("Hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == served.max_model_len
    assert body["token_strs"] == [tokenizer.decode([t]) for t in body["tokens"]]
    no_bos = call(server.url + "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})[2]
    assert no_bos["tokens"] == tokenizer.encode("Hello world", add_bos=False) and no_bos["token_strs"] is None
    messages = [{"role": "user", "content": "Hi there"}]
    chat = call(server.url + "/tokenize", {"messages": messages})[2]
    assert chat["tokens"] == tokenizer.apply_chat_template(messages)
    status, _, body = call(server.url + "/detokenize", {"model": MODEL, "tokens": no_bos["tokens"]})
    assert status == 200 and body == {"prompt": "Hello world"}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}, "model"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
    ("/detokenize", {}, "tokens"),
])
def test_tokenize_errors_name_the_field(server, path, body, param):
    status, _, out = call(server.url + path, body)
    assert status == 400 and out["error"]["param"] == param, out


def test_version_and_model_by_id(server):
    status, _, body = call(server.url + "/version")
    assert status == 200 and isinstance(body["version"], str) and body["version"]
    status, _, body = call(server.url + f"/v1/models/{MODEL}")
    assert status == 200 and body["id"] == MODEL and body["object"] == "model"
    status, _, body = call(server.url + "/v1/models/gpt-4")
    assert status == 404 and body["error"]["param"] == "model"
    status, _, body = call(server.url + "/tokenizer_info")  # what lm-eval's remote tokenizer reads first
    assert status == 200 and body["model_max_length"] > 0 and body["eos_token"] is None


ORIGIN = "https://app.example.com"


def _preflight(url: str, origin: str, headers: str = "authorization,content-type"):
    return call(url, method="OPTIONS", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": headers})


def test_cors_is_off_unless_asked(server):
    status, head, _ = call(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and "Access-Control-Allow-Origin" not in head
    assert _preflight(server.url + "/v1/completions", ORIGIN)[0] == 405


def test_cors_for_allowed_origins_with_an_api_key(make_server):
    running = make_server(allowed_origins=(ORIGIN,), api_key="sk-test")
    url = running.url + "/v1/chat/completions"
    status, head, _ = _preflight(url, ORIGIN)
    assert status == 200 and head["Access-Control-Allow-Origin"] == ORIGIN  # no credentials needed to preflight
    assert "POST" in head["Access-Control-Allow-Methods"]
    assert "authorization" in head["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Credentials" not in head
    assert _preflight(url, "https://evil.example.com")[0] == 403
    for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme's name is case-insensitive
        status, head, body = call(url, {**CHAT_DEFAULTS, "max_tokens": 1},
                                  headers={"Origin": ORIGIN, "Authorization": f"{scheme} sk-test"})
        assert status == 200 and head["Access-Control-Allow-Origin"] == ORIGIN, body
    status, head, _ = call(url, CHAT_DEFAULTS, headers={"Origin": ORIGIN, "Authorization": "Basic sk-test"})
    assert status == 401 and head["Access-Control-Allow-Origin"] == ORIGIN  # the browser app can read the error
    assert call(running.url + "/tokenize", {"prompt": "x"})[0] == 401


def test_cors_with_credentials_echoes_the_origin(make_server):
    running = make_server(allowed_origins=("*",), allow_credentials=True)
    status, head, _ = call(running.url + "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and head["Access-Control-Allow-Origin"] == ORIGIN  # never "*" with credentials
    assert head["Access-Control-Allow-Credentials"] == "true"
