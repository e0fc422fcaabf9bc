"""The offline API: ``LLM(model=...)`` and ``llm.generate`` against Hugging Face and the research API."""

from __future__ import annotations

import numpy as np
import pytest

import scalellm_jax
from scalellm_jax import LLM, SamplingParams
from tests.torch_reference import require_torch

SMALL = dict(page_size=4, num_pages=96, max_num_seqs=4, max_num_batched_tokens=16)


def test_greedy_llm_generate_equals_transformers(make_hf_mixtral):
    torch = require_torch()

    folder, hf = make_hf_mixtral(sliding_window=6)
    llm = LLM(str(folder), dtype="float32", **SMALL)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, hf.config.vocab_size, n).tolist() for n in (2, 11, 5, 19, 1)]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=12, temperature=0.0,
                                                                                  ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected
        assert out.prompt_token_ids == prompt and out.finish_reason == "length"


def test_prompt_and_top_logprobs_equal_transformers_log_softmax(make_hf_mixtral):
    """Prompt logprobs over a chunked prefill (16-token steps) and the sampled tokens' alternatives, against
    Hugging Face's log-softmax of its own logits for the same checkpoint."""
    torch = require_torch()

    folder, hf = make_hf_mixtral(sliding_window=6)
    llm = LLM(str(folder), dtype="float32", **SMALL)
    prompt = np.random.default_rng().integers(3, hf.config.vocab_size, 37).tolist()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5,
                            prompt_logprobs=5)
    [out] = llm.generate(prompt_token_ids=[prompt], sampling_params=params)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    assert out.prompt_logprobs[0] is None
    for q in range(1, len(prompt)):
        lp, alternatives = out.prompt_logprobs[q]
        assert abs(lp - logp[q - 1, prompt[q]]) < 1e-4
        assert [t for t, _ in alternatives] == np.argsort(-logp[q - 1])[:5].tolist()
        np.testing.assert_allclose([v for _, v in alternatives], np.sort(logp[q - 1])[::-1][:5], atol=1e-4)
    for i, alternatives in enumerate(out.top_logprobs):
        row = logp[len(prompt) - 1 + i]
        assert [t for t, _ in alternatives] == np.argsort(-row)[:5].tolist()
        np.testing.assert_allclose(out.logprobs[i], row[out.token_ids[i]], atol=1e-4)


@pytest.fixture(scope="module")
def tiny_llm():
    return LLM("tiny", dtype="float32", **SMALL)


def test_text_prompts_and_stop_strings(tiny_llm):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    [free] = tiny_llm.generate("Hello there", params)
    assert free.text == tiny_llm.tokenizer.decode(free.token_ids) and len(free.token_ids) == 10
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    params = SamplingParams(max_tokens=10, temperature=0.0, stop=[stop], ignore_eos=True)
    [stopped] = tiny_llm.generate("Hello there", params)
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]


def test_outputs_keep_input_order_and_per_prompt_params(tiny_llm):
    prompts = ["a b c", "The quick brown fox jumps over the lazy dog again and again", "x"]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 1, 6)]
    outs = tiny_llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [3, 1, 6]
    ids = [tiny_llm.tokenizer.encode(p) for p in prompts]
    assert [o.token_ids for o in outs] == [
        scalellm_jax.generate(tiny_llm.model, [i], n)[0] for i, n in zip(ids, (3, 1, 6), strict=True)
    ]


def test_a_bad_prompt_rejects_the_call_without_leaving_requests_behind(tiny_llm):
    with pytest.raises(ValueError, match="prompt 1: prompt_token_ids"):
        tiny_llm.generate(prompt_token_ids=[[1, 2], [], [3]])
    assert not tiny_llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="exactly one of"):
        tiny_llm.generate()
