"""LLMEngine end to end on a small random model: continuous batching, no recompiles, exact results."""

from __future__ import annotations

import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import EngineConfig, ModelConfig
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.policies import OracleLengths
from scalellm_jax.engine.request import SamplingParams

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=96, sliding_window=24,
)
ENGINE = EngineConfig(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def model():
    return scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    engine = LLMEngine(model, ENGINE)
    engine.warmup(progress=False)
    return engine


def run_to_completion(engine, max_steps=2000):
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("engine did not finish")


def random_prompt(rng, low=1, high=40):
    return rng.integers(3, CONFIG.vocab_size, int(rng.integers(low, high))).tolist()


def test_greedy_matches_research_generate_with_chunked_prefill_and_queueing(engine, model):
    rng = np.random.default_rng()
    prompts = [random_prompt(rng) for _ in range(7)]  # > max_num_seqs: some wait; long ones are chunked
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = run_to_completion(engine)
    expected = scalellm_jax.generate(model, prompts, 9)
    assert [done[i].token_ids for i in ids] == expected
    assert all(done[i].finish_reason == "length" for i in ids)


def test_mixed_workload_compiles_nothing_and_frees_every_page(engine):
    rng = np.random.default_rng()
    before = engine.runner.num_compilations()
    pending = [random_prompt(rng) for _ in range(14)]
    live: list[str] = []
    for _ in range(400):
        if pending and rng.random() < 0.4:
            params = SamplingParams(
                max_tokens=int(rng.integers(1, 12)), temperature=float(rng.choice([0.0, 0.8])),
                top_k=int(rng.integers(0, 5)), top_p=float(rng.uniform(0.5, 1.0)), logprobs=bool(rng.random() < 0.5),
            )
            live.append(engine.add_request(pending.pop(), params))
        if live and rng.random() < 0.05:
            engine.abort(live.pop(int(rng.integers(len(live)))))
        engine.step()
        engine.kv.check_invariants()
        if not pending and not engine.has_unfinished():
            break
    assert not engine.has_unfinished()
    assert engine.runner.num_compilations() == before
    assert engine.kv.num_free_pages == engine.kv.num_usable_pages


@pytest.mark.parametrize("policy, swap_space_gb", [("fcfs", 0.0), ("fcfs", 1.0), ("alise", 1.0)])
def test_batch_composition_and_preemption_do_not_change_sampled_tokens(model, policy, swap_space_gb):
    """Preempted requests resume with exactly the tokens they would have produced, whether their
    KV was recomputed (no swap space) or swapped to host memory and back."""
    rng = np.random.default_rng()
    target = random_prompt(rng, 5, 30)
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True, prompt_logprobs=2)
    alone = LLMEngine(model, ENGINE)
    rid = alone.add_request(target, params)
    expected_out = run_to_completion(alone)[rid]
    expected = expected_out.token_ids

    # A pool so small that requests preempt each other, with others arriving mid-way.
    crowded = LLMEngine(model, EngineConfig(page_size=4, num_pages=24, max_num_seqs=4, max_num_batched_tokens=16,
                                            scheduling_policy=policy, swap_space_gb=swap_space_gb),
                        lengths=OracleLengths({}))
    crowded.add_request(random_prompt(rng), SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True))
    crowded.step()
    rid = crowded.add_request(target, params)
    for _ in range(3):
        crowded.add_request(random_prompt(rng), SamplingParams(max_tokens=25, temperature=0.7, ignore_eos=True))
    preemptions = 0
    finished = {}
    while crowded.has_unfinished():
        outputs = crowded.step()
        crowded.kv.check_invariants()
        preemptions = max(preemptions, max((r.num_preemptions for r in crowded.scheduler.running), default=0))
        finished.update({o.request_id: o for o in outputs if o.finished})
    assert finished[rid].token_ids == expected
    _assert_prompt_logprobs_close(finished[rid].prompt_logprobs, expected_out.prompt_logprobs)
    assert preemptions > 0, "the small pool was meant to force preemption"
    assert crowded.kv.num_free_pages == crowded.kv.num_usable_pages
    swapper = crowded.runner.swapper
    if swap_space_gb:
        assert swapper.num_swap_outs > 0 and swapper.num_swap_ins == swapper.num_swap_outs
        assert swapper.num_swapped == 0 and crowded.kv.num_free_host_pages == crowded.kv.num_host_pages
    else:
        assert swapper is None


