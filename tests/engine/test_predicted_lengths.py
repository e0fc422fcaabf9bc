"""The ALISE policy's adapter over the learned predictor: non-blocking, learns only from natural ends."""

from __future__ import annotations

import time

import pytest

from scalellm_jax.engine.predicted_lengths import PredictedLengths
from scalellm_jax.engine.request import Request, RequestStatus, SamplingParams
from scalellm_jax.length_predictor.predictor import PredictorConfig

CHEAP = PredictorConfig(encoders=(("hashed", 1.0),), hashed_dim=64, min_observations=1, refit_every=1)


class WordTokenizer:
    """Token id i is the word "w{i}"."""

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def request(rid, prompt, status=RequestStatus.WAITING, outputs=0):
    r = Request(rid, prompt, SamplingParams(max_tokens=100), arrival_time=0.0)
    r.output_token_ids = [5] * outputs
    r.status = status
    return r


def test_predictions_arrive_off_thread_and_only_natural_ends_are_learned():
    lengths = PredictedLengths.build(WordTokenizer(), config=CHEAP)
    try:
        a = request("a", [1, 2, 3])
        assert lengths.predicted(a) is None or lengths.predicted(a) > 0  # never blocks
        lengths.start(a)
        wait_for(lambda: lengths.predicted(a) is not None)
        assert lengths.predicted(a) > 0
        observed = lengths.predictor.predictor.num_observations
        lengths.finish(request("a", [1, 2, 3], RequestStatus.FINISHED_LENGTH, outputs=100))  # cut off: a bound only
        lengths.finish(request("b", [4, 5], RequestStatus.FINISHED_ABORTED, outputs=7))
        lengths.finish(request("c", [6, 7], RequestStatus.FINISHED_STOPPED, outputs=12))
        wait_for(lambda: lengths.predictor.predictor.num_observations == observed + 1)
        assert lengths.predicted(a) is None  # forgotten once finished
    finally:
        lengths.close()


def test_warm_start_file_errors_name_the_file(tmp_path):
    with pytest.raises((OSError, ValueError), match="missing.jsonl"):
        PredictedLengths.build(WordTokenizer(), warm_start=tmp_path / "missing.jsonl", config=CHEAP)


class RecordingTokenizer(WordTokenizer):
    def __init__(self):
        self.decoded = []

    def decode(self, ids):
        self.decoded.append(list(ids))
        return super().decode(ids)


def test_the_prompt_text_a_request_came_with_is_read_and_only_bare_token_ids_are_decoded():
    tokenizer = RecordingTokenizer()
    lengths = PredictedLengths.build(tokenizer, config=CHEAP)
    try:
        with_text = request("text", [1, 2, 3])
        with_text.prompt_text = "w1 w2 w3"
        ids_only = request("ids", [4, 5])
        lengths.start(with_text)
        lengths.start(ids_only)
        wait_for(lambda: lengths.predicted(with_text) is not None and lengths.predicted(ids_only) is not None)
        observed = lengths.predictor.predictor.num_observations
        done = request("text", [1, 2, 3], RequestStatus.FINISHED_STOPPED, outputs=9)
        done.prompt_text = "w1 w2 w3"
        lengths.finish(done)  # learning from it reads its text too
        wait_for(lambda: lengths.predictor.predictor.num_observations == observed + 1)
        assert tokenizer.decoded == [[4, 5]]
    finally:
        lengths.close()
