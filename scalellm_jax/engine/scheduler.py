"""Continuous-batching scheduler with a per-step token budget (the vLLM v1 model).

There are no prefill and decode phases. Every step each request gets some number of its pending
tokens (see ``Request.num_pending_tokens``): one for a decode, a chunk of at most the remaining
budget for a prompt. Decodes and prompt chunks share a step, so a long prompt is simply spread
over several steps (chunked prefill) and never holds up running decodes.

One step is ``out = schedule()``, the engine runs ``out`` on the device, then
``update(out, sampled)``. ``update`` must run before the next ``schedule``: token counts only
advance in ``update``.

Preemption. A running request loses its place in two ways: its pages are needed (the cache is
full) or a waiting request the policy ranks clearly better wants its seat (``should_preempt``).
A preempted request is first *parked*: it keeps its pages on device, so resuming soon costs
nothing. Pages are reclaimed from parked requests only when someone needs them, the one the
policy expects to resume last first: its KV is swapped to host memory while the swap space has
room (the step's ``swap_out`` list tells the runner which pages to copy before they are reused),
otherwise dropped and recomputed on readmission. Either way it later resumes with exactly the
tokens it would have produced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scalellm_jax.engine.kv_manager import KVManager
from scalellm_jax.engine.policies import Policy
from scalellm_jax.engine.request import KVLocation, Request, RequestStatus

if TYPE_CHECKING:  # a host module: no JAX at import (the resolved config's module imports it)
    from scalellm_jax.engine.resolved import ResolvedConfig

_DEFERRED = -1  # _admit: wait a step for a prefix page a running request is computing

@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """``max_num_batched_tokens`` is the per-step token budget and so also the prefill chunk size.

    It must be at least ``max_num_seqs`` so that every running decode fits in every step.
    ``max_model_len`` bounds prompt plus output tokens of one request.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_num_seqs ({self.max_num_seqs}) so every running "
                f"decode fits in a step, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class ScheduledRequest:
    """Tokens ``[start, start + num_new_tokens)`` of ``request.all_token_ids`` run this step.

    ``needs_sample`` (fixed at scheduling time) says whether the step covers the request's last
    token, i.e. whether the runner must sample for it; a mid-prompt chunk only writes KV.
    """

    request: Request
    num_new_tokens: int
    start: int
    needs_sample: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "needs_sample", self.end == self.request.num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class SwapOp:
    """Copy the KV of ``request_id``'s first ``num_tokens`` tokens out of / into device ``pages``."""

    request_id: str
    pages: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan. The runner performs ``swap_out`` copies, then ``swap_in``, then the step."""

    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    num_batched_tokens: int
    swap_out: list[SwapOp] = field(default_factory=list)
    swap_in: list[SwapOp] = field(default_factory=list)
    # waiting requests passed over for one step because a running one is computing their next prefix page
    deferred: list[Request] = field(default_factory=list)

    @property
    def is_decode_only(self) -> bool:
        """Every row is a single token (decode-shaped), so the runner can use its decode path."""
        return bool(self.scheduled) and all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    """Decides every step which requests run, how many tokens each, and who is preempted.

    Device pages belong to RUNNING requests and to parked (``KVLocation.DEVICE``) preempted ones;
    host swap pages to swapped-out ones. Every exit frees both, which keeps the "all pages free
    when everything finished" invariant.
    """

    @classmethod
    def for_engine(cls, resolved: ResolvedConfig, kv: KVManager, policy: Policy) -> Scheduler:
        """The engine's scheduler: its limits from ``resolved``."""
        config = SchedulerConfig(max_num_seqs=resolved.engine.max_num_seqs,
                                 max_num_batched_tokens=resolved.engine.max_num_batched_tokens,
                                 max_model_len=resolved.max_model_len)
        return cls(config, kv, policy)

    def __init__(self, config: SchedulerConfig, kv: KVManager, policy: Policy,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.kv = kv
        self.policy = policy
        self.clock = clock
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._waiting: list[Request] = []  # WAITING or PREEMPTED, in arrival-to-the-queue order
        self._running: list[Request] = []  # RUNNING, in admission order
        self._now = 0.0  # the current schedule() call's clock reading
        self._swap_out: list[SwapOp] = []  # the current schedule() call's swap-outs
        # Prefix cache lookups at admission, in tokens: looked up (prompt, plus outputs for a recompute)
        # and found cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----------------------------------------------------------------------------- queues

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def max_kv_tokens(self, request: Request) -> int:
        """The most tokens whose KV this request can ever need.

        The last sampled token is never run through the model, and a request stops once prompt
        plus outputs reach ``max_model_len``.
        """
        total = request.num_prompt_tokens + request.sampling_params.max_tokens - 1
        return min(total, self.config.max_model_len - 1)

    def add_request(self, request: Request) -> None:
        """Queue a new request; raises ``ValueError`` for one this scheduler could never finish.

        Rejecting here (rather than letting it wait forever) keeps the queue live: a request
        passing these checks can always run to completion once it is alone in the cache.
        """
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} must be new (status {request.status.name})")
        n, limit = request.num_prompt_tokens, self.config.max_model_len
        if n == 0:
            raise ValueError("prompt_token_ids must not be empty")
        if n + 1 > limit:
            raise ValueError(f"prompt_token_ids: prompt has {n} tokens; the model's context is {limit}")
        kv, max_kv = self.kv, self.max_kv_tokens(request)
        capacity = min(kv.max_pages_per_seq, kv.num_usable_pages - kv.watermark_pages)
        # Conservative by the watermark: alone in the cache, a request must pass admission (its
        # first chunk plus the watermark) and then grow to its whole KV.
        if kv.pages_needed(max_kv) > capacity:
            field_name = "prompt_token_ids" if kv.pages_needed(n) > capacity else "max_tokens"
            raise ValueError(
                f"{field_name}: the request can need {kv.pages_needed(max_kv)} KV pages (prompt {n} tokens, "
                f"max_tokens {request.sampling_params.max_tokens}, page size {kv.page_size}) but at most "
                f"{capacity} fit per request"
            )
        request.queued_at = request.arrival_time
        self._refresh_prefix_hint(request)
        self._requests[request.request_id] = request
        self._waiting.append(request)
        self.policy.on_add(request)

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> Request | None:
        """Finish a request from outside the step loop (client cancel, or ``FINISHED_ERROR``).

        Safe between ``schedule`` and ``update``: ``update`` skips requests that are no longer
        running. Returns the request, or None when the id is unknown or already finished.
        """
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status.name}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.kv.free(request_id)
        request.status = status
        request.kv = KVLocation.NONE
        self.policy.on_finish(request)
        return request

    # ----------------------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Plan one step: running requests first (decodes before prompt chunks), then admissions."""
        now = self.clock()
        self._now = now
        self._swap_out: list[SwapOp] = []
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[Request] = []

        # Decodes first: each costs one token and the budget covers max_num_seqs of them, so a
        # running decode is never left out because a prompt chunk took the budget. (Admission
        # already keeps the one unfinished prompt last in line; this keeps the guarantee local.)
        decodes = [r for r in self._running if not r.is_prefilling]
        prefills = [r for r in self._running if r.is_prefilling]
        for request in decodes + prefills:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            n = min(request.num_pending_tokens, budget)
            # Out of pages: preempt the policy's victim among *all* running requests, un-planning it
            # if it was already scheduled this step (nothing has run yet, so that costs nothing).
            # Restricting victims to unscheduled requests would let a low-priority decode planned
            # earlier in the pass outlive a high-priority prompt. If the victim is the request
            # itself, it alone stops; the rest of the pass goes on (they outrank it anyway).
            while not self._allocate(request, request.num_computed_tokens + n, new_request=False):
                victim = self.policy.pick_victim(self._running, now)
                budget += self._unplan(scheduled, victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = ScheduledRequest(request, n, request.num_computed_tokens)
                budget -= n

        # Admissions. Not in a step that preempted for pages: the pool is short, and admitting
        # would only evict again next step. The first request that does not fit stops admission,
        # unless the policy lets it preempt a running request; with FCFS that means no
        # head-of-line skipping (a big prompt is not starved by small ones behind it).
        swap_in: list[SwapOp] = []
        deferred: list[Request] = []
        if not preempted and self._waiting:
            seats = max(1, min(self.config.max_num_seqs,
                               self.policy.seat_limit(self.config.max_num_seqs, self._waiting, now)))
            admitted = False
            # Victims come from the requests that ran before this step: one admitted in it has run
            # nothing yet, and preempting it would also have to undo its swap-in (admissions go to the end).
            num_old = len(self._running)
            for request in self.policy.order_waiting(self._waiting, now):
                if budget == 0:
                    break
                victims = 0
                while (n := self._admit(request, budget, swap_in, seats)) == 0:
                    victim = self.policy.pick_victim(self._running[:num_old], now) if num_old else None
                    if victim is None or not self.policy.should_preempt(request, victim, now):
                        break
                    budget += self._unplan(scheduled, victim)
                    self._preempt(victim)
                    preempted.append(victim)
                    victims += 1
                    num_old -= 1
                if n == _DEFERRED:
                    deferred.append(request)
                    continue
                if n == 0:
                    break
                scheduled[request.request_id] = ScheduledRequest(request, n, request.num_computed_tokens)
                budget -= n
                admitted = True
                if victims:
                    # The victims now wait too and may outrank the rest of this ordering: stop here.
                    break
            if admitted:
                self._waiting = [r for r in self._waiting if r.status is not RequestStatus.RUNNING]

        return SchedulerOutput(
            scheduled=list(scheduled.values()),
            preempted=preempted,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            swap_out=self._swap_out,
            swap_in=swap_in,
            deferred=deferred,
        )

    @staticmethod
    def _unplan(scheduled: dict[str, ScheduledRequest], request: Request) -> int:
        """Drop ``request`` from this step's plan; returns the budget it gives back."""
        undone = scheduled.pop(request.request_id, None)
        return undone.num_new_tokens if undone is not None else 0

    def _allocate(self, request: Request, total_tokens: int, *, new_request: bool) -> bool:
        """``kv.allocate``, reclaiming pages from parked requests (latest expected resume first)."""
        while not self.kv.allocate(request.request_id, total_tokens, new_request=new_request):
            if not self._evict_a_parked_request(but=request):
                return False
        return True

    def _evict_a_parked_request(self, but: Request) -> bool:
        parked = [r for r in self._waiting
                  if r.status is RequestStatus.PREEMPTED and r.kv is KVLocation.DEVICE and r is not but]
        if not parked:
            return False
        self._evict(self.policy.pick_victim(parked, self._now))
        return True

    def _evict(self, request: Request) -> None:
        """Take a parked request's KV off the device: to host swap space if it fits, else drop it."""
        rid = request.request_id
        if self.kv.can_swap_out(rid, request.num_computed_tokens):
            pages = self.kv.swap_out(rid, request.num_computed_tokens)
            self._swap_out.append(SwapOp(rid, pages, request.num_computed_tokens))
            request.kv = KVLocation.HOST
        else:
            self.kv.free(rid)
            request.num_computed_tokens = 0
            request.kv = KVLocation.NONE
            self._refresh_prefix_hint(request)

    def _admit(self, request: Request, budget: int, swap_in: list[SwapOp], seats: int) -> int:
        """Seat ``request`` for up to ``budget`` tokens if fewer than ``seats`` run and there are pages.

        Returns the tokens scheduled; 0 seats nothing (parked requests may still have been evicted
        while looking for pages); ``_DEFERRED`` when a running request is about to put this one's
        next prompt page in the prefix cache (waiting a step for it beats computing it twice).
        A request without KV first takes the longest cached prefix of its tokens, so only the rest
        counts against the budget.
        """
        rid, kv = request.request_id, self.kv
        hit: list[int] = []
        looked_up = request.kv is KVLocation.NONE and self._reads_prefix_cache(request)
        if looked_up:  # before anything else, so that no one is preempted for a request that then waits
            hit = kv.match_prefix(request.token_ids, request.num_tokens - 1)
            request.cached_prefix_hint = len(hit) * kv.page_size
            if self._prefix_in_progress(request, len(hit) * kv.page_size):
                return _DEFERRED
        if len(self._running) >= seats:
            return 0
        n = min(request.num_pending_tokens - len(hit) * kv.page_size, budget)
        if n <= 0:
            return 0
        if request.kv is KVLocation.HOST:
            while (pages := kv.swap_in(rid, request.num_computed_tokens + n)) is None:
                if not self._evict_a_parked_request(but=request):
                    return 0
            swap_in.append(SwapOp(rid, pages, request.num_computed_tokens))
        else:
            if hit:
                request.num_computed_tokens = kv.take_prefix(rid, hit)
            if not self._allocate(request, request.num_computed_tokens + n, new_request=True):
                if hit:  # give the cached prefix back; a parked request keeps its own pages
                    kv.free(rid)
                    request.num_computed_tokens = 0
                return 0
        if looked_up:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += request.num_computed_tokens
            if not request.num_preemptions:
                request.num_cached_tokens = request.num_computed_tokens
        request.cached_prefix_hint = 0
        request.kv = KVLocation.DEVICE
        request.status = RequestStatus.RUNNING
        request.waited_s += self._now - request.queued_at
        request.queued_at = None
        self._running.append(request)
        return n

    def _reads_prefix_cache(self, request: Request) -> bool:
        # A cached prefix has no logprobs to report: requests asking for them compute their whole prompt.
        return self.kv.enable_prefix_caching and request.sampling_params.prompt_logprobs is None

    def _refresh_prefix_hint(self, request: Request) -> None:
        """What the prefix cache holds for a request without KV, for the policy's estimate of its work."""
        if self._reads_prefix_cache(request):
            hit = self.kv.match_prefix(request.token_ids, request.num_tokens - 1)
            request.cached_prefix_hint = len(hit) * self.kv.page_size

    def _prefix_in_progress(self, request: Request, num_cached: int) -> bool:
        """Whether a running request is computing the page after the ``num_cached`` tokens that
        ``request`` found cached (same tokens up to its end), a page ``request`` could then reuse."""
        end = num_cached + self.kv.page_size
        if end >= request.num_tokens:
            return False  # that page would hold request's last token, which it must compute itself
        prefix = None
        for other in self._running:
            if other.num_computed_tokens < end <= other.num_tokens:
                if prefix is None:
                    prefix = request.token_ids(0, end)
                if other.token_ids(0, end) == prefix:
                    return True
        return False

    def _preempt(self, request: Request) -> None:
        """Move a running request back to the queue, parked: its pages stay until someone needs them."""
        self._running.remove(request)
        self.kv.trim(request.request_id, request.num_computed_tokens)  # pages planned for this step
        request.kv = KVLocation.DEVICE if self.kv.num_owned(request.request_id) else KVLocation.NONE
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        request.queued_at = self._now
        self._waiting.append(request)

    # ----------------------------------------------------------------------------- update

    def update(self, output: SchedulerOutput,
               sampled: Mapping[str, tuple[int, float | None]]) -> list[Request]:
        """Apply a finished step: advance token counts, append sampled tokens, retire finished requests.

        ``sampled`` maps request id → (token, logprob or None) for the rows with ``needs_sample``;
        entries for other rows are ignored. Requests aborted (or otherwise no longer running since
        ``schedule``) are skipped. Returns the requests that finished in this step.
        """
        live = [s for s in output.scheduled
                if s.request.status is RequestStatus.RUNNING and s.request.num_computed_tokens == s.start]
        missing = [s.request_id for s in live if s.needs_sample and s.request_id not in sampled]
        if missing:  # checked before mutating anything, so a bad call leaves the state intact
            raise KeyError(f"no sampled token for requests {missing[:8]}")
        finished: list[Request] = []
        caching = self.kv.enable_prefix_caching
        for s in live:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            if caching:
                self.kv.cache_computed(request.request_id, request.num_computed_tokens, request.token_ids)
            if request.num_computed_tokens != request.num_tokens:
                continue  # mid-prompt chunk: its KV is written, nothing is sampled
            token, logprob = sampled[request.request_id]
            request.append_token(token, logprob)
            status = request.check_stop()
            if status is None and request.num_tokens >= self.config.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
            if status is not None:
                request.status = status
                request.kv = KVLocation.NONE
                self.kv.free(request.request_id)
                del self._requests[request.request_id]
                self.policy.on_finish(request)
                finished.append(request)
        if finished:
            self._running = [r for r in self._running if r.status is RequestStatus.RUNNING]
        return finished