def test_logprobs_are_the_model_log_softmax(engine, model):
    prompt = random_prompt(np.random.default_rng(), 3, 10)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0.0, logprobs=True, ignore_eos=True))
    out = run_to_completion(engine)[rid]
    logits = np.asarray(model.logits([prompt + out.token_ids]), np.float64)[0]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)


def _log_softmax(model, token_ids) -> np.ndarray:
    logits = np.asarray(model.logits([token_ids]), np.float64)[0]
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _assert_prompt_logprobs_close(got, want):
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for (lp, alternatives), (lp_want, alternatives_want) in zip(got[1:], want[1:], strict=True):
        assert abs(lp - lp_want) < 1e-4
        assert [t for t, _ in alternatives] == [t for t, _ in alternatives_want]
        np.testing.assert_allclose([v for _, v in alternatives], [v for _, v in alternatives_want], atol=1e-4)


def test_prompt_and_top_logprobs_are_the_model_log_softmax(engine, model):
    """Prompt logprobs over a chunked prefill (prompts longer than the 16-token step), next to a request
    that asks for none, and each sampled token's alternatives, against one full forward."""
    rng = np.random.default_rng()
    prompt = random_prompt(rng, 20, 45)
    engine.add_request(random_prompt(rng, 5, 30), SamplingParams(max_tokens=3, ignore_eos=True))
    rid = engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3,
                                                    prompt_logprobs=5, ignore_eos=True))
    out = run_to_completion(engine)[rid]
    logp = _log_softmax(model, prompt + out.token_ids)
    want = [None] + [(logp[q - 1, prompt[q]], [(int(t), logp[q - 1, t]) for t in np.argsort(-logp[q - 1])[:5]])
                     for q in range(1, len(prompt))]
    _assert_prompt_logprobs_close(out.prompt_logprobs, want)
    for i, (token, alternatives) in enumerate(zip(out.token_ids, out.top_logprobs, strict=True)):
        row = logp[len(prompt) - 1 + i]
        assert [t for t, _ in alternatives] == np.argsort(-row)[:3].tolist() and alternatives[0][0] == token
        np.testing.assert_allclose([v for _, v in alternatives], np.sort(row)[::-1][:3], atol=1e-4)


def test_stop_token_ids(engine):
    rng = np.random.default_rng()
    prompt = random_prompt(rng, 3, 10)
    free = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    tokens = run_to_completion(engine)[free].token_ids
    stop = tokens[3]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop], ignore_eos=True)
    rid = engine.add_request(prompt, params)
    out = run_to_completion(engine)[rid]
    assert out.token_ids == tokens[: tokens.index(stop) + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt_token_ids"),
        ([1] * 96, SamplingParams(), "prompt_token_ids"),
        ([1, 64], SamplingParams(), "prompt_token_ids"),
        ([1, 2], SamplingParams(stop=["x"]), "stop"),
    ],
)
def test_bad_requests_raise_and_the_engine_keeps_serving(engine, model, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, params)
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert run_to_completion(engine)[rid].token_ids == scalellm_jax.generate(model, [[5, 6, 7]], 3)[0]


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("top_p", 0.0), ("top_p", 1.5), ("temperature", -1.0)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_top_k_beyond_the_vocabulary_means_no_filter(engine):
    """A huge top_k (any int a client can send) must not overflow the device batch: it equals top_k=0."""
    prompt = [5, 9, 11]
    outs = []
    for top_k in (0, 2**47):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=1.0, top_k=top_k, seed=7,
                                                        ignore_eos=True))
        outs.append(run_to_completion(engine)[rid].token_ids)
    assert outs[0] == outs[1]


