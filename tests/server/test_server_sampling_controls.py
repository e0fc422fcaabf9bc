"""Logit controls and text options through the ``openai`` client: OpenAI's ``presence_penalty``,
``frequency_penalty`` and ``logit_bias``, vLLM's ``repetition_penalty``, ``min_p``, ``min_tokens``,
``include_stop_str_in_output`` and ``skip_special_tokens`` (``extra_body``).

The server's part is checked on the ``SamplingParams`` each engine request receives and on the 400s
for bad values; their effect on the generated tokens and text end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses

import openai
import pytest
from server_helpers import MODEL, call, kv_pages_in_use, wait_until

from scalellm_jax.engine.request import SamplingParams
from scalellm_jax.server import protocol

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a city."}]
CONTROLS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_p", "min_tokens",
            "include_stop_str_in_output", "skip_special_tokens")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@dataclasses.dataclass
class EngineRequest:
    params: SamplingParams
    token_ids: list[int] = dataclasses.field(default_factory=list)


@pytest.fixture
def engine_requests(served, monkeypatch):
    """Every engine request the server makes during the test: its ``SamplingParams`` and output token ids."""
    seen: list[EngineRequest] = []
    add_request = served.engine.add_request

    def recording(prompt, params, **kwargs):
        stream = add_request(prompt, params, **kwargs)  # an immediate refusal raises here, as without us
        seen.append(record := EngineRequest(params))

        async def outputs():
            async with contextlib.aclosing(stream):
                async for delta in stream:  # the server asks for deltas: new tokens only
                    record.token_ids += delta.new_token_ids
                    yield delta
        return outputs()

    monkeypatch.setattr(served.engine, "add_request", recording)
    return seen


def _create(client, chat: bool, **args):
    """One completion (or chat completion) of the shared prompt; vLLM's fields go in ``extra_body``."""
    if chat:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, **args)
    return client.completions.create(model=MODEL, **{"prompt": PROMPT, **args})


def _text(response, chat: bool) -> str:
    choice = response.choices[0]
    return choice.message.content if chat else choice.text


def _controls(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in CONTROLS}


# ------------------------------------------------------------------------------------------ accepted and passed on


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_control_reaches_the_engine(client, engine_requests, chat):
    response = _create(client, chat, max_tokens=6, n=2, seed=1, presence_penalty=0.5, frequency_penalty=-1.25,
                       logit_bias={"5": 3, "1526": -100, "42": 0.5},
                       extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 2,
                                   "include_stop_str_in_output": True, "skip_special_tokens": False})
    assert len(response.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in response.choices)
    expected = dict(presence_penalty=0.5, frequency_penalty=-1.25, repetition_penalty=1.3,
                    logit_bias=((5, 3.0), (42, 0.5), (1526, -100.0)), min_p=0.05, min_tokens=2,
                    include_stop_str_in_output=True, skip_special_tokens=False)
    assert [_controls(r.params) for r in engine_requests] == [expected] * 2  # every choice gets them


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_null_and_neutral_values_are_the_defaults(client, engine_requests, chat):
    neutral = _controls(SamplingParams())
    _create(client, chat, max_tokens=2, presence_penalty=None, frequency_penalty=None, logit_bias=None,
            extra_body={"repetition_penalty": None, "min_p": None})
    _create(client, chat, max_tokens=2, presence_penalty=0, frequency_penalty=0, logit_bias={},
            extra_body={"repetition_penalty": 1, "min_p": 0, "min_tokens": 0, "include_stop_str_in_output": False,
                        "skip_special_tokens": True})
    _create(client, chat, max_tokens=2)  # the openai client sends none of them
    assert [_controls(r.params) for r in engine_requests] == [neutral] * 3


