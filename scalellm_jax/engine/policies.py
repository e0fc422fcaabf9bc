"""Scheduling policies: who is admitted first, who is preempted, and when preempting is worth it.

The scheduler owns the mechanics (token budget, KV allocation, swap or recompute); a policy only
ranks requests. Every policy here is a ``rank(request, now)``: smaller runs sooner. Waiting
requests are admitted in rank order; the running request with the largest rank is the victim
when pages run out; ``should_preempt`` says whether a waiting request deserves a seat (or pages)
taken from a running one.

A policy must rank consistently: the victim it picks among running requests is one it would
admit last, and ``should_preempt(a, b)`` implies ``a`` outranks ``b``. The scheduler relies on
that for progress: the best-ranked running request is never preempted while others run, so it
always finishes.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

from scalellm_jax.config import DEFAULT_AGING_RATE
from scalellm_jax.engine.batch_width import BatchWidth, BatchWidthConfig
from scalellm_jax.engine.request import Request
from scalellm_jax.engine.step_costs import StepCostModel


class Policy(abc.ABC):
    name: str

    @abc.abstractmethod
    def rank(self, request: Request, now: float) -> tuple:
        """Sort key: smaller runs sooner."""

    def order_waiting(self, waiting: list[Request], now: float) -> list[Request]:
        """The waiting requests in admission order (a new list; the input is not modified)."""
        return sorted(waiting, key=lambda r: self.rank(r, now))

    def pick_victim(self, running: list[Request], now: float) -> Request:
        """The running request to preempt (non-empty input): the one ranked last."""
        if not running:
            raise ValueError("pick_victim needs at least one running request")
        return max(running, key=lambda r: self.rank(r, now))

    def should_preempt(self, candidate: Request, victim: Request, now: float) -> bool:
        """Whether waiting ``candidate`` may take the seat or pages of running ``victim``."""
        return False

    def seat_limit(self, max_num_seqs: int, waiting: list[Request], now: float) -> int:
        """How many requests may run after this step's admissions (running ones above it stay)."""
        return max_num_seqs

    def on_add(self, request: Request) -> None:  # noqa: B027 (optional hook, nothing by default)
        """A request entered the scheduler (e.g. start predicting its length)."""

    def on_finish(self, request: Request) -> None:  # noqa: B027 (optional hook, nothing by default)
        """A request left the scheduler, finished or aborted (e.g. learn its real length)."""


class FCFSPolicy(Policy):
    """First come, first served; ties broken by request id so the order is deterministic.

    Preempted requests keep their arrival time, so they go back to the front of the queue. FCFS
    never preempts to admit: the head of the line waits its turn (and so does everyone behind it).
    """

    name = "fcfs"

    def rank(self, request: Request, now: float) -> tuple:
        return (request.arrival_time, request.request_id)


class PriorityPolicy(Policy):
    """Lower ``priority`` value first (as in vLLM), then first come, first served.

    A waiting request with a strictly better priority preempts the worst running one.
    """

    name = "priority"

    def rank(self, request: Request, now: float) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)

    def should_preempt(self, candidate: Request, victim: Request, now: float) -> bool:
        return candidate.priority < victim.priority


class LengthEstimates(Protocol):
    """Predicted output lengths in tokens (ALISE's predictor, or an oracle in simulations)."""

    def start(self, request: Request) -> None:
        """Begin predicting ``request``'s output length (must not block)."""

    def predicted(self, request: Request) -> float | None:
        """The prediction, or None while it is not ready (never blocks)."""

    def finish(self, request: Request) -> None:
        """The request is done: forget it, and learn from its real length if it finished normally."""


