"""Per-step execution costs, calibrated online from measured step times.

ALISE ranks requests by estimated remaining *time*, so token counts must become seconds: a
decode step (one token for every running request) and a prefill token have very different
costs, and both depend on the hardware and the model. The engine reports every step it runs;
this model keeps exponential moving averages of the decode-step time and of the time per
prefill token (a mixed step's time minus one decode step, over its prefill tokens).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


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

    def __init__(self, prior: StepCostPrior | None = None):
        prior = prior or StepCostPrior()
        self._alpha = prior.smoothing
        self.decode_step_s = prior.decode_step_s
        self.prefill_token_s = prior.prefill_token_s
        self.num_observed = 0
        self._lock = threading.Lock()

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
                return
            # A mixed step costs about one decode step plus its prefill tokens.
            per_token = max(seconds - (self.decode_step_s if decode_rows else 0.0), 0.0) / prefill_tokens
            if per_token > 0:
                self.prefill_token_s += a * (per_token - self.prefill_token_s)

    def estimate_s(self, *, prefill_tokens: float, decode_steps: float) -> float:
        """Seconds to prefill ``prefill_tokens`` and then run ``decode_steps`` decode steps."""
        return prefill_tokens * self.prefill_token_s + decode_steps * self.decode_step_s