def test_streamed_requests_get_the_controls_too(client, engine_requests):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True,
                                            presence_penalty=1, logit_bias={"7": -2},
                                            extra_body={"min_tokens": 3, "ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    [request] = engine_requests
    assert request.params.presence_penalty == 1 and request.params.logit_bias == ((7, -2.0),)
    assert request.params.min_tokens == 3


def test_the_controls_are_documented_in_openapi(server):
    schemas = call(server.url + "/openapi.json")[2]["components"]["schemas"]
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schemas[request]["properties"]
        for name in CONTROLS:
            assert properties[name]["description"], (request, name)
    assert not set(CONTROLS) & set(protocol.NEUTRAL_ONLY)  # implemented, so no longer neutral-only


# ------------------------------------------------------------------------------------------ refused with a 400


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("args, param", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(logit_bias={"hello": 1}), "logit_bias"),
    (dict(logit_bias={"-1": 1}), "logit_bias"),
    (dict(logit_bias={"1.5": 1}), "logit_bias"),
    (dict(logit_bias={"5": 100.5}), "logit_bias"),
    (dict(logit_bias={"5": -101}), "logit_bias"),
    (dict(logit_bias={"5": "1"}), "logit_bias"),
    (dict(logit_bias={"5": 1, "05": 2}), "logit_bias"),  # the same token twice
    (dict(logit_bias={"32000": 1}), "logit_bias"),  # outside the tiny model's vocabulary
    (dict(logit_bias={"12345678901234567890": 1}), "logit_bias"),
    (dict(logit_bias=[5, 1]), "logit_bias"),
    (dict(extra_body={"min_p": 1.5}), "min_p"),
    (dict(extra_body={"min_p": -0.1}), "min_p"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"repetition_penalty": -1.0}), "repetition_penalty"),
    (dict(extra_body={"min_tokens": -1}), "min_tokens"),
    (dict(extra_body={"min_tokens": 2.0}), "min_tokens"),
    (dict(max_tokens=4, extra_body={"min_tokens": 5}), "min_tokens"),
    (dict(extra_body={"include_stop_str_in_output": "yes"}), "include_stop_str_in_output"),
    (dict(extra_body={"skip_special_tokens": None}), "skip_special_tokens"),
])
def test_bad_values_are_400_naming_the_field(client, served, chat, args, param):
    with pytest.raises(openai.BadRequestError) as caught:
        _create(client, chat, **{"max_tokens": 2, **args})
    assert caught.value.param == param and caught.value.body["message"].startswith(param), caught.value.body
    wait_until(lambda: not served.engine.engine.has_unfinished())


def test_min_tokens_above_max_tokens_says_so(client):
    with pytest.raises(openai.BadRequestError) as caught:  # completions default to 16 tokens, as OpenAI's
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"min_tokens": 17})
    assert caught.value.param == "min_tokens" and "max_tokens=16" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # chat's newer limit counts the same
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                       extra_body={"min_tokens": 4})
    assert caught.value.param == "min_tokens" and "max_tokens=3" in caught.value.body["message"]


