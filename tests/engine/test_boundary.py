"""The engine boundary's plain data: deltas merge, accumulate into whole outputs, and the engine's description
checks requests without the engine."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from scalellm_jax.engine.boundary import EngineInfo, EngineRequest, RequestDelta
from scalellm_jax.engine.outputs import OutputAccumulator
from scalellm_jax.engine.request import SamplingParams

INFO = EngineInfo(max_num_seqs=4, max_model_len=16, vocab_size=100, page_size=4, has_tokenizer=False,
                  eos_token_id=2)


def deltas():
    first = RequestDelta("r", (5, 6), "ab", False, None, new_logprobs=(-0.5, -1.0),
                         new_top_logprobs=(((5, -0.5), (7, -0.9)), ((6, -1.0), (8, -1.5))),
                         prompt_token_ids=(1, 3, 4), prompt_logprobs=(None, (-2.0, ((3, -2.0),)), (-1.0, ())),
                         num_cached_tokens=0, scheduled_time=10.0)
    second = RequestDelta("r", (9,), "", False, None, new_logprobs=(-0.25,), new_top_logprobs=(((9, -0.25),),),
                          num_cached_tokens=0, scheduled_time=10.0)
    last = RequestDelta("r", (2,), "c", True, "stop", new_logprobs=(-0.1,), new_top_logprobs=(((2, -0.1),),),
                        num_cached_tokens=0, scheduled_time=10.0)
    return first, second, last


def test_boundary_messages_are_frozen_picklable_plain_data():
    request = EngineRequest("r", (1, 2, 3), SamplingParams(max_tokens=4), prompt_text="hi", priority=1)
    for message in (request, *deltas(), INFO):
        assert pickle.loads(pickle.dumps(message)) == message  # what another process would receive
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, dataclasses.fields(message)[0].name, None)


def test_accumulated_deltas_are_the_whole_output_and_only_the_first_output_has_the_queue_time():
    accumulator = OutputAccumulator("r", submit_time=9.5)
    outputs = []
    for delta in deltas():
        accumulator.add(delta)
        outputs.append(accumulator.output())
    whole = outputs[-1]
    assert whole.prompt_token_ids == [1, 3, 4] and whole.token_ids == [5, 6, 9, 2]
    assert whole.logprobs == [-0.5, -1.0, -0.25, -0.1] and whole.text == "abc"
    assert whole.top_logprobs == [[(5, -0.5), (7, -0.9)], [(6, -1.0), (8, -1.5)], [(9, -0.25)], [(2, -0.1)]]
    assert whole.prompt_logprobs == [None, (-2.0, ((3, -2.0),)), (-1.0, ())]
    assert whole.finished and whole.finish_reason == "stop"
    assert [o.queue_time for o in outputs] == [0.5, None, None]
    assert [o.text for o in outputs] == ["ab", "ab", "abc"]  # text is a string: each output keeps its own
    assert outputs[0].token_ids is whole.token_ids  # lists are shared, not copied per output


def test_an_accumulator_without_logprobs_reports_none():
    accumulator = OutputAccumulator("r")
    accumulator.add(RequestDelta("r", (4,), "x", True, "length", prompt_token_ids=(1,)))
    out = accumulator.output()
    assert out.logprobs is None and out.top_logprobs is None and out.prompt_logprobs is None
    assert out.queue_time is None  # no submission time given


def test_merged_deltas_equal_the_deltas_one_after_another():
    first, second, last = deltas()
    merged = first.merged(second).merged(last)
    assert merged.new_token_ids == (5, 6, 9, 2) and merged.new_text == "abc"
    assert merged.new_logprobs == (-0.5, -1.0, -0.25, -0.1) and len(merged.new_top_logprobs) == 4
    assert merged.prompt_token_ids == (1, 3, 4) and merged.prompt_logprobs == first.prompt_logprobs
    assert merged.finished and merged.finish_reason == "stop" and merged.scheduled_time == 10.0
    one, two = OutputAccumulator("r"), OutputAccumulator("r")
    for delta in deltas():
        one.add(delta)
    two.add(merged)
    assert one.output() == two.output()


def test_engine_info_checks_requests_without_the_engine():
    INFO.check_request([1, 2, 3], SamplingParams())
    with pytest.raises(ValueError, match="^stop: "):
        INFO.check_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="^logit_bias: token 100 "):
        INFO.check_request([1, 2], SamplingParams(logit_bias={100: 1.0}))
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        INFO.check_request([1] * 16, SamplingParams())  # no room left for an output token
    with pytest.raises(ValueError, match="outside the vocabulary"):
        INFO.check_request([1, 100], SamplingParams())
