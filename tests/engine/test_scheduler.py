import random

import numpy as np
import pytest

from scalellm_jax.config import SCHEDULING_POLICIES
from scalellm_jax.engine.kv_manager import KVManager
from scalellm_jax.engine.policies import POLICIES, AliseConfig, FCFSPolicy, Policy, PriorityPolicy, make_policy
from scalellm_jax.engine.request import KVLocation, Request, RequestStatus, SamplingParams, clamp_max_tokens
from scalellm_jax.engine.scheduler import Scheduler, SchedulerConfig

EOS, VOCAB = 2, 1000


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"rng seed {seed}")  # shown by pytest only when the test fails
    return np.random.default_rng(seed)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class HalfMaxTokens:
    """Length estimates for tests: every request is predicted to use half its max_tokens."""

    def start(self, request):
        pass

    def predicted(self, request):
        return request.sampling_params.max_tokens / 2

    def finish(self, request):
        pass


def build_policy(name):
    return make_policy(name, lengths=HalfMaxTokens(), alise=AliseConfig(aging_rate=0.5, preempt_ratio=2.0))


def make_scheduler(*, num_pages=64, page_size=4, max_num_seqs=4, budget=16, max_model_len=64,
                   watermark=0.0, policy="fcfs", max_pages_per_seq=None, num_host_pages=0, prefix_caching=False):
    clock = Clock()
    kv = KVManager(num_pages, page_size, max_pages_per_seq or -(-max_model_len // page_size), watermark,
                   num_host_pages=num_host_pages, enable_prefix_caching=prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
    return Scheduler(config, kv, build_policy(policy), clock=clock), clock


def req(rid, prompt_len, max_tokens=4, arrival=0.0, priority=0, **params):
    prompt = [7 + (i % 50) for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), arrival_time=arrival,
                   priority=priority, eos_token_id=EOS)


def step(sched, token=11):
    out = sched.schedule()
    sampled = {s.request_id: (token, None) for s in out.scheduled if s.needs_sample}
    return out, sched.update(out, sampled)


def drain(sched, max_steps=1000):
    """Step until nothing is left; returns the finished ids in order (fails instead of hanging)."""
    order = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return order
        order += [r.request_id for r in step(sched)[1]]
    raise AssertionError(f"not finished after {max_steps} steps")


def unfinished(requests):
    return [rid for rid, r in requests.items() if not r.status.is_finished]


def simulate(rng, *, policy, num_pages, page_size, max_num_seqs, budget, max_model_len, num_requests,
             eos_prob=0.05, abort_prob=0.0, ignore_eos=False, max_prompt=None, min_len=1, num_host_pages=0,
             prefix_caching=False):
    """Drive the scheduler like the engine would, with random tokens instead of a model.

    Checks the scheduling contract at every step and returns (requests by id, total preemptions, scheduler).
    A fake device memory (``device``: page → the token prefix whose KV it holds, up to the last
    position written in it; ``host``: request id → swapped contents) follows the swap plans and the
    KV writes, and checks that every request runs on exactly the KV of its own tokens, whether it
    was parked, swapped out and in, recomputed, or took pages from the prefix cache. With
    ``prefix_caching`` prompts share prefixes (common bases, copies, continuations of finished
    requests), and no request ever writes into a page that another holds or that is cached.
    """
    sched, clock = make_scheduler(num_pages=num_pages, page_size=page_size, max_num_seqs=max_num_seqs,
                                  budget=budget, max_model_len=max_model_len, watermark=0.01, policy=policy,
                                  num_host_pages=num_host_pages, prefix_caching=prefix_caching)
    kv = sched.kv
    device, host = {}, {}
    capacity = min(kv.max_pages_per_seq, kv.num_usable_pages - kv.watermark_pages) * page_size
    max_prompt = max_prompt or max_model_len - 1
    arrivals = np.sort(rng.integers(0, 3 * num_requests, num_requests))
    requests, sampled_log, first_admission, ever_deferred = {}, {}, [], set()
    preemptions, pending, t = 0, list(range(num_requests)), 0
    bases = [rng.integers(3, VOCAB, capacity).tolist() for _ in range(3)]
    while pending or sched.has_unfinished():
        assert t < 50_000, "the scheduler stopped making progress"
        clock.now = float(t)
        while pending and arrivals[pending[0]] <= t:
            i = pending.pop(0)
            n = int(rng.integers(min_len, min(max_prompt, capacity - 1) + 1))
            max_tokens = int(rng.integers(min_len, capacity - n + 1))
            stop_ids = [int(rng.integers(3, VOCAB))] if rng.random() < 0.2 else []
            params = clamp_max_tokens(SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                                     stop_token_ids=stop_ids), n, max_model_len)
            prompt = rng.integers(3, VOCAB, n).tolist()
            if prefix_caching:
                prompt = shared_prefix_prompt(rng, prompt, bases, list(requests.values()))
            r = Request(f"r{i:04d}", prompt, params, arrival_time=float(t),
                        priority=int(rng.integers(0, 4)), eos_token_id=EOS)
            sched.add_request(r)
            requests[r.request_id], sampled_log[r.request_id] = r, []
        if sched.has_unfinished() and rng.random() < abort_prob:
            assert sched.abort(rng.choice(unfinished(requests))).status is RequestStatus.FINISHED_ABORTED

        waiting_before = sched.policy.order_waiting(list(sched.waiting), clock.now)
        running_before = {r.request_id: r.num_computed_tokens for r in sched.running}
        decodes_before = {r.request_id for r in sched.running if not r.is_prefilling}
        out = sched.schedule()

        ids = [s.request_id for s in out.scheduled]
        preempted = {r.request_id for r in out.preempted}
        preemptions += len(preempted)
        assert len(set(ids)) == len(ids) and not preempted & set(ids)
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= budget
        assert len(out.scheduled) <= max_num_seqs and sched.num_running <= max_num_seqs
        # Every running decode runs every step unless it was preempted: prompts never stall decodes.
        assert decodes_before <= set(ids) | preempted, decodes_before - set(ids) - preempted
        admitted = [i for i in ids if i not in running_before]
        deferred = {r.request_id for r in out.deferred}
        assert not deferred & set(ids) and (prefix_caching or not deferred)
        ever_deferred |= deferred
        waiting_before = [r for r in waiting_before if r.request_id not in deferred]
        if out.preempted and admitted:  # only a policy's should_preempt admits in a preempting step
            assert policy != "fcfs"
            worst_admitted = max(sched.policy.rank(requests[i], clock.now) for i in admitted)
            assert all(sched.policy.rank(r, clock.now) > worst_admitted for r in out.preempted)
        # Admissions follow the policy's order, without skipping (a prefix of the ordered queue).
        # ALISE ranks by remaining work, which an eviction during this very step can change.
        if policy != "alise":
            assert admitted == [r.request_id for r in waiting_before[:len(admitted)]]
        first_admission += [i for i in admitted if requests[i].num_preemptions == 0]
        for s in out.scheduled:
            r = s.request
            assert r.status is RequestStatus.RUNNING and s.num_new_tokens >= 1
            assert s.start == r.num_computed_tokens
            assert r.request_id not in running_before or s.start == running_before[r.request_id]
            assert s.end <= r.num_tokens and s.needs_sample == (s.end == r.num_tokens)
            assert kv.num_owned(r.request_id) == kv.pages_needed(s.end)
        for r in out.preempted:
            assert r.status is RequestStatus.PREEMPTED
        for r in sched.waiting:
            owned, needed = kv.num_owned(r.request_id), kv.pages_needed(r.num_computed_tokens)
            if r.kv is KVLocation.DEVICE:
                assert owned >= needed
            elif r.kv is KVLocation.HOST:
                assert owned == 0 and kv.num_host_owned(r.request_id) >= needed > 0
            else:
                assert owned == 0 == r.num_computed_tokens and kv.num_host_owned(r.request_id) == 0
        held = {p for r in (*sched.running, *sched.waiting) for p in kv.pages_of(r.request_id)}
        assert len(held) == kv.num_usable_pages - kv.num_free_pages
        # The fake device: copies out, then in, then check every row reads its own KV and write.
        for op in out.swap_out:
            assert len(op.pages) >= kv.pages_needed(op.num_tokens) and op.request_id not in host
            host[op.request_id] = [device.get(p) for p in op.pages[:kv.pages_needed(op.num_tokens)]]
        for op in out.swap_in:
            contents = host.pop(op.request_id)
            assert len(contents) == kv.pages_needed(op.num_tokens) <= len(op.pages)
            device.update(zip(op.pages, contents, strict=False))
        for s in out.scheduled:
            pages, tokens = kv.pages_of(s.request_id), s.request.all_token_ids
            for i in range(kv.pages_needed(s.start)):
                held_prefix = min((i + 1) * page_size, s.start)
                assert device.get(pages[i], ())[:held_prefix] == tuple(tokens[:held_prefix]), (s.request_id, i)
            for i in range(s.start // page_size, kv.pages_needed(s.end)):
                assert kv.refcount(pages[i]) == 1 and not kv.is_cached(pages[i]), "a write into a shared page"
                device[pages[i]] = tuple(tokens[:min((i + 1) * page_size, s.end)])

        if sched.has_unfinished() and rng.random() < abort_prob:  # abort while the "device" runs the step
            sched.abort(rng.choice(unfinished(requests)))
        sampled = {}
        for s in out.scheduled:
            if s.needs_sample:
                token = EOS if rng.random() < eos_prob else int(rng.integers(3, VOCAB))
                sampled[s.request_id] = (token, float(-rng.random()))
                if s.request.status is RequestStatus.RUNNING:
                    sampled_log[s.request_id].append(token)
            elif rng.random() < 0.5:
                sampled[s.request_id] = (EOS, None)  # rows mid-prompt: whatever the device sampled is ignored
        finished = sched.update(out, sampled)
        for rid in [rid for rid in host if requests[rid].status.is_finished]:
            del host[rid]  # aborted while swapped out
        for r in finished:
            assert r.status.is_finished and kv.num_owned(r.request_id) == 0 and sched.get(r.request_id) is None
        kv.check_invariants()
        t += 1

    assert kv.num_free_pages == kv.num_usable_pages and sched.num_running == sched.num_waiting == 0
    for rid, r in requests.items():
        p = r.sampling_params
        assert r.status.is_finished, rid
        assert r.output_token_ids == sampled_log[rid], rid  # nothing lost or repeated across preemptions
        assert len(r.output_logprobs) == len(r.output_token_ids) <= p.max_tokens
        assert r.num_tokens <= max_model_len
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert len(r.output_token_ids) == p.max_tokens or r.num_tokens == max_model_len
        elif r.status is RequestStatus.FINISHED_STOPPED:
            last = r.output_token_ids[-1]
            assert (last == EOS and not p.ignore_eos) or last in p.stop_token_ids
        else:
            assert r.status is RequestStatus.FINISHED_ABORTED
    if policy == "fcfs":  # first admissions happen in arrival order (a deferred request waits a step)
        keys = [(requests[i].arrival_time, i) for i in first_admission if i not in ever_deferred]
        assert keys == sorted(keys)
    return requests, preemptions, sched


def shared_prefix_prompt(rng, prompt, bases, earlier):
    """``prompt``'s length, with a start shared with other prompts: a common base, an earlier prompt
    (as the choices of one request with n > 1 or a repeated question), or an earlier request's
    prompt and outputs (the next turn of a conversation); or ``prompt`` itself."""
    n, pick = len(prompt), rng.random()
    if pick < 0.4:
        start = bases[int(rng.integers(len(bases)))][:int(rng.integers(0, n + 1))]
    elif pick < 0.6 and earlier:
        start = earlier[-1 if rng.random() < 0.5 else int(rng.integers(len(earlier)))].prompt_token_ids
    elif pick < 0.8 and earlier:
        start = earlier[int(rng.integers(len(earlier)))].all_token_ids
    else:
        return prompt
    return (list(start) + prompt)[:n]


@pytest.mark.parametrize("policy", ["fcfs", "priority", "alise"])
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_workload_with_arrivals_and_aborts(rng, policy, prefix_caching):
    _, _, sched = simulate(
        rng, policy=policy, num_pages=int(rng.integers(12, 80)), page_size=int(rng.choice([1, 2, 4, 16])),
        max_num_seqs=int(rng.integers(1, 9)), budget=int(rng.choice([8, 16, 32])), max_model_len=96,
        num_requests=40, abort_prob=0.02, num_host_pages=int(rng.choice([0, 10, 1000])), prefix_caching=prefix_caching)
    assert (sched.prefix_cache_hits > 0) == prefix_caching


@pytest.mark.parametrize("policy", ["fcfs", "priority", "alise"])
@pytest.mark.parametrize("num_host_pages", [0, 12, 1000])
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_small_pool_preempts_and_every_request_still_gets_all_its_tokens(rng, policy, num_host_pages,
                                                                         prefix_caching):
    requests, preemptions, _ = simulate(
        rng, policy=policy, num_pages=25, page_size=4, max_num_seqs=8, budget=24, max_model_len=96,
        num_requests=30, ignore_eos=True, max_prompt=48, min_len=8, num_host_pages=num_host_pages,
        prefix_caching=prefix_caching,
    )
    assert preemptions > 0
    for r in requests.values():
        if not r.sampling_params.stop_token_ids:
            assert r.status is RequestStatus.FINISHED_LENGTH
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert len(r.output_token_ids) == r.sampling_params.max_tokens
    assert any(r.num_preemptions for r in requests.values())


def test_long_prompt_is_chunked_and_never_stalls_running_decodes():
    sched, _ = make_scheduler(num_pages=200, page_size=4, max_num_seqs=4, budget=16, max_model_len=512)
    for i in range(3):
        sched.add_request(req(f"d{i}", 2, max_tokens=100))
    step(sched)  # all three prompts in one step
    sched.add_request(req("long", 200, max_tokens=2))
    chunks = []
    for _ in range(100):
        if sched.get("long").num_computed_tokens == 200:
            break
        out, _ = step(sched)
        rows = {s.request_id: s for s in out.scheduled}
        assert {"d0", "d1", "d2"} <= rows.keys() and all(rows[f"d{i}"].num_new_tokens == 1 for i in range(3))
        assert out.num_batched_tokens <= 16 and not out.is_decode_only
        chunks.append(rows["long"].num_new_tokens)
    assert sum(chunks) == 200 and max(chunks) == 13 and len(chunks) == -(-200 // 13)
    assert sched.get("long").num_output_tokens == 1
    out, _ = step(sched)
    assert out.is_decode_only and len(out.scheduled) == 4


def test_fcfs_admits_in_arrival_order():
    sched, _ = make_scheduler(max_num_seqs=1, policy="fcfs")
    arrivals = [5.0, 1.0, 3.0, 1.0, 0.5]
    for i, arrival in enumerate(arrivals):
        sched.add_request(req(f"r{i}", 3, max_tokens=1, arrival=arrival))
    assert drain(sched) == ["r4", "r1", "r3", "r2", "r0"]
    assert sched.kv.num_free_pages == sched.kv.num_usable_pages


def test_priority_admits_lower_values_first():
    sched, _ = make_scheduler(max_num_seqs=1, policy="priority")
    for i, (priority, arrival) in enumerate([(3, 0.0), (1, 1.0), (2, 2.0), (0, 3.0), (1, 0.5)]):
        sched.add_request(req(f"r{i}", 3, max_tokens=1, arrival=arrival, priority=priority))
    assert drain(sched) == ["r3", "r4", "r1", "r2", "r0"]


def test_no_head_of_line_skipping_when_the_head_does_not_fit():
    sched, _ = make_scheduler(num_pages=9, page_size=4, budget=64, max_model_len=32)  # 8 usable pages
    sched.add_request(req("a", 20, max_tokens=4, arrival=0))  # 5 pages
    sched.add_request(req("big", 16, max_tokens=4, arrival=1))  # 4 pages: does not fit next to "a"
    sched.add_request(req("small", 2, max_tokens=4, arrival=2))  # would fit, but must wait its turn
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a"]


def _two_requests_racing_for_the_last_page(policy):
    # 4 usable pages of 2 tokens. "a" (low priority, first) decodes; "b" (high priority) arrives
    # later with a 5-token prompt and still needs one page for its last chunk when the pool is dry.
    sched, clock = make_scheduler(num_pages=5, page_size=2, max_num_seqs=2, budget=4, max_model_len=16,
                                  max_pages_per_seq=4, policy=policy)
    sched.add_request(req("a", 1, max_tokens=4, arrival=0.0, priority=5))
    step(sched)
    clock.now = 1.0
    sched.add_request(req("b", 5, max_tokens=1, arrival=1.0, priority=0))
    out, _ = step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 3)]
    return sched, sched.schedule()


