"""LangChain's ``OpenAI`` (completions) and ``ChatOpenAI`` against the server with their default parameters
(only ``base_url``, ``api_key`` and ``model`` set): invoke and stream, offline.

``OpenAI``'s default body carries OpenAI's fields at neutral values (``frequency_penalty: 0``,
``presence_penalty: 0``, ``logprobs: null``, ``seed: null``, ``n: 1``) and ``max_tokens: 256``, more than the test
context (the server cuts it to what fits); ``ChatOpenAI`` sends little beyond the messages, and ``stream_options``
with ``stream_usage``. Each body is recorded as the server parsed it. No call may need tiktoken, which would
download its encodings.
"""

from __future__ import annotations

import pytest
from server_helpers import MODEL

from scalellm_jax.server import app as app_module

langchain_openai = pytest.importorskip("langchain_openai")
tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(autouse=True)
def no_tiktoken_download(monkeypatch):
    """tiktoken downloads an encoding on first use (no network here, nor for many users): fail instead."""
    def refuse(*args, **kwargs):
        raise AssertionError("tiktoken would download an encoding")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken, "encoding_for_model", refuse)


@pytest.fixture
def bodies(monkeypatch):
    """The generation request bodies the server parsed during the test, as sent (fields left out stay out)."""
    seen = []
    parse = app_module._parse

    async def recording(request, schema):
        req = await parse(request, schema)
        seen.append({**req.model_dump(exclude_unset=True, mode="json"), **(req.model_extra or {})})
        return req

    monkeypatch.setattr(app_module, "_parse", recording)
    return seen


def _client_args(server) -> dict:
    return dict(base_url=server.url + "/v1", api_key="unused", model=MODEL)


def test_completions_llm_invoke_and_stream(server, bodies):
    llm = langchain_openai.OpenAI(**_client_args(server))
    text = llm.invoke("Once upon a time")
    chunks = list(llm.stream("Once upon a time"))
    assert isinstance(text, str) and text
    assert chunks and "".join(chunks)
    whole, streamed = bodies
    # the defaults as LangChain sends them, all served (max_tokens 256 is cut to the 64-token context)
    assert whole["prompt"] == ["Once upon a time"] and whole["max_tokens"] == 256
    for name, value in {"temperature": 0.7, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0, "n": 1,
                        "seed": None, "logprobs": None}.items():
        assert whole[name] == value, name
    assert streamed["stream"] is True and streamed["prompt"] == "Once upon a time"  # streamed: one prompt
    assert {k: v for k, v in streamed.items() if k not in ("stream", "prompt")} == {
        k: v for k, v in whole.items() if k not in ("stream", "prompt")}


def test_chat_model_invoke_and_stream(server, bodies):
    chat = langchain_openai.ChatOpenAI(**_client_args(server))
    message = chat.invoke("Hello!")
    assert isinstance(message.content, str) and message.content
    chunks = list(chat.stream([("system", "Be brief."), ("human", "Hello!")]))
    assert "".join(c.content for c in chunks)
    whole, streamed = bodies
    assert whole["model"] == MODEL and whole["messages"] == [{"role": "user", "content": "Hello!"}]
    assert streamed["stream"] is True and [m["role"] for m in streamed["messages"]] == ["system", "user"]


def test_chat_model_stream_usage(server, bodies):
    chat = langchain_openai.ChatOpenAI(**_client_args(server), stream_usage=True)
    chunks = list(chat.stream("Hello!"))
    assert "".join(c.content for c in chunks)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] > 0 and usage[-1]["input_tokens"] > 0
    assert bodies[0]["stream_options"] == {"include_usage": True}


def test_chat_model_with_openai_sampling_fields(server, bodies):
    # what a LangChain user sets for less repetition, served rather than refused
    chat = langchain_openai.ChatOpenAI(**_client_args(server), max_tokens=8, temperature=0, frequency_penalty=0.5,
                                       presence_penalty=0.5, logit_bias={"2": -100}, seed=3, n=1)
    assert chat.invoke("Hello!").content
    [body] = bodies
    assert body["frequency_penalty"] == 0.5 and body["logit_bias"] == {"2": -100} and body["seed"] == 3
