"""Logit controls (bias, min_tokens, repetition/frequency/presence penalties, min_p): the device functions against
a numpy reference of vLLM's definitions, the host slot table, and the engine end to end against a reference loop
over the model's own logits."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import EngineConfig, ModelConfig
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.history_slots import HistorySlots, history_row
from scalellm_jax.engine.logit_controls import (
    NO_SLOT,
    RowControls,
    TokenHistory,
    apply_controls,
    record_tokens,
    write_rows,
)
from scalellm_jax.engine.request import Request, RequestStatus, SamplingParams

EOS = 2


def reference_controls(logits, prompt, outputs, params: SamplingParams, eos=EOS) -> np.ndarray:
    """vLLM's definitions, one request at a time, in float64."""
    x = logits.astype(np.float64).copy()
    for token, bias in params.logit_bias:
        x[token] += bias
    if len(outputs) < params.min_tokens:
        stops = [t for t in params.stop_token_ids if t < len(x)] + ([] if params.ignore_eos else [eos])
        x[stops] = -np.inf
    counts = np.bincount(np.asarray(outputs, int), minlength=len(x))
    seen = counts > 0
    seen[list(prompt)] = True
    rep = params.repetition_penalty
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    return x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def random_params(rng, vocab) -> SamplingParams:
    pick = rng.random(6) < 0.6
    bias = {int(t): float(rng.uniform(-100, 100)) for t in rng.choice(vocab, int(rng.integers(1, 5)), replace=False)}
    return SamplingParams(
        max_tokens=50, presence_penalty=float(rng.uniform(-2, 2)) if pick[0] else 0.0,
        frequency_penalty=float(rng.uniform(-2, 2)) if pick[1] else 0.0,
        repetition_penalty=float(rng.uniform(0.5, 2.0)) if pick[2] else 1.0, logit_bias=bias if pick[3] else {},
        min_tokens=int(rng.integers(0, 6)) if pick[4] else 0, stop_token_ids=[int(rng.integers(vocab))],
        ignore_eos=bool(pick[5]))


@pytest.mark.parametrize("vocab", [5, 64, 1000])
def test_apply_controls_matches_the_reference_and_leaves_other_rows_alone(vocab):
    rng = np.random.default_rng()
    rows, num_slots = 12, 16
    logits = (3 * rng.standard_normal((rows, vocab))).astype(np.float32)
    # slots hold garbage (another request's history) except the ones written below
    history = TokenHistory(jnp.asarray(rng.integers(0, 1 << 20, (num_slots, vocab)), jnp.int32),
                           jnp.asarray(rng.uniform(-100, 100, (num_slots, vocab)), jnp.float32))
    slots = rng.permutation(num_slots)[:rows].astype(np.int32)
    slots[rng.random(rows) < 0.3] = NO_SLOT
    requests = []
    for i in range(rows):
        prompt = rng.integers(0, vocab, int(rng.integers(1, 20))).tolist()
        outputs = rng.integers(0, vocab, int(rng.integers(0, 12))).tolist()
        request = Request(f"r{i}", prompt, random_params(rng, vocab), 0.0, eos_token_id=EOS % vocab)
        request.output_token_ids = outputs
        requests.append(request)
    written = np.flatnonzero(slots != NO_SLOT)
    marks, bias = zip(*(history_row(requests[i], vocab) for i in written), strict=True)
    history = write_rows(history, jnp.asarray(slots[written]), jnp.asarray(np.stack(marks)),
                         jnp.asarray(np.stack(bias)))
    controls = RowControls(
        jnp.asarray(slots), *(jnp.asarray([getattr(r.sampling_params, name) for r in requests], jnp.float32)
                              for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")),
        jnp.asarray([r.num_output_tokens < r.sampling_params.min_tokens for r in requests]))
    got = np.asarray(apply_controls(jnp.asarray(logits), history, controls))
    for i, r in enumerate(requests):
        if slots[i] == NO_SLOT:
            np.testing.assert_array_equal(got[i], logits[i])
        else:
            want = reference_controls(logits[i], r.prompt_token_ids, r.output_token_ids, r.sampling_params, EOS % vocab)
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-4)


def test_record_tokens_counts_into_the_rows_slot_only():
    history = TokenHistory(jnp.zeros((3, 8), jnp.int32), jnp.zeros((3, 8), jnp.float32))
    slot = jnp.asarray([2, NO_SLOT, 0, 2], jnp.int32)
    history = record_tokens(history, slot, jnp.asarray([5, 1, 5, 5], jnp.int32))
    marks = np.asarray(history.marks)
    assert marks[2, 5] == 8 and marks[0, 5] == 4 and marks.sum() == 12  # two rows of slot 2 both counted


def _request(status=RequestStatus.RUNNING, **params):
    r = Request("r", [3, 4, 3], SamplingParams(max_tokens=9, **params), 0.0, eos_token_id=EOS)
    r.status = status
    return r