def test_priority_preempts_the_low_priority_request_even_if_already_planned():
    sched, out = _two_requests_racing_for_the_last_page("priority")
    assert [r.request_id for r in out.preempted] == ["a"]
    assert [(s.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("b", 3, 2)]
    assert out.num_batched_tokens == 2  # a's planned token was given back
    a = sched.get("a")
    # Giving back the page planned for a's next token was enough for b: a stays parked with its KV.
    assert a.status is RequestStatus.PREEMPTED and a.kv is KVLocation.DEVICE
    assert a.num_computed_tokens == 2 and a.num_output_tokens == 2
    finished = sched.update(out, {"b": (9, None)})
    assert [r.request_id for r in finished] == ["b"]
    drain(sched)
    assert a.num_output_tokens == 4 and a.num_preemptions == 1
    assert sched.kv.num_free_pages == sched.kv.num_usable_pages


def test_fcfs_preempts_the_latest_arrival_even_if_it_is_the_one_asking():
    sched, out = _two_requests_racing_for_the_last_page("fcfs")
    assert [r.request_id for r in out.preempted] == ["b"]
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1)]
    sched.update(out, {"a": (9, None)})
    drain(sched)
    assert sched.kv.num_free_pages == sched.kv.num_usable_pages


def test_abort_between_schedule_and_update_is_safe():
    sched, _ = make_scheduler()
    for i in range(3):
        sched.add_request(req(f"r{i}", 5, max_tokens=3))
    out = sched.schedule()
    aborted = sched.abort("r1")
    assert aborted.status is RequestStatus.FINISHED_ABORTED and aborted.finish_reason == "abort"
    assert sched.kv.num_owned("r1") == 0 and sched.get("r1") is None
    sched.add_request(req("r1", 2, max_tokens=3))  # the id can be reused right away
    sampled = {s.request_id: (11, None) for s in out.scheduled}
    assert sched.update(out, sampled) == []
    assert aborted.num_computed_tokens == 0 and aborted.output_token_ids == []
    assert sched.get("r1").output_token_ids == [] and sched.get("r0").output_token_ids == [11]
    assert sched.update(out, sampled) == []  # a repeated update is a no-op
    assert sched.get("r0").output_token_ids == [11]
    assert sched.abort("r1", RequestStatus.FINISHED_ERROR).finish_reason == "error"
    assert sched.abort("r1") is None and sched.abort("nobody") is None
    with pytest.raises(ValueError):
        sched.abort("r0", RequestStatus.RUNNING)
    drain(sched)
    sched.kv.check_invariants()
    assert sched.kv.num_free_pages == sched.kv.num_usable_pages