# (a text long enough for the tokenizer pool, over 2,048 characters, cannot fit this server's 64-token context
# and is refused for its length before anything else)
@pytest.mark.parametrize("prompt", [PROMPT, [1, 330, 1000]], ids=["tokenized-by-the-engine", "token-ids"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_logit_bias_outside_the_vocabulary_is_400_on_every_path(client, served, prompt, stream):
    # the engine checks the ids: on the event loop for token ids, on the engine thread for a text prompt;
    # either way before the first byte, so a stream is refused with a 400 too
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, n=2, stream=stream,
                                  logit_bias={"3": 1, "40000": 5})
    assert caught.value.param == "logit_bias" and "40000" in caught.value.body["message"]
    wait_until(lambda: not served.engine.engine.has_unfinished() and kv_pages_in_use(served) == 0)


# ------------------------------------------------------------------------------------------ effects


def _greedy(client, engine_requests, chat=False, **args) -> tuple[str, list[int]]:
    """A greedy choice's text and output token ids."""
    start = len(engine_requests)
    response = _create(client, chat, temperature=0, **args)
    [request] = engine_requests[start:]
    return _text(response, chat), request.token_ids


def test_include_stop_str_in_output_keeps_a_stop_token_text(client, engine_requests):
    _, ids = _greedy(client, engine_requests, max_tokens=8, extra_body={"ignore_eos": True})
    stop = dict(max_tokens=8, extra_body={"ignore_eos": True, "stop_token_ids": [ids[3]]})
    without, short = _greedy(client, engine_requests, **stop)
    stop["extra_body"]["include_stop_str_in_output"] = True
    with_stop, same = _greedy(client, engine_requests, **stop)
    assert same == short and short[-1] == ids[3]  # the same tokens, only the text differs
    assert with_stop.startswith(without) and len(with_stop) > len(without)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_include_stop_str_in_output_keeps_the_stop_string(client, engine_requests, chat):
    full, _ = _greedy(client, engine_requests, chat, max_tokens=12, extra_body={"ignore_eos": True})
    start = next(i for i in range(2, len(full) - 3) if full.find(full[i:i + 3]) == i)  # a first occurrence
    stop = full[start:start + 3]
    without, _ = _greedy(client, engine_requests, chat, max_tokens=12, stop=stop, extra_body={"ignore_eos": True})
    with_stop, _ = _greedy(client, engine_requests, chat, max_tokens=12, stop=stop,
                           extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert without == full[:start]
    assert with_stop == full[:start] + stop


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_logit_bias_100_forces_the_token(client, served, engine_requests, chat):
    token = served.tokenizer.encode(" world", add_bos=False)[-1]
    text, ids = _greedy(client, engine_requests, chat, max_tokens=6, logit_bias={str(token): 100},
                        extra_body={"ignore_eos": True})
    assert ids == [token] * 6
    assert text == served.tokenizer.decode([token] * 6)


def test_logit_bias_minus_100_bans_the_greedy_tokens(client, engine_requests):
    _, ids = _greedy(client, engine_requests, max_tokens=6, extra_body={"ignore_eos": True})
    _, banned = _greedy(client, engine_requests, max_tokens=6, logit_bias={str(t): -100 for t in set(ids)},
                        extra_body={"ignore_eos": True})
    assert not set(banned) & set(ids)


def test_min_tokens_holds_back_eos(client, served, engine_requests):
    eos = served.tokenizer.eos_id
    forced = {str(eos): 100}
    _, ids = _greedy(client, engine_requests, max_tokens=8, logit_bias=forced)
    assert ids == [eos]  # the bias alone ends the choice at once
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logit_bias=forced,
                                         extra_body={"min_tokens": 4})
    ids = engine_requests[-1].token_ids
    assert len(ids) == 5 and eos not in ids[:4] and ids[4] == eos
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_strong_presence_penalty_never_repeats_a_greedy_token(client, engine_requests, chat):
    # to the end of the context: the random model repeats itself within it (these prompts) unless penalized
    args = dict(max_tokens=64, extra_body={"ignore_eos": True}, **({} if chat else {"prompt": [1, 330, 1000]}))
    _, plain = _greedy(client, engine_requests, chat, **args)
    _, ids = _greedy(client, engine_requests, chat, presence_penalty=2, **args)
    assert len(set(plain)) < len(plain) and len(ids) == len(plain)
    assert len(set(ids)) == len(ids), ids


def test_min_p_1_samples_only_the_most_likely_token(client, engine_requests):
    _, greedy = _greedy(client, engine_requests, max_tokens=8, extra_body={"ignore_eos": True})
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=7,
                              extra_body={"ignore_eos": True, "min_p": 1})
    assert engine_requests[-1].token_ids == greedy


def test_skip_special_tokens_false_shows_eos(client, served, engine_requests):
    eos = str(served.tokenizer.eos_id)
    shown, ids = _greedy(client, engine_requests, max_tokens=3, logit_bias={eos: 100},
                         extra_body={"ignore_eos": True, "skip_special_tokens": False})
    skipped, _ = _greedy(client, engine_requests, max_tokens=3, logit_bias={eos: 100}, extra_body={"ignore_eos": True})
    assert ids == [served.tokenizer.eos_id] * 3
    assert skipped == "" and shown == "</s>" * 3
