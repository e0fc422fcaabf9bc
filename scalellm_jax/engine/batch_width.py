"""How many sequences to run at once: a narrower batch when it is clearly faster and keeps up.

Shortest-first can only reorder requests that wait, and with many seats almost nothing waits below
capacity, so on its own it changes little there. But a step's time depends on its width: on CPU a
decode step of 64 rows can cost nearly twice one of 32 (a power-of-two bucket further up), while
adding only a little throughput. Running the narrower width makes every running request's tokens
come faster, and the requests that then wait are exactly the ones shortest-first orders well.

``BatchWidth`` picks the *narrow width*: the widest measured decode bucket whose step time is at
least ``step_saving`` below the full width's. It caps admissions there while (a) that width's
decode throughput, less the time prefill takes, covers the recent arrivals' predicted output
tokens ``headroom`` times over, and (b) the waiting queue's predicted work would take no more than
``backlog_steps`` narrow steps. Otherwise every seat is open. Where step time hardly depends on
width (a GPU decode is memory-bound) no bucket is faster and nothing is ever capped. Requests
already running above a new cap are never preempted for it; they finish and the batch narrows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scalellm_jax.engine.request import Request
from scalellm_jax.engine.step_costs import StepCostModel

MIN_ARRIVALS = 8  # fewer recent arrivals than this: no demand estimate, so no cap


@dataclass(frozen=True)
class BatchWidthConfig:
    step_saving: float = 0.2  # the narrow width's decode step must be this fraction faster (>= 1: never narrow)
    headroom: float = 1.0  # narrow throughput / predicted demand at least this
    backlog_steps: float = 200.0  # waiting predicted tokens / narrow width above this: open every seat
    window: int = 64  # recent arrivals the demand estimate averages over

    def __post_init__(self):
        if self.step_saving <= 0:
            raise ValueError(f"step_saving must be > 0, got {self.step_saving}")
        if self.headroom < 1:
            raise ValueError(f"headroom must be >= 1, got {self.headroom}")
        if self.backlog_steps < 0:
            raise ValueError(f"backlog_steps must be >= 0, got {self.backlog_steps}")
        if self.window < MIN_ARRIVALS:
            raise ValueError(f"window must be >= {MIN_ARRIVALS}, got {self.window}")


class BatchWidth:
    """The seat limit for the next admission round (see the module docstring)."""

    def __init__(self, costs: StepCostModel, config: BatchWidthConfig,
                 output_tokens: Callable[[Request], float], remaining_tokens: Callable[[Request], float]):
        """``output_tokens``: a request's predicted total output; ``remaining_tokens``: still to generate."""
        self.costs = costs
        self.config = config
        self._output_tokens = output_tokens
        self._remaining_tokens = remaining_tokens
        self._arrivals: deque[Request] = deque(maxlen=config.window)

    def on_arrival(self, request: Request) -> None:
        self._arrivals.append(request)

    def narrow_width(self, max_num_seqs: int) -> int | None:
        """The widest measured bucket clearly faster than the full width, if both are measured."""
        full_s = self.costs.decode_step_s_at(max_num_seqs)
        if full_s is None:
            return None
        limit = (1.0 - self.config.step_saving) * full_s
        fast = [rows for rows, seconds in self.costs.decode_buckets_s().items()
                if rows < max_num_seqs and seconds <= limit]
        return max(fast) if fast else None

    def seat_limit(self, max_num_seqs: int, waiting: Sequence[Request], now: float) -> int:
        narrow = self.narrow_width(max_num_seqs)
        if narrow is None or len(self._arrivals) < MIN_ARRIVALS:
            return max_num_seqs
        span = now - self._arrivals[0].arrival_time
        if span <= 0:
            return max_num_seqs
        c = self.config
        demand_tokens_s = sum(self._output_tokens(r) for r in self._arrivals) / span
        prefill_share = sum(r.num_prompt_tokens for r in self._arrivals) * self.costs.prefill_token_s / span
        narrow_tokens_s = narrow / self.costs.decode_step_s_at(narrow) * max(0.0, 1.0 - prefill_share)
        if demand_tokens_s * c.headroom > narrow_tokens_s:
            return max_num_seqs
        backlog, limit = 0.0, c.backlog_steps * narrow
        for request in waiting:  # stops at the limit: under overload the queue can be long
            backlog += self._remaining_tokens(request)
            if backlog > limit:
                return max_num_seqs
        return narrow