def test_update_requires_tokens_for_rows_that_sample_and_changes_nothing_otherwise():
    sched, _ = make_scheduler(budget=8)
    sched.add_request(req("short", 2, arrival=0.0))
    sched.add_request(req("long", 20, arrival=1.0))
    out = sched.schedule()
    assert [(s.request_id, s.needs_sample) for s in out.scheduled] == [("short", True), ("long", False)]
    with pytest.raises(KeyError, match="short"):
        sched.update(out, {"long": (3, None)})
    assert sched.get("short").num_computed_tokens == 0 and sched.get("long").num_computed_tokens == 0
    sched.update(out, {"short": (3, -0.25)})
    assert sched.get("short").output_token_ids == [3] and sched.get("short").output_logprobs == [-0.25]
    assert sched.get("long").num_computed_tokens == 6 and sched.get("long").output_token_ids == []


def test_stops_at_the_model_context():
    sched, _ = make_scheduler(max_model_len=8)
    r = req("r", 5, max_tokens=100)  # not clamped by the caller
    sched.add_request(r)
    assert drain(sched, max_steps=10) == ["r"]
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 8 and r.num_output_tokens == 3


def test_eos_stop_and_stop_token_ids():
    sched, _ = make_scheduler()
    sched.add_request(req("eos", 3, max_tokens=10))
    sched.add_request(req("ids", 3, max_tokens=10, stop_token_ids=[42]))
    out = sched.schedule()
    finished = sched.update(out, {"eos": (EOS, None), "ids": (42, None)})
    assert {r.request_id: r.finish_reason for r in finished} == {"eos": "stop", "ids": "stop"}