def test_on_outputs_gets_each_steps_outputs_before_the_device_wait(engine, monkeypatch):
    """With ``on_outputs`` the same outputs arrive through the callback, before the step blocks on
    the device for its sampled tokens, and ``step`` returns nothing itself."""
    rng = np.random.default_rng()
    prompts = [random_prompt(rng) for _ in range(3)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    expected = run_to_completion(engine)
    events, finished = [], {}

    class Transfer:  # the step's device→host transfer is np.asarray on what execute returned
        def __init__(self, array):
            self.array = array

        def __array__(self, dtype=None, copy=None):
            events.append("wait")
            return np.asarray(self.array, dtype)

    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda batch: type(out := execute(batch))(*map(Transfer, out)))

    def on_outputs(outputs):
        events.append("outputs")
        finished.update((o.request_id, o) for o in outputs if o.finished)

    new_ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        events.append("|")
        assert engine.step(on_outputs=on_outputs) == []
    assert [finished[i].token_ids for i in new_ids] == [expected[i].token_ids for i in ids]
    steps = [step.split() for step in " ".join(events).split("|")]
    both = [s for s in steps if "outputs" in s and "wait" in s]
    assert both and all(s.index("outputs") < s.index("wait") for s in both)


def test_step_deltas_hold_only_new_tokens_and_add_up_to_the_whole_outputs(engine):
    """The engine boundary: each step's delta has the request's new tokens and logprobs only (one per
    decode step), its prompt once, and all of them together are what ``step`` returns whole; an abort's
    delta carries the tokens not reported yet."""
    rng = np.random.default_rng()
    prompts = [random_prompt(rng) for _ in range(6)]  # > max_num_seqs: some wait, long ones are chunked
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    ids = [engine.add_request(p, params) for p in prompts]
    expected = run_to_completion(engine)
    new_ids = [engine.add_request(p, params) for p in prompts]
    sent = {rid: [] for rid in new_ids}
    while engine.has_unfinished():
        for delta in engine.step_deltas():
            sent[delta.request_id].append(delta)
    for rid, new_rid, prompt in zip(ids, new_ids, prompts, strict=True):
        deltas, whole = sent[new_rid], expected[rid]
        assert [len(d.new_token_ids) for d in deltas] == [1] * 7  # O(new tokens) per step, never the whole
        assert [t for d in deltas for t in d.new_token_ids] == whole.token_ids
        # the two runs batched differently: logprobs agree to float32 rounding
        np.testing.assert_allclose([lp for d in deltas for lp in d.new_logprobs], whole.logprobs, atol=1e-5)
        alternatives = [a for d in deltas for a in d.new_top_logprobs]
        assert [[t for t, _ in a] for a in alternatives] == [[t for t, _ in a] for a in whole.top_logprobs]
        np.testing.assert_allclose([[v for _, v in a] for a in alternatives],
                                   [[v for _, v in a] for a in whole.top_logprobs], atol=1e-5)
        assert deltas[0].prompt_token_ids == tuple(prompt) and all(d.prompt_token_ids is None for d in deltas[1:])
        assert [d.finished for d in deltas] == [False] * 6 + [True] and deltas[-1].finish_reason == "length"
        assert all(d.scheduled_time == deltas[0].scheduled_time is not None for d in deltas)

    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    rid = engine.add_request([5, 6, 7], greedy)
    reported = []
    while len(reported) < 3:
        reported += [t for d in engine.step_deltas() if d.request_id == rid for t in d.new_token_ids]
    final = engine.abort(rid)
    assert final.finished and final.finish_reason == "abort"
    later = []
    while engine.has_unfinished():
        later += [d for d in engine.step_deltas() if d.request_id == rid]
    assert later == []  # the abort's delta was its last
    whole = reported + list(final.new_token_ids)  # nothing lost or repeated between the step and the abort
    full_rid = engine.add_request([5, 6, 7], greedy)
    assert whole == run_to_completion(engine)[full_rid].token_ids[:len(whole)]
