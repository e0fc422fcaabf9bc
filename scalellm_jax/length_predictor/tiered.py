"""Two-tier output-length prediction: a fast estimate for every request at once, the accurate one
when the host has time.

Neither predictor alone meets the serving budget: the default encoders (hashed n-grams + static
MiniLM + layout + cues) cost well under a millisecond of CPU per prompt but rank lengths less well
than the full MiniLM (``MINILM_ENCODERS``), which costs tens of milliseconds per prompt
(``benchmarks/results/predictor-*.json``). ``TieredPredictor`` runs both on two worker threads:

* The fast thread owns the queue the engine feeds (``submit``/``observe``, which never block). It
  predicts everything queued in one batch with the fast predictor and publishes the value at once
  (``get`` returns it, ``tier`` says ``"fast"``); it feeds observations to the fast predictor.
* The refine thread works only while no fast work is queued or in progress, one prompt at a time
  (MiniLM costs less per prompt unbatched, and a short unit lets a burst take over sooner): it
  re-predicts live requests with the accurate predictor and replaces the published value (tier
  ``"accurate"``). Newest request first: under a backlog, the newest requests are the ones still
  waiting for their first scheduling, where a better rank matters most, while the oldest have
  mostly been scheduled already; a request that finishes (``forget``) before its turn is skipped.
* The fast tier learns each observation at once but refits (tens of ms of CPU) on the refine thread,
  so a burst does not wait for it either (unless ``8 * refit_every`` observations pile up).
* Observations reach the accurate predictor on the refine thread: first those whose prompt it has
  encoded already (a refined request: no MiniLM pass), then refinements, then the others (a bounded
  backlog, oldest dropped first). A warm start for the accurate tier (``accurate_warm_start``) is
  learned there too, one prompt per step, so building does not wait seconds for MiniLM; refinements
  start once it is done.

Under a burst the fast tier keeps up and the refine thread waits; when the host is idle every live
request gets the accurate prediction. ``info(key)`` tells when each tier's value appeared and
``stats()`` how much CPU each thread spent, for tests and metrics.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from scalellm_jax.length_predictor.predictor import OutputLengthPredictor, PredictionQueue

logger = logging.getLogger(__name__)

FAST, ACCURATE = "fast", "accurate"
_INLINE_REFIT = 8  # the fast thread refits itself once this many refit_every's worth of observations wait
REFINE_ORDERS = ("newest", "oldest")


@dataclass(frozen=True)
class PredictionInfo:
    """A key's current prediction, the tier it came from and when each tier published (``time.monotonic``)."""

    value: float
    tier: str
    submitted: float
    fast_at: float
    accurate_at: float | None


class _Entry:
    __slots__ = ("value", "tier", "seq", "text", "submitted", "fast_at", "accurate_at")

    def __init__(self, value, seq, text, submitted, fast_at):
        self.value, self.tier, self.seq, self.text = value, FAST, seq, text
        self.submitted, self.fast_at, self.accurate_at = submitted, fast_at, None