def test_add_request_rejects_what_could_never_run():
    sched, _ = make_scheduler(num_pages=9, page_size=4, max_model_len=64, max_pages_per_seq=16)
    sched.add_request(req("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(req("a", 3))
    with pytest.raises(ValueError, match=r"^prompt_token_ids: prompt has 64 tokens; the model's context is 64"):
        sched.add_request(req("b", 64))
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        sched.add_request(req("b", 0))
    with pytest.raises(ValueError, match="^max_tokens"):  # 8 usable pages = 32 tokens of KV
        sched.add_request(req("b", 30, max_tokens=10))
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        sched.add_request(req("b", 40, max_tokens=1))
    sched.add_request(req("b", 30, max_tokens=3))  # 32 tokens of KV at most: fits exactly
    started = req("c", 3)
    started.status = RequestStatus.FINISHED_ABORTED
    with pytest.raises(ValueError, match="must be new"):
        sched.add_request(started)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_num_seqs=0, max_model_len=8), "max_num_seqs"),
    (dict(max_num_seqs=8, max_num_batched_tokens=4, max_model_len=8), "max_num_batched_tokens"),
    (dict(max_model_len=1), "max_model_len"),
])
def test_scheduler_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SchedulerConfig(**kwargs)


def test_policies():
    a, b, c = req("a", 1, arrival=2.0, priority=0), req("b", 1, arrival=1.0, priority=2), req("c", 1, arrival=1.0)
    fcfs, prio = FCFSPolicy(), PriorityPolicy()
    assert fcfs.order_waiting([a, b, c], 0.0) == [b, c, a]
    assert fcfs.pick_victim([b, a, c], 0.0) is a
    assert prio.order_waiting([a, b, c], 0.0) == [c, a, b]
    assert prio.pick_victim([a, b, c], 0.0) is b
    assert isinstance(make_policy("fcfs"), FCFSPolicy) and isinstance(make_policy("priority"), PriorityPolicy)
    with pytest.raises(ValueError, match=r"\['fcfs', 'priority', 'alise'\]"):
        make_policy("lifo")
    with pytest.raises(ValueError, match="lengths"):
        make_policy("alise")
    with pytest.raises(ValueError):
        fcfs.pick_victim([], 0.0)


