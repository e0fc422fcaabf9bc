"""vLLM's text options through the engine: include_stop_str_in_output (stop token ids and stop strings),
skip_special_tokens and min_tokens with stop strings, on the tiny random model with Mixtral's tokenizer.

Every expected text is computed from the output tokens, so nothing depends on what random weights say.
"""

from __future__ import annotations

import pytest

from scalellm_jax import LLM, SamplingParams

SMALL = dict(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
             swap_space_gb=0.0)
PROMPT = "Hello there"
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", dtype="float32", warmup=False, seed=0, **SMALL)


def greedy(**options) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 10, "temperature": 0.0, "ignore_eos": True, **options})


def generate(llm, params):
    [out] = llm.generate(PROMPT, params)
    return out


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_ids_text_is_in_the_output_only_with_include_stop_str_in_output(llm, include):
    tok = llm.tokenizer
    free = generate(llm, greedy())
    # an ordinary word piece (not special, not a byte) with text of its own
    stop = next(t for t in free.token_ids[1:] if t > 258 and tok.decode([t]).strip())
    n = free.token_ids.index(stop) + 1
    out = generate(llm, greedy(stop_token_ids=[stop], include_stop_str_in_output=include))
    assert out.token_ids == free.token_ids[:n] and out.finish_reason == "stop"
    with_stop, without = tok.decode(out.token_ids), tok.decode(out.token_ids[:-1])
    assert with_stop != without and out.text == (with_stop if include else without)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_ends_the_streamed_text_before_or_after_it(llm, include):
    tok, engine = llm.tokenizer, llm.engine
    free = generate(llm, greedy()).text
    stop = next(free[i:i + 2] for i in range(len(free) // 2, len(free)) if free[i:i + 2].strip())
    cut = free.index(stop) + (len(stop) if include else 0)
    rid = engine.add_request(tok.encode(PROMPT), greedy(stop=[stop], include_stop_str_in_output=include))
    seen = []
    while engine.has_unfinished():
        seen += [o for o in engine.step() if o.request_id == rid]
    assert seen[-1].finished and seen[-1].finish_reason == "stop"
    assert seen[-1].text == free[:cut]
    assert all(b.text.startswith(a.text) for a, b in zip(seen, seen[1:], strict=False))  # nothing retracted
    assert all(stop not in o.text for o in seen[:-1])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_in_the_text_only_without_skip_special_tokens(llm, skip):
    """Sampled BOS and EOS (biased up; ignore_eos keeps going) among ordinary tokens."""
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True, logit_bias={BOS: 10.0, EOS: 10.0},
                            skip_special_tokens=skip)
    out = generate(llm, params)
    assert {BOS, EOS} <= set(out.token_ids) and set(out.token_ids) - {BOS, EOS}  # a mix of both kinds
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=skip)
    assert ("<s>" in out.text and "</s>" in out.text) != skip


@pytest.mark.parametrize("include", [False, True])
def test_eos_text_with_special_tokens_kept(llm, include):
    """min_tokens holds EOS back for three tokens; then EOS ends the request, its "</s>" in the text only
    with include_stop_str_in_output."""
    params = SamplingParams(max_tokens=10, temperature=0.0, min_tokens=3, logit_bias={EOS: 30.0},
                            skip_special_tokens=False, include_stop_str_in_output=include)
    out = generate(llm, params)
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(out.token_ids if include else out.token_ids[:-1],
                                            skip_special_tokens=False)
    assert out.text.endswith("</s>") == include


def test_min_tokens_ignores_stop_strings_in_the_first_tokens_text(llm):
    tok, min_tokens = llm.tokenizer, 4
    free = generate(llm, greedy(min_tokens=min_tokens))  # the same tokens as below until a stop string
    early = tok.decode(free.token_ids[:min_tokens]).rstrip("\ufffd")  # the first min_tokens tokens' text
    late = free.text[len(early):]
    stop = next(c for c in early if c.strip() and c in late)  # in both: only the later one may count
    assert generate(llm, greedy(stop=[stop])).text == free.text[: free.text.index(stop)]
    out = generate(llm, greedy(stop=[stop], min_tokens=min_tokens))
    assert out.finish_reason == "stop" and out.text == free.text[: len(early) + late.index(stop)]


def test_the_deltas_texts_add_up_to_the_text_a_stop_string_ends(llm):
    """Through the engine boundary each step's delta carries only its new text; joined, they are the
    whole output's text, cut before the stop string."""
    tok, engine = llm.tokenizer, llm.engine
    free = generate(llm, greedy()).text
    stop = next(free[i:i + 2] for i in range(len(free) // 2, len(free)) if free[i:i + 2].strip())
    rid = engine.add_request(tok.encode(PROMPT), greedy(stop=[stop]), prompt_text=PROMPT)
    deltas = []
    while engine.has_unfinished():
        deltas += [d for d in engine.step_deltas() if d.request_id == rid]
    assert "".join(d.new_text for d in deltas) == free[:free.index(stop)]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert all(not d.finished for d in deltas[:-1])
