"""The official ``openai`` client against the running server: completions and chat, streaming and not."""

from __future__ import annotations

import re

import openai
import pytest
from server_helpers import MODEL

from scalellm_jax.server import generation


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_and_its_stream_agree(client):
    args = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0.7, seed=3,
                ignore_eos=True)
    whole = client.completions.create(**{k: v for k, v in args.items() if k != "ignore_eos"},
                                      extra_body={"ignore_eos": True})
    [choice] = whole.choices
    assert choice.finish_reason == "length" and choice.text
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.completions.create(model=MODEL, prompt=args["prompt"], max_tokens=12, temperature=0.7,
                                            seed=3, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text  # same seed, same tokens
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # one id per response, shared by its chunks, distinct from the other response's: cmpl-<32 hex digits>
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id != whole.id
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", whole.id) and re.fullmatch(r"cmpl-[0-9a-f]{32}", chunks[0].id)


def test_a_repeated_chat_reports_its_cached_prompt_tokens(client, served):
    messages = [{"role": "user", "content": "Tell me, in a few words, why the sky looks blue at noon"}]
    prompt = served.tokenizer.apply_chat_template(messages)
    page_size = served.engine.engine.config.page_size
    usages = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0.0).usage
              for _ in range(2)]
    assert usages[0].prompt_tokens == usages[1].prompt_tokens == len(prompt)
    # the second finds every full page of the prompt cached; the last token is always computed
    assert usages[1].prompt_tokens_details.cached_tokens == (len(prompt) - 1) // page_size * page_size > 0
    assert usages[0].prompt_tokens_details.cached_tokens < usages[1].prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("engine_thread_limit", [0, generation.ENGINE_THREAD_TOKENIZE_MAX_CHARS])
def test_prompts_tokenized_in_the_pool_or_on_the_engine_thread_give_the_same_response(
        client, served, monkeypatch, engine_thread_limit):
    monkeypatch.setattr(generation, "ENGINE_THREAD_TOKENIZE_MAX_CHARS", engine_thread_limit)  # 0: all in the pool
    prompts = ["Hello there", "Grüße 👋", "Hi"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, temperature=0.0,
                                         extra_body={"ignore_eos": True})
    # prompt tokens count once per prompt, not per choice
    assert response.usage.prompt_tokens == sum(len(served.tokenizer.encode(p)) for p in prompts)
    assert response.usage.completion_tokens == 3 * 2 * 3
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0.0, extra_body={"ignore_eos": True})
    expected = served.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.usage.prompt_tokens == len(expected)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1]  # greedy: both choices of a prompt agree
    if engine_thread_limit == 0:
        monkeypatch.undo()  # the engine-thread path must produce the very same text
        again = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, temperature=0.0,
                                          extra_body={"ignore_eos": True})
        assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts


def test_chat_completion_and_its_stream_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=5,
                                           extra_body={"ignore_eos": True})
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 8

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_batches_and_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=3, seed=1, logprobs=0,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12
    for c in out.choices:
        assert len(c.logprobs.token_logprobs) == 3 and all(lp <= 0 for lp in c.logprobs.token_logprobs)
    # choice i uses seed + i: the two choices of one prompt are sampled independently, yet reproducibly
    again = client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=3, seed=1,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          logprobs=True, extra_body={"ignore_eos": True})
    assert [t.logprob <= 0 for t in chat.choices[0].logprobs.content] == [True, True]


def test_stop_string_ends_the_text_before_it(client):
    free = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0, stop=[stop],
                                        stream=stream, extra_body={"ignore_eos": True})
        chunks = list(out) if stream else [out]
        assert "".join(c.choices[0].text for c in chunks) == free[: free.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_client_errors_are_typed(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