def test_every_policy_the_options_accept_can_be_built():
    assert tuple(POLICIES) == SCHEDULING_POLICIES
    for name in SCHEDULING_POLICIES:
        assert isinstance(make_policy(name, lengths=HalfMaxTokens()), Policy)


# ------------------------------------------------------------------------------------------- ALISE

def alise(aging_rate=0.0, **kwargs):
    from scalellm_jax.engine.policies import AlisePolicy, OracleLengths
    from scalellm_jax.engine.step_costs import StepCostModel, StepCostPrior

    lengths = kwargs.pop("lengths", {})
    costs = StepCostModel(StepCostPrior(decode_step_s=0.01, prefill_token_s=0.001))
    return AlisePolicy(OracleLengths(lengths), costs, AliseConfig(aging_rate=aging_rate, **kwargs)), lengths


def next_step_running(sched, request_id, max_steps=100):
    """Step until a step schedules ``request_id``; returns that step's plan."""
    for _ in range(max_steps):
        out, _ = step(sched)
        if any(s.request_id == request_id for s in out.scheduled):
            return out
    raise AssertionError(f"{request_id} never ran")


def test_alise_runs_the_shortest_predicted_work_first_and_ages_the_rest():
    policy, lengths = alise(aging_rate=0.1)
    long, short, mid = req("long", 4, max_tokens=500, arrival=0.0), req("short", 4, max_tokens=500), req("mid", 4,
                                                                                                       max_tokens=500)
    lengths.update(long=400, short=10, mid=100)
    for r in (long, short, mid):
        r.queued_at = r.arrival_time
    assert [r.request_id for r in policy.order_waiting([long, short, mid], 0.0)] == ["short", "mid", "long"]
    # long's estimate is 4 s (400 steps × 10 ms); after waiting 40 s its rank (4 - 0.1 × 40 = 0) beats a fresh
    # short request arriving then: aging bounds the wait of every request.
    fresh = req("fresh", 4, max_tokens=500, arrival=40.0)
    fresh.queued_at = 40.0
    lengths["fresh"] = 10
    assert policy.order_waiting([fresh, long], 40.5)[0] is long


