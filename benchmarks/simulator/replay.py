"""One simulated run: requests replayed through the real Scheduler, policy and KVManager on a virtual clock.

Nothing runs a model. Each step is ``schedule()``; the step's time comes from the step-time model
(the CPU-calibrated ``StepTimes``, or ``device.DeviceSteps`` for a modelled GPU) and advances
the virtual clock; every sampled row gets a fake token, EOS exactly when the request reaches its
true length (requests do not ignore EOS and ask for as many tokens as fit, so only the oracle
knows when they end); then ``update()``. New requests join at step boundaries once their arrival
time has passed, as in the engine loop. The modeled step times are also fed to the policy's
``StepCostModel`` exactly as ``LLMEngine.step`` feeds measured ones, so ALISE's online cost
calibration runs as it would live.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.simulator.calibration import StepTimes
from benchmarks.simulator.workload import EOS_TOKEN, SAMPLED_TOKEN
from scalellm_jax.engine.kv_manager import KVManager
from scalellm_jax.engine.policies import AliseConfig, AlisePolicy, OracleLengths, Policy, make_policy
from scalellm_jax.engine.request import Request
from scalellm_jax.engine.scheduler import Scheduler, SchedulerConfig
from scalellm_jax.engine.step_costs import StepCostModel

POLICIES = ("fcfs", "priority", "alise", "oracle")


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass(frozen=True)
class KVBudget:
    num_pages: int  # device pages, the null page included
    num_host_pages: int  # host swap space


def build_policy(name: str, predicted, true: dict[str, int], alise: AliseConfig,
                 decode_buckets: tuple[int, ...] | None = None) -> tuple[Policy, StepCostModel | None]:
    """The policy and, for the ALISE family, its online step-cost model (fresh per run) over the
    calibration's ``decode_buckets``."""
    if name in ("fcfs", "priority"):
        return make_policy(name), None
    costs = StepCostModel(decode_buckets=decode_buckets)
    if name == "alise":
        return make_policy("alise", lengths=predicted, costs=costs, alise=alise), costs
    if name == "oracle":
        return AlisePolicy(OracleLengths(true), costs, alise), costs
    raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")


@dataclasses.dataclass
class RunResult:
    """Per-request times (seconds, virtual clock) of one run, plus run-level counters."""

    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    output_len: np.ndarray
    priority: np.ndarray
    steps: int
    preemptions: int
    swap_outs: int
    # Output tokens per second while requests were still queued (only meaningful when all arrive at once).
    saturated_tokens_per_s: float | None
    # Mean rows per step while requests were still queued: below the seats when KV pages bind.
    saturated_rows: float | None = None

    @property
    def latency(self) -> np.ndarray:
        return self.finish - self.arrival

    @property
    def makespan(self) -> float:
        return float(self.finish.max() - self.arrival.min())