class TieredPredictor(PredictionQueue):
    """``AsyncPredictor``'s interface over a fast and an accurate ``OutputLengthPredictor``.

    ``accurate=None`` runs the fast tier alone. ``text_of`` turns what is submitted into text (on
    the fast thread; the text is kept for the refinement). ``max_batch``: fast-tier batch size.
    ``max_results``: keys whose predictions are kept (LRU). ``refine_order``: "newest" (default)
    or "oldest" first. ``accurate_warm_start``: (texts, lengths) the accurate tier learns in the
    background before it refines anything. ``max_backlog``: observations of prompts the accurate
    tier has not encoded that may wait for it.
    """

    def __init__(self, fast: OutputLengthPredictor, accurate: OutputLengthPredictor | None = None,
                 text_of: Callable[[object], str] | None = None, max_batch: int = 32, max_results: int = 65536,
                 refine_order: str = "newest",
                 accurate_warm_start: tuple[Sequence[str], Sequence[float]] | None = None,
                 max_backlog: int = 4096):
        if refine_order not in REFINE_ORDERS:
            raise ValueError(f"refine_order must be one of {REFINE_ORDERS}, got {refine_order!r}")
        self.fast, self.accurate = fast, accurate
        self._text_of = text_of or str
        self._max_batch, self._max_results = max_batch, max_results
        self._newest_first = refine_order == "newest"
        self._cv = threading.Condition(threading.Lock())
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding = 0  # fast-tier jobs queued or being processed
        self._results: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._refine: OrderedDict[Hashable, int] = OrderedDict()  # key -> seq of the entry to refine
        self._seq = 0
        self._cheap_obs: list[tuple[str, float]] = []  # prompts the accurate tier has encoded already
        self._costly_obs: deque[tuple[str, float]] = deque()
        self._max_backlog = max_backlog
        self._warm: deque[tuple[str, float]] = deque()
        if accurate is not None and accurate_warm_start is not None:
            texts, lengths = accurate_warm_start
            if len(texts) != len(lengths):
                raise ValueError(f"accurate_warm_start: {len(texts)} texts but {len(lengths)} lengths")
            self._warm.extend(zip(texts, map(float, lengths), strict=True))
        self._accurate_ready = not self._warm
        self._slow_busy = False
        self._closed = False
        self._stats = dict(fast_predictions=0, fast_batches=0, fast_cpu_s=0.0, refined=0, refine_cpu_s=0.0,
                           refine_skipped=0, accurate_observed=0, observes_dropped=0, warm_cpu_s=0.0,
                           fast_refits_idle=0, refit_cpu_s=0.0)
        self._fast_thread = threading.Thread(target=self._run_fast, name="length-predictor", daemon=True)
        self._fast_thread.start()
        self._slow_thread = None
        if accurate is not None:
            self._slow_thread = threading.Thread(target=self._run_slow, name="length-refiner", daemon=True)
            self._slow_thread.start()

    @property
    def predictor(self) -> OutputLengthPredictor:
        """The fast tier (``AsyncPredictor.predictor``'s counterpart)."""
        return self.fast

    # ---- the engine's side: none of these wait for a prediction ----

    def get(self, key: Hashable, default: float | None = None) -> float | None:
        with self._cv:
            entry = self._results.get(key)
            return default if entry is None else entry.value

    def tier(self, key: Hashable) -> str | None:
        """"fast" or "accurate": where ``get(key)`` comes from now (None before the first)."""
        with self._cv:
            entry = self._results.get(key)
            return None if entry is None else entry.tier

    def info(self, key: Hashable) -> PredictionInfo | None:
        with self._cv:
            e = self._results.get(key)
            return None if e is None else PredictionInfo(e.value, e.tier, e.submitted, e.fast_at, e.accurate_at)

    def forget(self, key: Hashable) -> None:
        with self._cv:
            self._results.pop(key, None)
            if self._refine.pop(key, None) is not None:
                self._stats["refine_skipped"] += 1

    @property
    def accurate_ready(self) -> bool:
        """Whether the accurate tier has learned its warm start and refines predictions."""
        with self._cv:
            return self.accurate is not None and self._accurate_ready

    def stats(self) -> dict:
        """Counters: predictions per tier, CPU seconds per thread, refinements skipped, observations."""
        with self._cv:
            return dict(self._stats, pending_refinements=len(self._refine), warm_rows_left=len(self._warm),
                        observe_backlog=len(self._costly_obs) + len(self._cheap_obs))

    def flush(self, timeout: float | None = None, refine: bool = True) -> bool:
        """Wait until the fast tier (and, with ``refine``, the accurate tier) has nothing left to do;
        False on timeout. For tests and benchmarks: the engine never waits."""
        def idle():
            if self._outstanding:
                return False
            return not refine or self._slow_thread is None or self._closed or not (
                self._slow_busy or self._slow_work())

        with self._cv:
            return self._cv.wait_for(idle, timeout)

    def close(self, wait: bool = True) -> None:
        """Stop after the queued fast-tier work; pending refinements are dropped. Later submissions
        raise ``RuntimeError``."""
        with self._cv:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
                self._cv.notify_all()
        if wait:
            self._fast_thread.join()
            if self._slow_thread is not None:
                self._slow_thread.join()

    def _put(self, job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("TieredPredictor is closed")
            self._outstanding += 1
            self._queue.put((*job, time.monotonic()))

    # ---- fast tier ----

    def _run_fast(self) -> None:
        while True:
            jobs, stop = self._next_batch()
            try:
                self._fast_batch(jobs)
            except Exception as exc:  # the worker must survive one bad batch
                logger.exception("length predictor batch of %d jobs failed", len(jobs))
                for job in jobs:
                    if isinstance(job[3], Future) and not job[3].done():
                        job[3].set_exception(exc)
            finally:
                with self._cv:
                    self._outstanding -= len(jobs)
                    self._cv.notify_all()
            if stop:
                return

    def _fast_batch(self, jobs: list) -> None:
        cpu = time.thread_time()
        observes, predicts, texts = [], [], []
        for job in jobs:  # a prompt that cannot be turned into text fails alone, not its batch
            try:
                text = self._text_of(job[2])
            except Exception as exc:
                logger.exception("length predictor: cannot read a prompt")
                if isinstance(job[3], Future):
                    job[3].set_exception(exc)
                continue
            if job[0] == "observe":
                observes.append((text, job[3]))
            else:
                predicts.append(job)
                texts.append(text)
        if observes:  # with two tiers, the fast tier's refit (tens of ms) waits for idle time too
            deferred = self.accurate is not None
            self.fast.observe_many([t for t, _ in observes], [n for _, n in observes], defer_refit=deferred)
            if deferred and self.fast.refit_due >= _INLINE_REFIT * self.fast.config.refit_every:
                self.fast.refit()  # never idle for that long: learn anyway
        values = self.fast.predict_many(texts) if predicts else []
        if self.accurate is not None:  # a refined prompt's encoding is in the accurate tier's cache
            cached = [self.accurate.cached(text) for text, _ in observes]
        now = time.monotonic()
        with self._cv:
            for (_, key, _, _, submitted), text, value in zip(predicts, texts, values, strict=True):
                if key is None:
                    continue
                self._seq += 1
                self._results[key] = _Entry(float(value), self._seq, text, submitted, now)
                self._results.move_to_end(key)
                if self.accurate is not None:
                    self._refine[key] = self._seq
                    self._refine.move_to_end(key)
            while len(self._results) > self._max_results:
                key, _ = self._results.popitem(last=False)
                self._refine.pop(key, None)
            if self.accurate is not None and observes:
                for row, cheap in zip(observes, cached, strict=True):
                    (self._cheap_obs if cheap else self._costly_obs).append(row)
                while len(self._costly_obs) > self._max_backlog:
                    self._costly_obs.popleft()
                    self._stats["observes_dropped"] += 1
            self._stats["fast_predictions"] += len(predicts)
            self._stats["fast_batches"] += 1
            self._stats["fast_cpu_s"] += time.thread_time() - cpu
        for (_, _, _, future, _), value in zip(predicts, values, strict=True):
            if future is not None:
                future.set_result(float(value))

    # ---- accurate tier ----

    def _slow_work(self) -> bool:
        return bool(self._cheap_obs or self._warm or self._costly_obs or (self._refine and self._accurate_ready)
                    or self.fast.refit_due)

    def _next_unit(self):
        """The refine thread's next step (the caller holds the lock and has checked the fast tier is idle)."""
        if self.fast.refit_due:
            return ("refit_fast",)
        if self._cheap_obs:
            unit, self._cheap_obs = ("observe", self._cheap_obs), []
            return unit
        if self._warm:
            return ("warm", [self._warm.popleft()], not self._warm)
        if self._refine and self._accurate_ready:
            key, seq = self._refine.popitem(last=self._newest_first)
            entry = self._results.get(key)
            if entry is not None and entry.seq == seq:
                return ("refine", key, seq, entry.text)
            return ("skip",)
        if self._costly_obs:
            return ("observe", [self._costly_obs.popleft()])
        return None

    def _run_slow(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        self._slow_busy = False
                        self._cv.notify_all()
                        return
                    unit = self._next_unit() if self._outstanding == 0 else None
                    if unit is not None:
                        break
                    if self._slow_busy:
                        self._slow_busy = False
                        self._cv.notify_all()  # flush() waits for this
                    self._cv.wait()
                self._slow_busy = True
            try:
                self._slow_step(unit)
            except Exception:
                logger.exception("length predictor: accurate tier step %s failed", unit[0])

    def _slow_step(self, unit) -> None:
        kind, cpu = unit[0], time.thread_time()
        if kind == "skip":
            return
        if kind == "refit_fast":
            self.fast.refit()
            with self._cv:
                self._stats["fast_refits_idle"] += 1
                self._stats["refit_cpu_s"] += time.thread_time() - cpu
            return
        if kind == "refine":
            _, key, seq, text = unit
            value = float(self.accurate.predict_many([text])[0])
            now = time.monotonic()
            with self._cv:
                entry = self._results.get(key)
                if entry is not None and entry.seq == seq:  # still live, not resubmitted
                    entry.value, entry.tier, entry.accurate_at = value, ACCURATE, now
                    self._stats["refined"] += 1
                self._stats["refine_cpu_s"] += time.thread_time() - cpu
            return
        rows = unit[1]
        if kind == "warm":
            try:
                self.accurate.observe_many([t for t, _ in rows], [n for _, n in rows], defer_refit=True)
            finally:
                if unit[2]:  # the last warm-start row: fit, then start refining
                    self.accurate.refit()
                    with self._cv:
                        self._accurate_ready = True
                    logger.info("length predictor: accurate tier warm-started (%d observations)",
                                self.accurate.num_observations)
                with self._cv:
                    self._stats["warm_cpu_s"] += time.thread_time() - cpu
            return
        self.accurate.observe_many([t for t, _ in rows], [n for _, n in rows])
        with self._cv:
            self._stats["accurate_observed"] += len(rows)
