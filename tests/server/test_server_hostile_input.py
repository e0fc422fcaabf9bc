"""Input a parser would take silently or a server would answer with a 500: each a clear 4xx naming what is wrong,
with no exception text in any response."""

from __future__ import annotations

import json
import time

from server_helpers import MODEL, call

from scalellm_jax.server.app import STATE

COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
URL = "/v1/completions"


def _error(response, status: int, param: str | None) -> str:
    code, _, body = response
    assert code == status, body
    assert body["error"]["param"] == param, body
    return body["error"]["message"]


def test_a_body_that_does_not_match_its_content_encoding_is_400(server):
    message = _error(call(server.url + URL, json.dumps(COMPLETION).encode(), headers={"Content-Encoding": "gzip"}),
                     400, "body")
    assert "gzip" in message and "Error(" not in message


def test_a_body_that_is_not_json_by_its_content_type_is_415(server):
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        message = _error(call(server.url + URL, COMPLETION, headers={"Content-Type": kind}), 415, "Content-Type")
        assert kind.split(";")[0] in message
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert call(server.url + URL, COMPLETION, headers={"Content-Type": kind})[0] == 200


def test_duplicate_keys_and_non_finite_numbers_are_400_naming_them(server):
    duplicate = b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, "max_tokens": 3}' % MODEL.encode()
    assert '"max_tokens" appears twice' in _error(call(server.url + URL, duplicate), 400, "body")
    nested = b'{"model": "%s", "messages": [{"role": "user", "content": "a", "content": "b"}]}' % MODEL.encode()
    assert '"content" appears twice' in _error(call(server.url + "/v1/chat/completions", nested), 400, "body")
    for constant in ("NaN", "Infinity", "-Infinity"):
        body = b'{"model": "%s", "prompt": "Hi", "temperature": %s}' % (MODEL.encode(), constant.encode())
        assert f"{constant} is not a JSON value" in _error(call(server.url + URL, body), 400, "body")


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server, monkeypatch):
    served = server.app[STATE].served
    calls = []
    encode = served.tokenizer.encode
    monkeypatch.setattr(served.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    huge = "a" * (8 * 2**20)  # 8 MB, far past 64 tokens × the longest piece
    start = time.perf_counter()
    message = _error(call(server.url + URL, {**COMPLETION, "prompt": huge}), 400, "prompt")
    assert time.perf_counter() - start < 5 and not calls
    assert "cannot fit in the model's context of 64 tokens" in message
    chat = {"model": MODEL, "messages": [{"role": "user", "content": huge}]}
    assert "cannot fit" in _error(call(server.url + "/v1/chat/completions", chat), 400, "messages")


def test_a_long_prompt_is_refused_after_tokenizing_only_a_prefix(server, monkeypatch):
    served = server.app[STATE].served
    lengths = []
    encode = served.tokenizer.encode
    monkeypatch.setattr(served.tokenizer, "encode", lambda text, *a, **k: lengths.append(len(text)) or encode(text, *a,
                                                                                                             **k))
    text = "x " * 500  # 1,000 characters: under 64 tokens x the longest piece, over 64 tokens
    message = _error(call(server.url + URL, {**COMPLETION, "prompt": text}), 400, "prompt")
    assert "longer than the model's context of 64 tokens" in message and "characters alone are" in message
    assert lengths and max(lengths) <= 8 * 64  # a prefix, never the whole text
    chat = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    assert "alone are" in _error(call(server.url + "/v1/chat/completions", chat), 400, "messages")
    lengths.clear()
    short = "x " * 10  # under 2 characters per context token: no prefix is measured, the text is tokenized once
    assert call(server.url + URL, {**COMPLETION, "prompt": short, "max_tokens": 1})[0] == 200
    assert lengths == [len(short)]


def test_an_unexpected_error_is_a_500_without_its_text(server, monkeypatch):
    generator = server.app[STATE].generator

    async def broken(req):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(generator, "completion_job", broken)
    message = _error(call(server.url + URL, COMPLETION), 500, None)
    assert "secret" not in message and "RuntimeError" not in message