def test_alise_remaining_work_follows_progress_and_overruns():
    policy, lengths = alise()
    r = req("r", 8, max_tokens=100)
    lengths["r"] = 20
    assert policy.remaining_output_tokens(r) == 20
    r.num_computed_tokens = 8
    for _ in range(15):
        r.append_token(5)
    assert policy.remaining_output_tokens(r) == 5
    for _ in range(10):  # 25 generated, prediction 20: expected to run to 1.5 × 25
        r.append_token(5)
    assert policy.remaining_output_tokens(r) == pytest.approx(12.5)
    lengths.clear()  # no prediction yet: the configured default
    assert policy.remaining_output_tokens(req("x", 4, max_tokens=1000)) == AliseConfig().default_output_len


def test_alise_preempts_a_long_request_for_a_clearly_shorter_one_and_resumes_it_from_host():
    sched, clock = make_scheduler(num_pages=17, page_size=4, max_num_seqs=1, budget=16, max_model_len=64,
                                  num_host_pages=16)
    sched.policy, lengths = alise(preempt_ratio=2.0)
    lengths.update(long=40, short=2)
    sched.add_request(req("long", 8, max_tokens=40))
    step(sched)
    step(sched)
    clock.now = 1.0
    sched.add_request(req("short", 4, max_tokens=2, arrival=1.0))
    out, _ = step(sched)
    long = sched.get("long")
    assert [s.request_id for s in out.scheduled] == ["short"] and out.preempted == [long]
    assert long.kv is KVLocation.DEVICE and long.num_computed_tokens == 9  # parked: pages kept
    out, finished = step(sched)
    assert [r.request_id for r in finished] == ["short"]
    out, _ = step(sched)  # long resumes where it was, nothing recomputed
    assert [(s.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("long", 9, 1)]
    assert not out.swap_in and not out.swap_out


def test_pages_come_back_from_parked_requests_by_swapping_to_host_and_return_exactly():
    sched, clock = make_scheduler(num_pages=7, page_size=4, max_num_seqs=2, budget=32, max_model_len=64,
                                  num_host_pages=8, policy="priority")
    sched.add_request(req("low", 12, max_tokens=8, priority=5))
    step(sched)  # low: 12 prompt tokens + 1 sampled → 3 pages + growth
    clock.now = 1.0
    sched.add_request(req("high", 20, max_tokens=4, priority=0, arrival=1.0))
    out, _ = step(sched)
    low = sched.get("low")
    # high needs 5 pages of the 6: low is parked, then swapped out to make room
    assert out.preempted == [low] and [s.request_id for s in out.scheduled] == ["high"]
    assert [(op.request_id, op.num_tokens) for op in out.swap_out] == [("low", 12)]
    assert low.kv is KVLocation.HOST and sched.kv.num_host_owned("low") == 3
    assert len(out.swap_out[0].pages) == 3
    out = next_step_running(sched, "low")
    assert [(op.request_id, op.num_tokens) for op in out.swap_in] == [("low", 12)]
    assert [(s.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("low", 12, 1)]
    drain(sched)
    sched.kv.check_invariants()
    assert sched.kv.num_free_pages == sched.kv.num_usable_pages and sched.kv.num_free_host_pages == 8


def test_without_swap_space_pages_are_dropped_and_recomputed():
    sched, clock = make_scheduler(num_pages=7, page_size=4, max_num_seqs=2, budget=32, max_model_len=64,
                                  policy="priority")
    sched.add_request(req("low", 12, max_tokens=8, priority=5))
    step(sched)
    sched.add_request(req("high", 20, max_tokens=4, priority=0))
    out, _ = step(sched)
    low = sched.get("low")
    assert not out.swap_out and low.kv is KVLocation.NONE and low.num_computed_tokens == 0
    out = next_step_running(sched, "low")
    assert [(s.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("low", 0, 13)]


def test_fcfs_never_preempts_to_admit():
    sched, _ = make_scheduler(max_num_seqs=1, budget=16)
    sched.add_request(req("a", 4, max_tokens=30))
    step(sched)
    sched.add_request(req("b", 2, max_tokens=1, priority=-5))
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a"] and not out.preempted


def test_step_cost_model_learns_decode_and_prefill_costs():
    from scalellm_jax.engine.step_costs import StepCostModel, StepCostPrior

    costs = StepCostModel(StepCostPrior(decode_step_s=1.0, prefill_token_s=1.0, smoothing=0.5))
    for _ in range(30):
        costs.observe(prefill_tokens=0, decode_rows=8, seconds=0.02)
        costs.observe(prefill_tokens=100, decode_rows=8, seconds=0.02 + 100 * 0.001)
    assert costs.decode_step_s == pytest.approx(0.02, rel=1e-3)
    assert costs.prefill_token_s == pytest.approx(0.001, rel=1e-2)
    assert costs.estimate_s(prefill_tokens=10, decode_steps=5) == pytest.approx(0.11, rel=1e-2)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_parked_request_that_cannot_resume_yet_keeps_its_pages(prefix_caching):
    sched, _ = make_scheduler(num_pages=6, page_size=4, budget=16, prefix_caching=prefix_caching)
    sched.add_request(req("a", 8, max_tokens=8))
    step(sched)
    a = sched.get("a")
    sched._preempt(a)  # parked: its pages stay on the device
    owned, computed = sched.kv.num_owned("a"), a.num_computed_tokens
    assert sched.kv.allocate("hog", 4 * sched.kv.num_free_pages, new_request=False)  # nothing left to grow into
    out, _ = step(sched)
    assert not out.scheduled and a.kv is KVLocation.DEVICE
    assert (sched.kv.num_owned("a"), a.num_computed_tokens) == (owned, computed)
    sched.kv.free("hog")
    out, _ = step(sched)  # resumes where it was, nothing recomputed
    assert [(s.request_id, s.start) for s in out.scheduled] == [("a", computed)]
