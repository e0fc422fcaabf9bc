"""Batch width control: ALISE runs fewer sequences at once only when that is faster and keeps up."""

from __future__ import annotations

import pytest

from scalellm_jax.engine.batch_width import MIN_ARRIVALS, BatchWidth, BatchWidthConfig
from scalellm_jax.engine.kv_manager import KVManager
from scalellm_jax.engine.policies import AliseConfig, AlisePolicy, OracleLengths, Policy
from scalellm_jax.engine.request import Request, SamplingParams
from scalellm_jax.engine.scheduler import Scheduler, SchedulerConfig
from scalellm_jax.engine.step_costs import StepCostModel, StepCostPrior

CPU_LIKE = {1: 0.016, 2: 0.016, 4: 0.017, 8: 0.018, 16: 0.019, 32: 0.023, 64: 0.041}  # s per decode step
GPU_LIKE = {1: 0.020, 8: 0.020, 32: 0.021, 64: 0.022}


def costs_from(table: dict[int, float], prefill_token_s: float = 1e-4) -> StepCostModel:
    costs = StepCostModel(StepCostPrior(prefill_token_s=prefill_token_s))
    for rows, seconds in table.items():
        costs.observe(prefill_tokens=0, decode_rows=rows, seconds=seconds)
    return costs


def request(i: int, arrival: float, output_len: int = 100, prompt_len: int = 10) -> Request:
    return Request(f"r{i}", [5] * prompt_len, SamplingParams(max_tokens=output_len), arrival_time=arrival)


def width_with_arrivals(table, *, per_s: float, output_len: int = 100, count: int = 32, **config) -> BatchWidth:
    """A controller that has seen ``count`` arrivals at ``per_s`` requests/s, each predicted ``output_len``."""
    width = BatchWidth(costs_from(table), BatchWidthConfig(**config), lambda r: output_len, lambda r: output_len)
    for i in range(count):
        width.on_arrival(request(i, i / per_s, output_len))
    return width


def test_per_bucket_step_costs_follow_the_runner_buckets():
    costs = StepCostModel(decode_buckets=(1, 2, 4, 8, 16, 32, 48))
    costs.observe(prefill_tokens=0, decode_rows=40, seconds=0.03)
    costs.observe(prefill_tokens=0, decode_rows=17, seconds=0.02)
    costs.observe(prefill_tokens=100, decode_rows=5, seconds=0.5)  # mixed: no decode bucket learns from it
    assert costs.decode_buckets_s() == {48: 0.03, 32: 0.02}
    assert costs.decode_step_s_at(33) == 0.03 and costs.decode_step_s_at(8) is None
    assert StepCostModel().bucket(33) == 64 and StepCostModel().bucket(1) == 1


def test_the_narrow_width_is_the_widest_bucket_clearly_faster_than_full():
    assert width_with_arrivals(CPU_LIKE, per_s=1).narrow_width(64) == 32
    assert width_with_arrivals(CPU_LIKE, per_s=1, step_saving=0.5).narrow_width(64) == 16
    assert width_with_arrivals(GPU_LIKE, per_s=1).narrow_width(64) is None  # flat step time: never narrow
    assert width_with_arrivals({8: 0.018, 32: 0.023}, per_s=1).narrow_width(64) is None  # full width unmeasured


def test_narrows_under_light_demand_and_opens_when_it_cannot_keep_up():
    # 32 rows every 23 ms: ~1390 tokens/s. 5 req/s × 100 tokens = 500 tokens/s: narrow.
    assert width_with_arrivals(CPU_LIKE, per_s=5).seat_limit(64, [], now=32 / 5) == 32
    # 20 req/s × 100 tokens = 2000 tokens/s: more than 32 rows deliver, every seat opens.
    assert width_with_arrivals(CPU_LIKE, per_s=20).seat_limit(64, [], now=32 / 20) == 64
    # Prefill eats the time: 5 req/s × 2000-token prompts × 100 µs = the whole second.
    heavy = BatchWidth(costs_from(CPU_LIKE), BatchWidthConfig(), lambda r: 100, lambda r: 100)
    for i in range(32):
        heavy.on_arrival(request(i, i / 5, prompt_len=2000))
    assert heavy.seat_limit(64, [], now=32 / 5) == 64


def test_a_backlog_opens_every_seat_and_too_few_arrivals_decide_nothing():
    width = width_with_arrivals(CPU_LIKE, per_s=5, backlog_steps=10)
    waiting = [request(100 + i, 0.0) for i in range(4)]  # 400 tokens waiting > 10 steps × 32 rows
    assert width.seat_limit(64, waiting[:3], now=6.4) == 32 and width.seat_limit(64, waiting, now=6.4) == 64
    few = width_with_arrivals(CPU_LIKE, per_s=5, count=MIN_ARRIVALS - 1)
    assert few.seat_limit(64, [], now=10.0) == 64


@pytest.mark.parametrize("field, value", [("step_saving", 0.0), ("headroom", 0.5), ("backlog_steps", -1),
                                          ("window", 2)])
def test_bad_width_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BatchWidthConfig(**{field: value})
    with pytest.raises(ValueError, match=f"narrow_{field}"):
        AliseConfig(**{f"narrow_{field}": value})


def test_alise_width_control_can_be_turned_off():
    costs = costs_from(CPU_LIKE)
    assert AlisePolicy(OracleLengths({}), costs, AliseConfig()).width is not None
    assert AlisePolicy(OracleLengths({}), costs, AliseConfig(narrow_step_saving=1.0)).width is None


class CapAt(Policy):
    """FCFS order with a settable seat limit."""

    name = "cap"

    def __init__(self, seats: int):
        self.seats = seats

    def rank(self, request, now):
        return (request.arrival_time, request.request_id)

    def seat_limit(self, max_num_seqs, waiting, now):
        return self.seats


def test_the_scheduler_admits_up_to_the_seat_limit_and_never_preempts_for_it():
    policy = CapAt(2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                      KVManager(64, 4, 16, 0.0), policy)
    for i in range(4):
        sched.add_request(request(i, float(i), output_len=20, prompt_len=3))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"] and sched.num_running == 2
    sched.update(out, {s.request_id: (7, None) for s in out.scheduled})
    policy.seats = 4
    out = sched.schedule()
    assert sched.num_running == 4 and len(out.scheduled) == 4
    sched.update(out, {s.request_id: (7, None) for s in out.scheduled})
    policy.seats = 1  # a narrower cap lets the running finish: nobody is preempted for it
    out = sched.schedule()
    assert sched.num_running == 4 and not out.preempted and len(out.scheduled) == 4
