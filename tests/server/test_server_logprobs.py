"""Logprobs as lm-eval, the openai client and vLLM users ask for them: echo with prompt logprobs, the most likely
alternatives per position, vLLM's prompt_logprobs, streamed and not; values checked against one full forward."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import openai
import pytest
from server_helpers import MODEL, call


def _log_softmax(served, token_ids) -> np.ndarray:
    logits = np.asarray(served.engine.engine.model.logits([token_ids]), np.float64)[0]
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_lm_eval_loglikelihood_request(server, served):
    """lm-eval's local-completions scores a continuation with exactly this body, then reads
    token_logprobs[ctxlen:-1] and compares each with max(top_logprobs[i].values()) for is_greedy."""
    context, continuation = [1, 415, 5565, 302], [4088, 349, 264, 1369]
    prompt = context + continuation
    status, _, body = call(server.url + "/v1/completions", {"model": MODEL, "prompt": [prompt], "max_tokens": 1,
                                                            "logprobs": 1, "echo": True, "temperature": 0})
    assert status == 200, body
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    generated = logprobs["tokens"][-1]
    assert len(logprobs["token_logprobs"]) == len(prompt) + 1 and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None and choice["text"].endswith(generated)
    logp = _log_softmax(served, prompt)
    want = [logp[q - 1, prompt[q]] for q in range(1, len(prompt))]
    np.testing.assert_allclose(logprobs["token_logprobs"][1:-1], want, atol=1e-4)
    for q, top in enumerate(logprobs["top_logprobs"][1:-1], 1):  # the best token and the prompt token
        assert abs(max(top.values()) - logp[q - 1].max()) < 1e-4 and len(top) in (1, 2)
    # greedy: the generated token is the most likely, so lm-eval's is_greedy test holds for it exactly
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 1


def test_openai_client_echo_top_logprobs_and_vllm_prompt_logprobs(server, served):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=3,
                                    extra_body={"ignore_eos": True, "prompt_logprobs": 2})
    [choice] = out.choices
    ids = served.tokenizer.encode(prompt)
    assert choice.text.startswith(prompt) and len(choice.logprobs.tokens) == len(ids) + 3
    assert all(len(top) >= 3 for top in choice.logprobs.top_logprobs[len(ids):])
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    logp = _log_softmax(served, ids)
    for q, entry in enumerate(prompt_logprobs[1:], 1):
        assert abs(entry[str(ids[q])]["logprob"] - logp[q - 1, ids[q]]) < 1e-4
        best = [int(t) for t, e in sorted(entry.items(), key=lambda kv: kv[1]["rank"] or 99)][:2]
        assert best == np.argsort(-logp[q - 1])[:2].tolist()

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=4,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 4 for c in content)
    assert all(c.top_logprobs[0].logprob == c.logprob and c.top_logprobs[0].token == c.token for c in content)


@pytest.mark.parametrize("logprobs", [None, 2])
def test_streamed_echo_matches_the_whole_response(server, logprobs):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "echo": True,
            "ignore_eos": True, "logprobs": logprobs}
    whole = call(server.url + "/v1/completions", body)[2]["choices"][0]
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [json.loads(e.removeprefix("data: ")) for e in response.read().decode().split("\n\n")[:-2]]
    choices = [e["choices"][0] for e in events]
    assert "".join(c["text"] for c in choices) == whole["text"] and whole["text"].startswith("Once upon a time")
    if logprobs:
        streamed = [lp for c in choices for lp in c["logprobs"]["token_logprobs"]]
        assert streamed == whole["logprobs"]["token_logprobs"]
        first = choices[0]["logprobs"]["text_offset"]  # the prompt's tokens and the first output token
        assert first == whole["logprobs"]["text_offset"][:len(first)]
        offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
        assert offsets == sorted(offsets) and len(offsets) == len(streamed)
