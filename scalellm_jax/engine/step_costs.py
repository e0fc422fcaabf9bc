"""Per-step execution costs, calibrated online from measured step times.

ALISE ranks requests by estimated remaining *time*, so token counts must become seconds: a
decode step (one token for every running request) and a prefill token have very different
costs, and both depend on the hardware and the model. The engine reports every step it runs;
this model keeps exponential moving averages of the decode-step time and of the time per
prefill token (a mixed step's time minus one decode step, over its prefill tokens). It also keeps
one average per decode shape bucket (the runner pads a decode step's rows up to a bucket), which
is what ``batch_width`` compares to decide how many sequences to run at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from scalellm_jax.engine.buckets import bucket_for


@dataclass(frozen=True)
class StepCostPrior:
    """Starting values before anything is measured, and the averaging rate."""

    decode_step_s: float = 0.05
    prefill_token_s: float = 0.001
    smoothing: float = 0.1  # weight of each new measurement in the moving averages

    def __post_init__(self):
        if self.decode_step_s <= 0 or self.prefill_token_s <= 0:
            raise ValueError("step cost priors must be > 0")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")


class StepCostModel:
    """Moving averages of seconds per decode step and per prefill token (thread-safe)."""

    def __init__(self, prior: StepCostPrior | None = None, decode_buckets: tuple[int, ...] | None = None):
        """``decode_buckets``: the runner's decode row buckets (default: powers of two)."""
        prior = prior or StepCostPrior()
        self._alpha = prior.smoothing
        self.decode_step_s = prior.decode_step_s
        self.prefill_token_s = prior.prefill_token_s
        self.num_observed = 0
        self._buckets = tuple(sorted(decode_buckets)) if decode_buckets else None
        self._bucket_s: dict[int, float] = {}  # decode bucket → moving average, once measured
        self._lock = threading.Lock()

    def bucket(self, rows: int) -> int:
        """The decode bucket ``rows`` rows are padded up to (the largest for more rows than that)."""
        if self._buckets is None:
            return 1 << max(0, rows - 1).bit_length()
        return bucket_for(min(rows, self._buckets[-1]), self._buckets)

    def decode_step_s_at(self, rows: int) -> float | None:
        """Measured seconds of a decode step of ``rows`` rows (its bucket's average), or None."""
        with self._lock:
            return self._bucket_s.get(self.bucket(rows))

    def decode_buckets_s(self) -> dict[int, float]:
        """Every measured decode bucket's average step seconds."""
        with self._lock:
            return dict(self._bucket_s)

    def observe(self, *, prefill_tokens: int, decode_rows: int, seconds: float) -> None:
        """Record one step that ran ``prefill_tokens`` prompt tokens and ``decode_rows`` decodes."""
        if seconds <= 0:
            return
        a = self._alpha
        with self._lock:
            self.num_observed += 1
            if prefill_tokens == 0:
                if decode_rows:
                    self.decode_step_s += a * (seconds - self.decode_step_s)
                    bucket = self.bucket(decode_rows)
                    before = self._bucket_s.get(bucket)
                    self._bucket_s[bucket] = seconds if before is None else before + a * (seconds - before)
                return
            # A mixed step costs about one decode step plus its prefill tokens.
            per_token = max(seconds - (self.decode_step_s if decode_rows else 0.0), 0.0) / prefill_tokens
            if per_token > 0:
                self.prefill_token_s += a * (per_token - self.prefill_token_s)

    def estimate_s(self, *, prefill_tokens: float, decode_steps: float) -> float:
        """Seconds to prefill ``prefill_tokens`` and then run ``decode_steps`` decode steps."""
        return prefill_tokens * self.prefill_token_s + decode_steps * self.decode_step_s
