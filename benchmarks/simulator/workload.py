"""Workloads for the scheduler simulator: dataset rows, the train/replay split, predicted lengths, arrivals.

A row is one request: its prompt (Mixtral token ids) and the number of tokens its answer has.

``alpaca`` (``../shared/data/alpaca_eval_mixtral_8x7b_instruct.jsonl``, or any JSONL with
``instruction`` and ``output``): the answer lengths are real (Mixtral's own answers, in Mixtral
tokens). The output-length predictor is trained on one part of the rows and predicts the other
part, which is replayed; predictions are computed once up front (in a simulation nothing is gained
by predicting on a worker thread, and a fixed prediction per prompt keeps runs comparable).

``sharegpt`` (``../shared/data/sharegpt_first_prompts.json``, or any JSON list of ``{"prompt"}``):
the real ShareGPT first user turns (long-tailed prompt lengths) with *synthetic* answer lengths
(the file has no answers), drawn per row from a log-normal (``HeavyTailedLengths``): mean
337.99 tokens, the ShareGPT mean output length reported by the vLLM paper (Kwon et al., "Efficient
Memory Management for Large Language Model Serving with PagedAttention", SOSP 2023, section 6.1:
ShareGPT has 161.31 input and 337.99 output tokens on average), and log-standard-deviation
``sigma`` = 1.0, an assumption that gives the long tail that paper's figure 11 shows (median 205,
p90 740, p99 2100 tokens); clipped to [1, 4095]. Seeded by ``--seed``: the same seed gives the same
lengths. A text predictor cannot learn lengths that are not in the text, so every policy that
needs predictions gets *noisy oracle* predictions instead (``noisy_predictions``): a calibrated
predictor's answer (shrunk toward the mean, as a regression on log length answers) from the true
length blurred by log-normal noise whose sigma makes Kendall's tau between prediction and truth equal
``--prediction-tau`` (default 0.45: the cross-validated tau of the project's MiniLM predictor on
AlpacaEval, ``benchmarks/results/predictor-20261202-191437.json``).

Every request asks for as many tokens as fit (``max_tokens`` = ``max_model_len`` − prompt, as a
client that sets none gets) and does not ignore EOS: the simulated device samples EOS exactly when
the request reaches its true length (``replay``). So no policy sees the true length but the
oracle.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from scalellm_jax.engine.policies import OracleLengths
from scalellm_jax.engine.request import Request, SamplingParams, clamp_max_tokens
from scalellm_jax.workloads import WorkloadRow, fit_prompt, read_prompts

SAMPLED_TOKEN = 11  # what the fake device samples before a request's last token: any id that is not EOS
EOS_TOKEN = 2
DATASETS = ("alpaca", "sharegpt")
DEFAULT_PREDICTION_TAU = 0.45  # the MiniLM predictor's 5-fold CV tau on AlpacaEval (see the module docstring)


@dataclasses.dataclass(frozen=True)
class HeavyTailedLengths:
    """Synthetic answer lengths: log-normal with this mean and log-sd, clipped (see the module docstring)."""

    mean: float = 337.99  # vLLM paper (SOSP 2023), ShareGPT mean output tokens
    sigma: float = 1.0  # assumed
    max_len: int = 4095

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 0x5A4E])  # its own stream: independent of arrivals and splits
        mu = np.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, n)), 1, self.max_len).astype(np.int64)

    def describe(self) -> dict:
        return {"distribution": "lognormal", "mean_tokens": self.mean, "sigma": self.sigma,
                "median_tokens": float(self.mean * np.exp(-self.sigma**2 / 2)), "clip": [1, self.max_len],
                "source": "mean: ShareGPT mean output length 337.99 tokens (Kwon et al., vLLM/PagedAttention, "
                          "SOSP 2023, section 6.1); sigma 1.0: assumed (a long tail like that paper's figure 11)",
                "seeded_by": "--seed"}


def load_prompt_rows(path: pathlib.Path, tokenizer, lengths: HeavyTailedLengths, seed: int,
                     max_prompt_len: int | None = None) -> list[WorkloadRow]:
    """Rows of a JSON list of ``{"prompt"}`` (ShareGPT first turns) with synthetic answer lengths; prompts
    over ``max_prompt_len`` tokens truncated, as ``load_rows(..., too_long="truncate")`` does."""
    prompts = read_prompts(path)
    drawn = lengths.draw(len(prompts), seed)
    rows = []
    for number, (prompt, n) in enumerate(zip(prompts, drawn, strict=True), 1):
        ids, truncated = fit_prompt(tokenizer.encode(prompt), max_prompt_len, "truncate", f"{path}: row {number}")
        rows.append(WorkloadRow(prompt, tuple(ids), int(n), truncated))
    return rows


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def noisy_predictions(true_lengths, tau: float, seed: int) -> tuple[np.ndarray, float, float]:
    """Predictions of ``true_lengths`` from a calibrated predictor whose Kendall tau with the truth is ``tau``.

    The predictor sees a noisy signal ``x = log(true) + sigma z`` (``z`` ~ N(0, 1) per row) and, like a
    regression on log length (the project's predictor), answers with the conditional mean of
    ``log(true)`` given ``x`` for log-normal lengths: ``m + s²/(s² + sigma²) (x − m)``, shrunk toward
    the rows' log-mean ``m`` (log-sd ``s``); the prediction is its exp. For jointly normal variables
    Kendall's tau is ``2/pi asin(rho)`` with ``rho = s / sqrt(s² + sigma²)``, so
    ``sigma = s sqrt(1/rho² − 1)`` with ``rho = sin(pi tau / 2)`` (the shrinkage leaves the order, and
    so tau, alone). Returns (predictions, sigma, the tau measured on these rows).
    """
    if not 0 < tau <= 1:
        raise ValueError(f"--prediction-tau must be in (0, 1], got {tau}")
    log_true = np.log(np.asarray(true_lengths, dtype=float))
    m, s = float(log_true.mean()), float(log_true.std())
    rho = np.sin(np.pi * tau / 2)
    sigma = float(s * np.sqrt(max(1 / rho**2 - 1, 0.0)))
    z = np.random.default_rng([seed, 0x7A0]).standard_normal(log_true.size)
    signal = log_true + sigma * z
    shrink = s**2 / (s**2 + sigma**2) if s > 0 else 1.0
    predictions = np.exp(m + shrink * (signal - m))
    return predictions, sigma, kendall_tau(predictions, log_true)


def split_rows(rows: list[WorkloadRow], train_fraction: float,
               seed: int) -> tuple[list[WorkloadRow], list[WorkloadRow]]:
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


def build_requests(stream: Stream, rows: list[WorkloadRow], rate: float | None, max_model_len: int) -> list[Request]:
    """Requests that run exactly their row's length by ``max_tokens`` and ``ignore_eos`` (the real-engine
    check, ``engine_check``, whose random-weight model never ends on its own). ``max_tokens``
    tells every policy the true length: the simulator uses ``build_sim_requests`` instead."""
    arrivals = np.zeros(len(stream)) if rate is None else stream.unit_arrivals / rate
    requests = []
    for i, (row_i, priority, arrival) in enumerate(zip(stream.row_index, stream.priority, arrivals, strict=True)):
        row = rows[row_i]
        params = clamp_max_tokens(SamplingParams(max_tokens=row.output_len, ignore_eos=True, temperature=0.0),
                                  len(row.prompt_ids), max_model_len)
        requests.append(Request(request_id=f"r{i:05d}", prompt_token_ids=list(row.prompt_ids), sampling_params=params,
                                arrival_time=float(arrival), priority=int(priority), eos_token_id=EOS_TOKEN))
    return requests


def build_sim_requests(stream: Stream, rows: list[WorkloadRow], rate: float | None, max_model_len: int,
                       id_prefix: str = "r") -> tuple[list[Request], dict[str, int]]:
    """Fresh ``Request`` objects for one run and their true output lengths by request id (what the
    simulated device ends them at); ``rate=None`` puts every arrival at t=0 (saturation). Request ids
    are ``id_prefix`` and the request's index.

    ``max_tokens`` is the room left in the context, never the true length (which only the oracle
    and the simulated device see); a true length past that room ends at the room, as it would live.
    """
    arrivals = np.zeros(len(stream)) if rate is None else stream.unit_arrivals / rate
    requests, true = [], {}
    for i, (row_i, priority, arrival) in enumerate(zip(stream.row_index, stream.priority, arrivals, strict=True)):
        row = rows[row_i]
        room = max_model_len - len(row.prompt_ids)
        # Greedy, as in the calibration (random sampling adds per-step work on CPU).
        params = clamp_max_tokens(SamplingParams(max_tokens=room, ignore_eos=False, temperature=0.0),
                                  len(row.prompt_ids), max_model_len)
        rid = f"{id_prefix}{i:05d}"
        requests.append(Request(request_id=rid, prompt_token_ids=list(row.prompt_ids), sampling_params=params,
                                arrival_time=float(arrival), priority=int(priority), eos_token_id=EOS_TOKEN))
        true[rid] = min(row.output_len, room)
    return requests, true


class FixedLengths(OracleLengths):
    """``LengthEstimates`` from a precomputed table of *predicted* lengths (request id → tokens).

    The oracle's mechanics (a lookup by request id), fed the predictor's numbers instead of the truth.
    """


def predicted_table(requests: list[Request], stream: Stream, predictions: np.ndarray) -> dict[str, float]:
    """Predicted output lengths by request id, for ``FixedLengths``."""
    return {r.request_id: float(predictions[i]) for r, i in zip(requests, stream.row_index, strict=True)}


def length_tables(requests: list[Request], stream: Stream, predictions: np.ndarray) -> tuple[dict, dict]:
    """(predicted, max_tokens) by request id for ``build_requests``'s requests (the real-engine check)."""
    return predicted_table(requests, stream, predictions), {r.request_id: r.sampling_params.max_tokens
                                                           for r in requests}


def train_predictor(train: list[WorkloadRow], fast: bool):
    """The output-length predictor fitted on the training rows (``fast``: no MiniLM, for tests)."""
    from scalellm_jax.length_predictor.predictor import OutputLengthPredictor, PredictorConfig

    config = PredictorConfig(encoders=(("hashed", 1.0), ("structure", 0.1), ("cues", 0.1))) if fast else None
    predictor = OutputLengthPredictor(config)
    return predictor.fit([r.text for r in train], [r.output_len for r in train])
