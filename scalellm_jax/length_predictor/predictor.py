"""Output-length predictor for ALISE scheduling: prompt text -> expected number of output tokens.

ALISE's design, on the host CPU and without torch:

* Encode the prompt (``text_encoder``). The default concatenates, with per-block weights, a
  hashed n-grams, a static MiniLM embedding (``static_embedding``: layer-5 token vectors
  distilled once from the MiniLM weights, averaged over the prompt), layout and task-cue statistics; it
  costs well under a millisecond of CPU per prompt, so the predictor keeps up with a GPU's
  arrival rate. ``MINILM_ENCODERS`` runs the full MiniLM instead: it ranks lengths better but
  costs tens of milliseconds per prompt (numbers in ``benchmarks/results/predictor-*.json``).
* Retrieval: a vector store of (embedding, actual output length) over the most recent
  ``max_store`` finished requests. When the nearest stored prompts are close (cosine similarity
  above ``knn_threshold``, e.g. a repeated prompt template), their lengths decide the prediction.
* Fallback: a ridge regression on log length over all features. It is kept as sufficient
  statistics (X^T X, X^T y), so every observation counts, forgetting nothing, and a refit is one
  ``dim x dim`` Cholesky solve, done every ``refit_every`` observations while holding the
  predictor's lock.

``OutputLengthPredictor`` is thread-safe; it learns online (``observe``) and warm-starts from a
dataset (``fit``, ``from_dataset``). The engine thread should not call it directly:
``AsyncPredictor`` runs it on one worker thread, and the engine only ever does
``submit(key, prompt)``, ``get(key)`` and ``observe(prompt, n)``, none of which block.
``tiered.TieredPredictor`` does the same with two predictors: a fast one for every
request at once, the accurate (MiniLM) one when the host has time.

MiniLM (and the one-off build of the static table) runs on numpy's BLAS. With more BLAS threads
than idle cores (a busy serving host), OpenBLAS's spinning threads make it several times slower:
start servers with ``OPENBLAS_NUM_THREADS=1`` (JAX does not use OpenBLAS).

``python -m scalellm_jax.length_predictor eval --train T.jsonl --test S.jsonl [--json]`` measures it
(see ``evaluation``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from scalellm_jax.length_predictor.dataset import load_rows
from scalellm_jax.length_predictor.encoders import make_encoder
from scalellm_jax.length_predictor.text_encoder import TextEncoder

logger = logging.getLogger(__name__)

# Hashed n-grams come first because the first block is the retrieval key: they tell near-duplicate
# prompts apart, while a mean of static token vectors puts unrelated prompts close together too.
DEFAULT_ENCODERS = (("hashed", 0.6), ("static", 1.0), ("structure", 0.1), ("cues", 0.1))
# The full transformer in place of its static distillation: better ranks, far more CPU per prompt.
MINILM_ENCODERS = (("minilm", 1.0), ("hashed", 0.6), ("structure", 0.1), ("cues", 0.1))
# Without the MiniLM package (the ``minilm`` extra), which both MiniLM encoders need.
LIGHT_ENCODERS = (("hashed", 1.0), ("structure", 0.1), ("cues", 0.1))
REGRESSORS = ("alise", "ridge", "knn")


@dataclass(frozen=True)
class PredictorConfig:
    """How the predictor encodes prompts and learns.

    ``encoders``: (name, weight) pairs from ``encoders.ENCODERS``; the weight scales that block
    of the feature vector (a larger weight means weaker regularisation of it). The first encoder's
    block is the retrieval key. ``regressor``: "alise" (retrieval when neighbours are near, ridge
    otherwise), "ridge" or "knn" (always the k nearest neighbours). ``minilm_layer`` is the MiniLM
    layer both ``minilm`` and ``static`` read. ``feature_cache_size`` 0 disables the feature cache.
    """

    encoders: tuple[tuple[str, float], ...] = DEFAULT_ENCODERS
    regressor: str = "alise"
    minilm_layer: int = 5
    hashed_dim: int = 1024
    ridge_lambda: float = 2.0
    knn_k: int = 8
    knn_threshold: float = 0.9
    knn_temperature: float = 0.05
    max_store: int = 8192
    refit_every: int = 16
    min_observations: int = 8
    prior_tokens: float = 256.0
    max_prediction: float = 32768.0
    feature_cache_size: int = 4096

    def __post_init__(self):
        object.__setattr__(self, "encoders", tuple((str(n), float(w)) for n, w in self.encoders))
        if not self.encoders:
            raise ValueError("encoders must name at least one encoder")
        for name, weight in self.encoders:
            if not weight > 0:
                raise ValueError(f"encoders: weight of {name!r} must be > 0, got {weight}")
        if self.regressor not in REGRESSORS:
            raise ValueError(f"regressor must be one of {REGRESSORS}, got {self.regressor!r}")
        if not 0 < self.knn_threshold <= 1:
            raise ValueError(f"knn_threshold must be in (0, 1], got {self.knn_threshold}")
        for name in ("knn_k", "max_store", "refit_every", "min_observations", "hashed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.feature_cache_size < 0:
            raise ValueError(f"feature_cache_size must be >= 0, got {self.feature_cache_size}")
        for name in ("ridge_lambda", "knn_temperature", "prior_tokens", "max_prediction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def build_encoders(self) -> list[TextEncoder]:
        options = {"minilm": {"layer": self.minilm_layer}, "static": {"layer": self.minilm_layer},
                   "hashed": {"dim": self.hashed_dim}}
        return [make_encoder(name, **options.get(name, {})) for name, _ in self.encoders]


class OutputLengthPredictor:
    """Predicts output lengths (tokens) from prompt text; learns from every finished request.

    ``encoders`` overrides ``config.build_encoders()`` (same order as ``config.encoders``), e.g. to
    share one loaded MiniLM between predictors.
    """

    def __init__(self, config: PredictorConfig | None = None, encoders: Sequence[TextEncoder] | None = None):
        self.config = config or PredictorConfig()
        self._encoders = list(encoders) if encoders is not None else self.config.build_encoders()
        if len(self._encoders) != len(self.config.encoders):
            raise ValueError(f"got {len(self._encoders)} encoders for config.encoders {self.config.encoders}")
        self._block_weights = [w for _, w in self.config.encoders]
        self._key_dim = self._encoders[0].dim
        self.dim = sum(e.dim for e in self._encoders)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Ridge sufficient statistics (float64: X^T X accumulates many updates). Observations wait in
        # _pending until the next refit folds them in with one matmul (an observe stays O(dim)).
        self._xtx = np.zeros((self.dim, self.dim))
        self._xty = np.zeros(self.dim)
        self._xsum = np.zeros(self.dim)
        self._ysum = 0.0
        self._n = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._since_refit = 0
        self._coef: np.ndarray | None = None
        self._fitted_n = 0  # observations in the current fit
        self._intercept = 0.0
        # Retrieval store: a ring buffer of (unit key, log length).
        self._keys = np.zeros((self.config.max_store, self._key_dim), np.float32)
        self._logs = np.zeros(self.config.max_store)
        self._stored = 0
        self._next = 0

    @classmethod
    def from_dataset(cls, path: str | Path, config: PredictorConfig | None = None, tokenizer=None):
        """A predictor warm-started from a JSONL file of ``instruction``/``output`` rows (lengths in
        ``tokenizer`` tokens, Mixtral's by default)."""
        texts, lengths = load_rows(path, tokenizer)
        return cls(config).fit(texts, lengths)

    @property
    def num_observations(self) -> int:
        with self._lock:
            return self._n

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 features (cached per text, LRU of ``feature_cache_size``)."""
        out = np.empty((len(texts), self.dim), np.float32)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for i, text in enumerate(texts):
                row = self._cache.get(text)
                if row is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._cache.move_to_end(text)
                    out[i] = row
        if missing:
            new = list(missing)
            weighted = zip(self._encoders, self._block_weights, strict=True)
            blocks = [encoder.encode(new) * np.float32(weight) for encoder, weight in weighted]
            rows = np.concatenate(blocks, axis=1).astype(np.float32)
            with self._cache_lock:
                for text, row in zip(new, rows, strict=True):
                    out[missing[text]] = row
                    self._cache[text] = row.copy()  # not a view: it would pin the whole batch
                    self._cache.move_to_end(text)
                while len(self._cache) > self.config.feature_cache_size:
                    self._cache.popitem(last=False)
        return out

    def fit(self, texts: Sequence[str], lengths: Sequence[float]) -> OutputLengthPredictor:
        """Warm start: add these observations (on top of any earlier ones) and refit now."""
        self.observe_many(texts, lengths, refit=True)
        return self

    def observe(self, text: str, actual_len: float) -> None:
        """Learn from one finished request: its prompt and how many tokens it generated."""
        self.observe_many([text], [actual_len])

    def observe_many(self, texts: Sequence[str], lengths: Sequence[float], refit: bool = False,
                     defer_refit: bool = False) -> None:
        """``refit``: refit now; ``defer_refit``: not even when due (a bulk load in small pieces, then ``refit``)."""
        if len(texts) != len(lengths):
            raise ValueError(f"got {len(texts)} texts but {len(lengths)} lengths")
        if not len(texts):
            return
        logs = np.log(np.maximum(np.asarray(lengths, np.float64), 1.0))
        x = self.features(texts)
        keys = self._retrieval_keys(x)
        with self._lock:
            self._pending.append((x, logs))
            self._ysum += float(logs.sum())
            self._n += len(logs)
            for key, value in zip(keys, logs, strict=True):
                self._keys[self._next] = key
                self._logs[self._next] = value
                self._next = (self._next + 1) % self.config.max_store
            self._stored = min(self._stored + len(logs), self.config.max_store)
            self._since_refit += len(logs)
            due = self._since_refit >= self.config.refit_every or (
                self._coef is None and self._n >= self.config.min_observations)
            if refit or (due and not defer_refit):
                self._refit()

    def refit(self) -> None:
        """Fold every observation so far into the model now (no-op before the first one). The solve
        runs outside the lock: predictions meanwhile use the previous fit."""
        with self._lock:
            if not self._n:
                return
            system = self._system()
        coef, intercept = self._solve(*system[:4])
        with self._lock:
            if system[4] >= self._fitted_n:  # a concurrent refit may have used more observations
                self._coef, self._intercept, self._fitted_n = coef, intercept, system[4]

    @property
    def refit_due(self) -> int:
        """Observations not in the fit yet when a refit is due (``refit_every`` of them, or enough for a
        first fit), else 0. Read without the lock (it never waits for a refit): a hint."""
        cfg, n, waiting = self.config, self._n, self._n - self._fitted_n
        due = waiting >= cfg.refit_every or (self._coef is None and n >= cfg.min_observations)
        return waiting if due else 0

    def cached(self, text: str) -> bool:
        """Whether ``text``'s features are cached, i.e. observing or predicting it costs no encoding."""
        with self._cache_lock:
            return text in self._cache

    def _retrieval_keys(self, x: np.ndarray) -> np.ndarray:
        """Unit-length first blocks of feature rows: cosine similarity is one matmul."""
        block = x[:, :self._key_dim]
        return (block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _refit(self) -> None:
        """Refit with the lock held (tens of ms at the default ~1.4k features)."""
        system = self._system()
        self._coef, self._intercept = self._solve(*system[:4])
        self._fitted_n = system[4]

    def _system(self) -> tuple:
        """Fold pending rows into the sufficient statistics; the centred ridge system (caller holds the lock)."""
        if self._pending:
            x = np.concatenate([rows for rows, _ in self._pending]).astype(np.float64)
            logs = np.concatenate([values for _, values in self._pending])
            self._pending = []
            self._xtx += x.T @ x
            self._xty += x.T @ logs
            self._xsum += x.sum(0)
        n = self._n
        mean_x, mean_y = self._xsum / n, self._ysum / n
        a = self._xtx - n * np.outer(mean_x, mean_x)
        a[np.diag_indices_from(a)] += self.config.ridge_lambda
        self._since_refit = 0
        return a, self._xty - n * mean_x * mean_y, mean_x, mean_y, n

    @staticmethod
    def _solve(a, b, mean_x, mean_y) -> tuple[np.ndarray, float]:
        coef = scipy.linalg.solve(a, b, assume_a="pos", overwrite_a=True)  # Cholesky
        return coef, float(mean_y - mean_x @ coef)

    def predict(self, text: str) -> float:
        """Expected output length of ``text`` in tokens."""
        return float(self.predict_many([text])[0])

    def predict_many(self, texts: Sequence[str]) -> np.ndarray:
        """Expected output lengths (tokens, float64) of ``texts``; batched encoding is cheaper per prompt."""
        if not len(texts):
            return np.zeros(0)
        x = self.features(texts)
        cfg = self.config
        with self._lock:
            n = self._n
            if n < cfg.min_observations or self._coef is None:
                log_mean = self._ysum / n if n else math.log(cfg.prior_tokens)
                return np.full(len(texts), min(math.exp(log_mean), cfg.max_prediction))
            log_pred = x.astype(np.float64) @ self._coef + self._intercept
            if cfg.regressor != "ridge":
                sims = self._retrieval_keys(x) @ self._keys[:self._stored].T
                log_pred = self._retrieve(sims, self._logs[:self._stored], log_pred)
        return np.clip(np.exp(log_pred), 1.0, cfg.max_prediction)

    def _retrieve(self, sims: np.ndarray, logs: np.ndarray, ridge: np.ndarray) -> np.ndarray:
        """kNN estimate blended with ``ridge``: all kNN for "knn"; for "alise" the neighbours' share
        grows linearly from 0 at ``knn_threshold`` to 1 at identical prompts."""
        cfg = self.config
        k = min(cfg.knn_k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        best = top_sims.max(1, keepdims=True)
        weights = np.exp((top_sims - best) / cfg.knn_temperature)
        if cfg.regressor == "alise":
            weights = weights * (top_sims >= cfg.knn_threshold)
        total = weights.sum(1)
        knn = (weights * logs[top]).sum(1) / np.maximum(total, 1e-12)
        if cfg.regressor == "knn":
            return knn
        share = np.clip((best[:, 0] - cfg.knn_threshold) / max(1.0 - cfg.knn_threshold, 1e-6), 0.0, 1.0)
        share = np.where(total > 0, share, 0.0)
        return share * knn + (1.0 - share) * ridge


class PredictionQueue:
    """The engine's non-blocking side of a threaded predictor: jobs go to ``_put`` (a worker's queue)."""

    def submit(self, key: Hashable, prompt: object) -> None:
        self._put(("predict", key, prompt, None))

    def predict_async(self, prompt: object) -> Future:
        """A future of the prediction (the fast tier's, for a tiered predictor)."""
        future: Future = Future()
        self._put(("predict", None, prompt, future))
        return future

    def observe(self, prompt: object, actual_len: float) -> None:
        self._put(("observe", None, prompt, float(actual_len)))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, job) -> None:
        raise NotImplementedError

    def close(self, wait: bool = True) -> None:
        raise NotImplementedError

    def _next_batch(self) -> tuple[list, bool]:
        """Wait for a job on ``_queue``, take up to ``_max_batch`` queued; (jobs, whether close's None was one)."""
        jobs = [self._queue.get()]
        while len(jobs) < self._max_batch and not self._queue.empty():
            jobs.append(self._queue.get())
        return [job for job in jobs if job is not None], None in jobs


class AsyncPredictor(PredictionQueue):
    """Runs an ``OutputLengthPredictor`` on one worker thread so callers never wait for it.

    ``submit(key, prompt)`` queues a prediction and returns at once; ``get(key, default)`` returns
    it when ready (else ``default``). ``observe(prompt, n)`` queues a finished request for online
    learning. ``predict_async(prompt)`` returns a ``concurrent.futures.Future``. Queued work is
    done in batches of up to ``max_batch`` prompts (batched encoding is cheaper per prompt).
    ``text_of`` turns whatever is submitted into text on the worker thread, e.g. detokenising
    prompt token ids. Results are kept for the latest ``max_results`` keys; ``forget(key)`` drops
    one early. Encoded prompts are cached by the predictor, so a repeated prompt is cheap.
    """

    def __init__(self, predictor: OutputLengthPredictor, text_of: Callable[[object], str] | None = None,
                 max_batch: int = 32, max_results: int = 65536):
        self.predictor = predictor
        self._text_of = text_of or str
        self._max_batch = max_batch
        self._max_results = max_results
        self._results: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="length-predictor", daemon=True)
        self._thread.start()

    def get(self, key: Hashable, default: float | None = None) -> float | None:
        with self._lock:
            return self._results.get(key, default)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._results.pop(key, None)

    def close(self, wait: bool = True) -> None:
        """Stop the worker after the queued work; later submissions raise ``RuntimeError``."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        if wait:
            self._thread.join()

    def _put(self, job) -> None:
        if self._closed:
            raise RuntimeError("AsyncPredictor is closed")
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            jobs, stop = self._next_batch()
            try:
                self._process([j for j in jobs if j[0] == "observe"], [j for j in jobs if j[0] == "predict"])
            except Exception as exc:  # the worker must survive one bad batch
                logger.exception("length predictor batch of %d jobs failed", len(jobs))
                for job in jobs:
                    if isinstance(job[3], Future) and not job[3].done():
                        job[3].set_exception(exc)
            if stop:
                return

    def _process(self, observes: list, predicts: list) -> None:
        if observes:
            self.predictor.observe_many([self._text_of(j[2]) for j in observes], [j[3] for j in observes])
        if not predicts:
            return
        values = self.predictor.predict_many([self._text_of(j[2]) for j in predicts])
        with self._lock:
            for (_, key, _, _), value in zip(predicts, values, strict=True):
                if key is not None:
                    self._results[key] = float(value)
                    self._results.move_to_end(key)
            while len(self._results) > self._max_results:
                self._results.popitem(last=False)
        for (_, _, _, future), value in zip(predicts, values, strict=True):
            if future is not None:
                future.set_result(float(value))