def test_history_row_encodes_prompt_outputs_stop_tokens_and_bias():
    r = _request(stop_token_ids=[7, 500], logit_bias={6: -3.5})
    r.output_token_ids = [4, 4, 6]
    marks, bias = history_row(r, 10)
    np.testing.assert_array_equal(marks, [0, 0, 2, 1, 8 | 1, 0, 4, 2, 0, 0])
    assert bias[6] == -3.5 and np.count_nonzero(bias) == 1
    marks, _ = history_row(_request(ignore_eos=True), 10)
    assert marks[EOS] == 0  # with ignore_eos, EOS is no stop token min_tokens must hold back


def test_slots_are_handed_out_once_written_once_and_freed_when_not_running():
    slots = HistorySlots(3, 10)
    a, b = _request(presence_penalty=1.0), _request(min_tokens=2)
    assert slots.slot(a) == slots.slot(a) != slots.slot(b)
    written, marks, _ = slots.take_writes()
    assert len(written) == 2 and set(written) == {slots.slot(a), slots.slot(b)} and marks.shape == (2, 10)
    assert slots.take_writes() is None  # nothing new
    b.status = RequestStatus.PREEMPTED
    slots.release_idle()
    assert slots.in_use() == 1
    b.status = RequestStatus.RUNNING  # resumed: a fresh slot and a fresh row
    slots.slot(b)
    c = _request(logit_bias={1: 1.0})
    slots.slot(c)
    written, _, _ = slots.take_writes()
    assert len(written) == 2 and slots.in_use() == 3
    with pytest.raises(RuntimeError, match="no free history slot"):
        slots.slot(_request(repetition_penalty=1.2))


# ---------------------------------------------------------------------------------------------- end to end

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=96, sliding_window=24,
    eos_token_id=EOS,
)


@pytest.fixture(scope="module")
def model():
    return scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")


def reference_greedy(model, prompt, params: SamplingParams) -> list[int]:
    """Greedy decoding over the model's full-sequence logits, the controls applied by the reference."""
    outputs = []
    while len(outputs) < params.max_tokens:
        tokens = prompt + outputs  # padded to one length (one compile): causal, so the padding changes nothing
        logits = np.asarray(model.logits(np.asarray([tokens + [0] * (CONFIG.max_position_embeddings - len(tokens))])))
        logits = logits[0, len(tokens) - 1]
        x = reference_controls(logits, prompt, outputs, params)
        outputs.append(int(np.argmax(x)))
        if outputs[-1] == EOS and not params.ignore_eos or outputs[-1] in params.stop_token_ids:
            break
    return outputs


def run(engine, requests):
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    engine.runner.slots.release_idle()  # slots go back at the next step; none may be left behind
    assert engine.runner.slots.in_use() == 0
    return [done[i].token_ids for i in ids]


@pytest.fixture(scope="module")
def engine(model):
    return LLMEngine(model, EngineConfig(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16))


@pytest.mark.parametrize("num_pages", [64, 14])  # 14: too few for four at once, so requests are preempted
def test_greedy_with_controls_matches_the_reference_batched_chunked_and_preempted(model, engine, num_pages):
    rng = np.random.default_rng()
    if num_pages != 64:
        engine = LLMEngine(model, EngineConfig(page_size=4, num_pages=num_pages, max_num_seqs=4,
                                               max_num_batched_tokens=16))
    requests = []
    for i in range(6):
        prompt = rng.integers(3, CONFIG.vocab_size, int(rng.integers(1, 30))).tolist()
        params = random_params(rng, CONFIG.vocab_size) if i % 3 else SamplingParams(max_tokens=20, ignore_eos=True)
        requests.append((prompt, dataclasses.replace(params, max_tokens=12, temperature=0.0)))
    got = run(engine, requests)
    assert got == [reference_greedy(model, p, params) for p, params in requests]
    if num_pages == 14:
        assert engine.stats().num_preemptions > 0


def test_a_sampled_request_with_controls_draws_the_same_alone_as_in_a_batch(engine):
    target = ([5, 9, 11, 5], SamplingParams(max_tokens=16, temperature=1.0, seed=7, presence_penalty=1.5,
                                            repetition_penalty=1.3, min_p=0.05, top_p=0.9, logit_bias={4: 3.0},
                                            min_tokens=4))
    alone = run(engine, [target])[0]
    others = [([7, 8], SamplingParams(max_tokens=10, temperature=0.7, frequency_penalty=1.0)),
              ([3] * 20, SamplingParams(max_tokens=5, temperature=0.0, logit_bias={8: 50})),
              ([9, 10, 11], SamplingParams(max_tokens=12, temperature=1.0, top_k=5))]
    assert run(engine, [others[0], target, *others[1:]])[1] == alone


def test_min_p_one_keeps_only_the_top_token_and_min_tokens_holds_back_eos(engine):
    prompt = [5, 6, 7]
    greedy, top_only = run(engine, [(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)),
                                    (prompt, SamplingParams(max_tokens=10, temperature=1.5, min_p=1.0,
                                                            ignore_eos=True))])
    assert greedy == top_only
    eager_eos = SamplingParams(max_tokens=10, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=6)
    out = run(engine, [(prompt, eager_eos)])[0]
    assert len(out) == 7 and EOS not in out[:6] and out[6] == EOS
