"""Workloads for the scheduler simulator: dataset rows, the train/replay split, predicted lengths, arrivals.

A row is one real request: its prompt (Mixtral token ids) and the number of tokens the model really
answered with. The output-length predictor is trained on one part of the rows and predicts the
other part, which is replayed; predictions are computed once up front (in a simulation nothing is
gained by predicting on a worker thread, and a fixed prediction per prompt keeps runs comparable).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from scalellm_jax.engine.policies import OracleLengths
from scalellm_jax.engine.request import Request, SamplingParams, clamp_max_tokens

SAMPLED_TOKEN = 11  # what the fake device "samples": any id that is not EOS (requests ignore EOS anyway)
EOS_TOKEN = 2


@dataclasses.dataclass(frozen=True)
class Row:
    text: str
    prompt_ids: tuple[int, ...]
    output_len: int


def load_rows(path: pathlib.Path, tokenizer, max_prompt_len: int | None = None) -> list[Row]:
    """Rows of a JSONL file with ``instruction`` and ``output``; lengths in ``tokenizer`` tokens."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
                raise ValueError(f"{path}:{number}: needs string fields 'instruction' and 'output'")
            ids = tokenizer.encode(record["instruction"])[:max_prompt_len]
            output_len = max(1, len(tokenizer.encode(record["output"], add_bos=False)))
            rows.append(Row(record["instruction"], tuple(ids), output_len))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def split_rows(rows: list[Row], train_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded random (train, replay) split; both parts non-empty."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train = min(max(1, round(train_fraction * len(rows))), len(rows) - 1)
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train:]]


@dataclasses.dataclass(frozen=True)
class Stream:
    """One replay stream: which replay row each request is, its user priority, and unit-rate arrivals.

    Arrival times for a request rate ``r`` are ``unit_arrivals / r``: every load replays the same
    requests in the same order with the same relative gaps (common random numbers), so
    differences between loads and policies are not sampling noise.
    """

    row_index: np.ndarray
    priority: np.ndarray
    unit_arrivals: np.ndarray

    def __len__(self) -> int:
        return len(self.row_index)


def make_stream(num_rows: int, num_requests: int, priority_fraction: float, seed: int) -> Stream:
    """``num_requests`` requests cycling through shuffled copies of the replay rows; Poisson gaps.

    A random ``priority_fraction`` of the requests gets user priority 0, the rest 1 (lower runs
    sooner under ``priority`` and ``alise``; ``fcfs`` ignores it).
    """
    rng = np.random.default_rng(seed)
    copies = -(-num_requests // num_rows)
    index = np.concatenate([rng.permutation(num_rows) for _ in range(copies)])[:num_requests]
    priority = (rng.random(num_requests) >= priority_fraction).astype(np.int64)
    arrivals = np.cumsum(rng.exponential(1.0, num_requests))
    return Stream(index, priority, arrivals - arrivals[0])


def build_requests(stream: Stream, rows: list[Row], rate: float | None, max_model_len: int) -> list[Request]:
    """Fresh ``Request`` objects for one run; ``rate=None`` puts every arrival at t=0 (saturation)."""
    arrivals = np.zeros(len(stream)) if rate is None else stream.unit_arrivals / rate
    requests = []
    for i, (row_i, priority, arrival) in enumerate(zip(stream.row_index, stream.priority, arrivals, strict=True)):
        row = rows[row_i]
        # Greedy, as in the calibration (random sampling adds per-step work on CPU).
        params = clamp_max_tokens(SamplingParams(max_tokens=row.output_len, ignore_eos=True, temperature=0.0),
                                  len(row.prompt_ids), max_model_len)
        requests.append(Request(request_id=f"r{i:05d}", prompt_token_ids=list(row.prompt_ids), sampling_params=params,
                                arrival_time=float(arrival), priority=int(priority), eos_token_id=EOS_TOKEN))
    return requests


class FixedLengths(OracleLengths):
    """``LengthEstimates`` from a precomputed table of *predicted* lengths (request id → tokens).

    The oracle's mechanics (a lookup by request id), fed the predictor's numbers instead of the truth.
    """


def length_tables(requests: list[Request], stream: Stream, predictions: np.ndarray) -> tuple[dict, dict]:
    """(predicted, true) output lengths by request id, for ``FixedLengths`` and ``OracleLengths``."""
    predicted = {r.request_id: float(predictions[i]) for r, i in zip(requests, stream.row_index, strict=True)}
    true = {r.request_id: r.sampling_params.max_tokens for r in requests}
    return predicted, true


def train_predictor(train: list[Row], fast: bool):
    """The output-length predictor fitted on the training rows (``fast``: no MiniLM, for tests)."""
    from scalellm_jax.engine.predictor import OutputLengthPredictor, PredictorConfig

    config = PredictorConfig(encoders=(("hashed", 1.0), ("structure", 0.1), ("cues", 0.1))) if fast else None
    predictor = OutputLengthPredictor(config)
    return predictor.fit([r.text for r in train], [r.output_len for r in train])