def simulate(requests: list[Request], policy: Policy, costs: StepCostModel | None, times: StepTimes,
             budget: KVBudget, true_lengths: dict[str, int] | None = None) -> RunResult:
    """Replay ``requests`` (fresh, sorted or not) to completion; raises if the scheduler stalls.

    ``true_lengths`` (request id → output tokens): the device samples EOS at that many tokens;
    without it, requests run to ``max_tokens``. ``times``: ``StepTimes`` or ``DeviceSteps``.
    """
    g = times.geometry
    clock = VirtualClock()
    kv = KVManager(budget.num_pages, g.page_size, g.max_pages_per_seq, num_host_pages=budget.num_host_pages)
    config = SchedulerConfig(max_num_seqs=g.max_num_seqs, max_num_batched_tokens=g.max_num_batched_tokens,
                             max_model_len=g.max_model_len)
    sched = Scheduler(config, kv, policy, clock=clock)
    pending = sorted(requests, key=lambda r: r.arrival_time)
    index = {r.request_id: i for i, r in enumerate(pending)}
    first = np.full(len(pending), np.nan)
    finish = np.full(len(pending), np.nan)
    nxt = steps = swap_outs = tokens = busy_steps = busy_rows = 0
    saturated = saturated_rows = None
    target = {r.request_id: true_lengths.get(r.request_id) for r in pending} if true_lengths else {}
    while nxt < len(pending) or sched.has_unfinished():
        while nxt < len(pending) and pending[nxt].arrival_time <= clock.now:
            sched.add_request(pending[nxt])
            nxt += 1
        out = sched.schedule() if sched.has_unfinished() else None
        if out is None or not out.scheduled:
            if out is not None:
                sched.update(out, {})  # keep the schedule → update contract even for an empty step
            if nxt == len(pending):
                raise RuntimeError(f"scheduler stalled with {sched.num_waiting} waiting, {sched.num_running} running")
            clock.now = pending[nxt].arrival_time  # idle until the next arrival
            continue
        seconds = times.step_s(out)
        clock.now += seconds
        steps += 1
        swap_outs += len(out.swap_out)
        if costs is not None:  # as LLMEngine.step reports a measured step
            decode_rows = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
            costs.observe(prefill_tokens=out.num_batched_tokens - decode_rows, decode_rows=decode_rows,
                          seconds=seconds)
        sampled = {}
        for s in out.scheduled:
            if s.needs_sample:
                rid = s.request_id
                end = target.get(rid)
                ends = end is not None and s.request.num_output_tokens + 1 >= end
                sampled[rid] = (EOS_TOKEN if ends else SAMPLED_TOKEN, None)
                i = index[rid]
                if np.isnan(first[i]):
                    first[i] = clock.now
        for request in sched.update(out, sampled):
            finish[index[request.request_id]] = clock.now
        tokens += len(sampled)
        if saturated is None:
            busy_steps += 1
            busy_rows += len(out.scheduled)
            if sched.num_waiting == 0 and nxt == len(pending):
                saturated = tokens / clock.now if clock.now > 0 else None
                saturated_rows = busy_rows / busy_steps
    kv.check_invariants()
    if kv.num_free_pages != kv.num_usable_pages:
        raise RuntimeError("KV pages leaked after every request finished")
    wrong = [r.request_id for r in pending if target.get(r.request_id) not in (None, r.num_output_tokens)]
    if wrong:
        raise RuntimeError(f"requests {wrong[:4]} did not end at their true length")
    return RunResult(
        arrival=np.array([r.arrival_time for r in pending]), first_token=first, finish=finish,
        output_len=np.array([r.num_output_tokens for r in pending]), priority=np.array([r.priority for r in pending]),
        steps=steps, preemptions=sum(r.num_preemptions for r in pending), swap_outs=swap_outs,
        saturated_tokens_per_s=saturated, saturated_rows=saturated_rows,
    )


def summarize(runs: list[RunResult]) -> dict:
    """Latency metrics over all requests of ``runs`` (pooled), throughput averaged over runs."""
    latency = np.concatenate([r.latency for r in runs])
    ttft = np.concatenate([r.first_token - r.arrival for r in runs])
    out_len = np.concatenate([r.output_len for r in runs])
    priority = np.concatenate([r.priority for r in runs])
    return {
        "mean_latency_s": float(latency.mean()),
        "p50_latency_s": float(np.percentile(latency, 50)),
        "p99_latency_s": float(np.percentile(latency, 99)),
        "mean_ttft_s": float(ttft.mean()),
        "mean_normalized_latency_s": float((latency / out_len).mean()),
        "throughput_rps": float(np.mean([len(r.arrival) / r.makespan for r in runs])),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "max_latency_s": float(latency.max()),
        "mean_latency_priority0_s": float(latency[priority == 0].mean()) if (priority == 0).any() else None,
        "num_requests": int(latency.size),
        "preemptions": int(sum(r.preemptions for r in runs)),
        "swap_outs": int(sum(r.swap_outs for r in runs)),
        "steps": int(sum(r.steps for r in runs)),
    }