@dataclass(frozen=True)
class AliseConfig:
    """Knobs of the ALISE policy (all times in seconds of estimated execution).

    ``aging_rate``: seconds of estimated work forgiven per second waited; any positive rate bounds
    every request's wait (a long request's rank keeps falling until it beats any newcomer).
    ``priority_weight_s``: one step of user ``priority`` counts as this much estimated work.
    ``preempt_ratio``: a waiting request preempts a running one only if the victim's remaining
    work is at least this many times the candidate's (or its priority is worse), so that swaps
    are paid only for a clear gain. ``overrun_factor``: a request that outlives its prediction is
    assumed to run this many times its current output length in total. ``narrow_*``: the
    ``batch_width`` knobs (``BatchWidthConfig`` without the prefix); ``narrow_step_saving >= 1``
    turns width control off.
    """

    aging_rate: float = DEFAULT_AGING_RATE
    priority_weight_s: float = 10.0
    preempt_ratio: float = 4.0
    overrun_factor: float = 1.5
    default_output_len: float = 256.0  # before the first prediction (or observation) is in
    narrow_step_saving: float = 0.2
    narrow_headroom: float = 1.0  # sim-tuned: 1.25 narrowed too rarely to help at loads 0.7-0.8
    narrow_backlog_steps: float = 200.0
    narrow_window: int = 64

    def __post_init__(self):
        for name in ("aging_rate", "priority_weight_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.preempt_ratio < 1:
            raise ValueError(f"preempt_ratio must be >= 1, got {self.preempt_ratio}")
        if self.overrun_factor <= 1:
            raise ValueError(f"overrun_factor must be > 1, got {self.overrun_factor}")
        if self.narrow_window != int(self.narrow_window):
            raise ValueError(f"narrow_window must be a whole number, got {self.narrow_window}")
        try:
            self.batch_width()  # validates the narrow_* knobs
        except ValueError as exc:
            raise ValueError(f"narrow_{exc}") from None

    def batch_width(self) -> BatchWidthConfig:
        return BatchWidthConfig(step_saving=self.narrow_step_saving, headroom=self.narrow_headroom,
                                backlog_steps=self.narrow_backlog_steps, window=int(self.narrow_window))


class AlisePolicy(Policy):
    """ALISE: shortest estimated remaining execution time first, with aging and user priority.

    rank = remaining_s + priority × priority_weight_s − aging_rate × waited_s, where remaining_s
    is the estimated time to finish: prompt tokens still to prefill (less those the prefix cache
    holds) times the measured prefill cost per token, plus predicted output tokens still to
    generate times the measured decode step time (``StepCostModel``, calibrated online from real
    steps). It also runs fewer sequences at once when that is clearly faster and keeps up
    (``batch_width``).
    """

    name = "alise"

    def __init__(self, lengths: LengthEstimates, costs: StepCostModel, config: AliseConfig | None = None):
        self.lengths = lengths
        self.costs = costs
        self.config = config = config or AliseConfig()
        self.width = None
        if config.narrow_step_saving < 1:
            self.width = BatchWidth(costs, config.batch_width(), self.output_tokens, self.remaining_output_tokens)

    def output_tokens(self, request: Request) -> float:
        """Predicted total output tokens (the default before a prediction is in), within max_tokens."""
        predicted = self.lengths.predicted(request)
        if predicted is None:
            predicted = self.config.default_output_len
        return min(predicted, request.sampling_params.max_tokens)

    def remaining_output_tokens(self, request: Request) -> float:
        generated = request.num_output_tokens
        predicted = self.output_tokens(request)
        if generated >= predicted:  # outlived its prediction: expect it to run a while longer
            predicted = min(self.config.overrun_factor * generated, request.sampling_params.max_tokens)
        return max(predicted - generated, 1.0)

    def remaining_s(self, request: Request) -> float:
        # a prompt, or a recompute, less what the prefix cache holds for it
        prefill = request.num_pending_tokens - request.cached_prefix_hint if request.is_prefilling else 0
        return self.costs.estimate_s(prefill_tokens=prefill, decode_steps=self.remaining_output_tokens(request))

    def rank(self, request: Request, now: float) -> tuple:
        c = self.config
        score = self.remaining_s(request) + c.priority_weight_s * request.priority - c.aging_rate * request.waited(now)
        return (score, request.arrival_time, request.request_id)

    def should_preempt(self, candidate: Request, victim: Request, now: float) -> bool:
        """A better user priority, or (same priority) ``preempt_ratio`` × less remaining work.

        Aging orders the queue but never preempts: two similar requests whose ranks cross as one
        waits would otherwise take turns evicting each other and neither would finish. With the
        work ratio, the victim (whose remaining work only grows by being preempted) can never
        win its place back from the candidate until the candidate overruns its prediction.
        """
        if self.rank(candidate, now) >= self.rank(victim, now):
            return False
        if candidate.priority != victim.priority:
            return candidate.priority < victim.priority
        return self.remaining_s(victim) >= self.config.preempt_ratio * self.remaining_s(candidate)

    def seat_limit(self, max_num_seqs: int, waiting: list[Request], now: float) -> int:
        return max_num_seqs if self.width is None else self.width.seat_limit(max_num_seqs, waiting, now)

    def on_add(self, request: Request) -> None:
        self.lengths.start(request)
        if self.width is not None:
            self.width.on_arrival(request)

    def on_finish(self, request: Request) -> None:
        self.lengths.finish(request)


class OracleLengths:
    """``LengthEstimates`` that knows every request's true output length (simulations, tests)."""

    def __init__(self, true_lengths: dict[str, int]):
        self.true_lengths = true_lengths

    def start(self, request: Request) -> None:
        pass

    def predicted(self, request: Request) -> float | None:
        return self.true_lengths.get(request.request_id)

    def finish(self, request: Request) -> None:
        pass


def _alise(lengths: LengthEstimates | None, costs: StepCostModel | None, alise: AliseConfig | None) -> Policy:
    if lengths is None:
        raise ValueError("the alise policy needs output-length estimates (lengths=...)")
    return AlisePolicy(lengths, costs or StepCostModel(), alise)


# name -> constructor(lengths, costs, alise). Its names are config.SCHEDULING_POLICIES (which the options are
# validated against before anything loads; a test keeps the two equal).
POLICIES = {
    "fcfs": lambda lengths, costs, alise: FCFSPolicy(),
    "priority": lambda lengths, costs, alise: PriorityPolicy(),
    "alise": _alise,
}


def make_policy(name: str, *, lengths: LengthEstimates | None = None, costs: StepCostModel | None = None,
                alise: AliseConfig | None = None) -> Policy:
    """The named policy; ``alise`` needs ``lengths`` (a predictor) and takes ``costs``/``alise``."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {name!r}")
    return POLICIES[name](lengths, costs, alise)
