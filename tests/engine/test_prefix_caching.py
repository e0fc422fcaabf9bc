"""Prefix caching end to end: the same tokens with it as without, on shared-prefix workloads with
chunked prefill, preemption, host swap (exact and int8), duplicate prompts and aborts; and every page
let go at the end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_engine import ENGINE, _assert_prompt_logprobs_close, model, random_prompt, run_to_completion

from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.policies import OracleLengths
from scalellm_jax.engine.request import SamplingParams

# A pool small enough that the workload below preempts (and, with swap space, swaps).
SMALL_POOL = dict(num_pages=16)
REFERENCE = dataclasses.replace(ENGINE, num_pages=256, enable_prefix_caching=False)
__all__ = ["model"]  # the fixture, from test_engine


@pytest.fixture(scope="module")
def reference(model):
    """Outputs of an engine without prefix caching and with room for everything (no preemption)."""
    engine = LLMEngine(model, REFERENCE)
    cache = {}

    def run(workload):
        key = repr(workload)
        if key not in cache:
            ids = [engine.add_request(p, params) for p, params in workload]
            done = run_to_completion(engine)
            cache[key] = [done[i] for i in ids]
        return cache[key]

    return run


def shared_prefix_workload(rng, num_requests=10, num_prefixes=3):
    """Prompts made of one of a few shared prefixes (some longer than a prefill chunk) and a short
    suffix, some prompts repeated verbatim (as `n` > 1 sends them); greedy and seeded sampling."""
    prefixes = [random_prompt(rng, 6, 30) for _ in range(num_prefixes)]
    workload = []
    for i in range(num_requests):
        if workload and rng.random() < 0.2:
            prompt = list(workload[int(rng.integers(len(workload)))][0])
        else:
            prompt = prefixes[int(rng.integers(len(prefixes)))] + random_prompt(rng, 1, 8)
        greedy = rng.random() < 0.5
        params = SamplingParams(max_tokens=int(rng.integers(2, 14)), temperature=0.0 if greedy else 0.9,
                                top_p=1.0 if greedy else 0.9, seed=int(rng.integers(2**31)), ignore_eos=True,
                                logprobs=True, prompt_logprobs=2 if i % 5 == 4 else None)
        workload.append((prompt, params))
    return workload


def run_staggered(engine, workload, rng, abort_fraction=0.0):
    """Requests arrive over the first steps (so later ones find earlier prefixes cached); checks the
    page bookkeeping after every step. Returns {index: output} of the requests not aborted."""
    pending = list(enumerate(workload))
    ids: dict[str, int] = {}
    finished, aborted = {}, set()
    for _ in range(3000):
        while pending and rng.random() < 0.5:
            i, (prompt, params) = pending.pop(0)
            ids[engine.add_request(prompt, params)] = i
        if ids and rng.random() < abort_fraction:
            rid = list(ids)[int(rng.integers(len(ids)))]
            if ids[rid] not in finished and ids[rid] not in aborted:
                engine.abort(rid)
                aborted.add(ids[rid])
        for out in engine.step():
            if out.finished and ids[out.request_id] not in aborted:
                finished[ids[out.request_id]] = out
        engine.kv.check_invariants()
        if not pending and not engine.has_unfinished():
            return finished, aborted
    raise AssertionError("engine did not finish")


def assert_same_outputs(got, want, indices):
    for i in indices:
        assert got[i].token_ids == want[i].token_ids, f"request {i}"
        np.testing.assert_allclose(got[i].logprobs, want[i].logprobs, atol=1e-4)
        if want[i].prompt_logprobs is not None:
            _assert_prompt_logprobs_close(got[i].prompt_logprobs, want[i].prompt_logprobs)


def assert_nothing_held(engine):
    stats = engine.stats()
    assert stats.kv_pages_in_use == 0 and engine.kv.num_free_pages == engine.kv.num_usable_pages
    assert engine.kv.num_free_host_pages == engine.kv.num_host_pages


@pytest.mark.parametrize("pool, swap_space_gb", [({}, 0.0), (SMALL_POOL, 0.0), (SMALL_POOL, 1.0)],
                         ids=["roomy", "recompute", "swap"])
@pytest.mark.parametrize("policy", ["fcfs", "alise"])
def test_outputs_equal_those_without_prefix_caching(model, reference, pool, swap_space_gb, policy):
    rng = np.random.default_rng()
    config = dataclasses.replace(ENGINE, scheduling_policy=policy, swap_space_gb=swap_space_gb, **pool)
    # Whether a workload preempts or swaps depends on its draw (about 1 in 25 of these does not swap):
    # a few draws make the path this case is about all but certain; each draw is checked in full.
    for _ in range(3):
        workload = shared_prefix_workload(rng, num_requests=14 if pool else 10)
        want = reference(workload)
        engine = LLMEngine(model, config, lengths=OracleLengths({}))
        got, _ = run_staggered(engine, workload, rng)
        assert_same_outputs(got, want, range(len(workload)))
        stats = engine.stats()
        assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate < 1
        assert_nothing_held(engine)
        assert stats.kv_pages_cached > 0  # what the requests computed stays cached for the next ones
        preempted = stats.num_preemptions > 0 or not pool
        swapped = not swap_space_gb or engine.runner.swapper.num_swap_ins > 0
        if preempted and swapped:
            return
    raise AssertionError("the small pool was meant to force preemption (and, with swap space, swapping)")


def test_int8_swap_never_hands_rounded_kv_to_another_prompt(model, reference):
    """int8-swapped KV comes back rounded: none of a resumed request's pages ever enters the prefix
    cache, and every request never preempted matches the reference exactly, cached prefix or not (a
    resumed request's own tokens may differ: its KV was rounded)."""
    rng = np.random.default_rng()
    for _ in range(10):  # until a draw swaps some requests and leaves others alone (about 3 draws in 4 do)
        workload = shared_prefix_workload(rng, num_requests=16, num_prefixes=1)
        engine, preempted, swapped_in = _int8_swap_engine(model)
        got, _ = run_staggered(engine, workload, rng)
        never_preempted = [i for i, out in got.items() if out.request_id not in preempted]
        assert_same_outputs(got, reference(workload), never_preempted)
        assert_nothing_held(engine)
        if swapped_in and never_preempted:
            return
    raise AssertionError("the small pool was meant to swap some requests, not all")


def _int8_swap_engine(model):
    """An int8-swapping engine on the small pool that records preempted and swapped-in requests and
    checks, after every step, that no swapped-in request's page is cached."""
    config = dataclasses.replace(ENGINE, swap_space_gb=1.0, swap_compression="int8", **SMALL_POOL)
    engine = LLMEngine(model, config)
    preempted, swapped_in = set(), set()
    original_preempt, original_swap_in, step = engine.scheduler._preempt, engine.kv.swap_in, engine.step

    def preempt(request):
        preempted.add(request.request_id)
        original_preempt(request)

    def swap_in(request_id, total_tokens):
        pages = original_swap_in(request_id, total_tokens)
        if pages is not None:
            swapped_in.add(request_id)
        return pages

    def checked_step():
        outputs = step()
        for rid in swapped_in:
            assert not any(engine.kv.is_cached(p) for p in engine.kv.pages_of(rid)), f"{rid}'s rounded KV is cached"
        return outputs

    engine.scheduler._preempt, engine.kv.swap_in, engine.step = preempt, swap_in, checked_step
    return engine, preempted, swapped_in


def test_int8_kv_pages_are_reused_exactly(model):
    """int8 KV is quantized per token, so a cached page holds exactly what the request would write."""
    rng = np.random.default_rng()
    workload = shared_prefix_workload(rng, num_requests=8)
    outputs = []
    for caching in (False, True):
        engine = LLMEngine(model, dataclasses.replace(ENGINE, kv_cache_dtype="int8", enable_prefix_caching=caching))
        outputs.append(run_staggered(engine, workload, np.random.default_rng(1))[0])
    assert_same_outputs(outputs[1], outputs[0], range(len(workload)))
    assert engine.stats().prefix_cache_hits > 0


def test_aborts_return_every_page(model, reference):
    rng = np.random.default_rng()
    workload = shared_prefix_workload(rng, num_requests=14)
    want = reference(workload)
    engine = LLMEngine(model, dataclasses.replace(ENGINE, swap_space_gb=1.0, **SMALL_POOL))
    got, aborted = run_staggered(engine, workload, rng, abort_fraction=0.15)
    assert aborted, "the workload was meant to abort some requests"
    assert_same_outputs(got, want, got)
    assert_nothing_held(engine)


def test_a_repeated_prompt_is_prefilled_once_and_reports_its_cached_tokens(model):
    prompt = random_prompt(np.random.default_rng(), 30, 31)  # 30 tokens: 7 full pages, the 8th partial
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(model, ENGINE)
    first = engine.add_request(prompt, params)
    out_first = run_to_completion(engine)[first]
    computed_before = engine.scheduler.prefix_cache_hits
    second = engine.add_request(prompt, params)
    request = engine.scheduler._requests[second]
    out_second = run_to_completion(engine)[second]
    assert out_second.token_ids == out_first.token_ids
    assert request.num_cached_tokens == 28  # every full page of the prompt; the partial one is computed
    assert engine.scheduler.prefix_cache_hits - computed_before == 28


def test_turning_it_off_never_looks_anything_up(model):
    engine = LLMEngine(model, dataclasses.replace(ENGINE, enable_prefix_caching=False))
    prompt = random_prompt(np.random.default_rng(), 20, 21)
    for _ in range(2):
        engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0))
        run_to_completion(engine)
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.kv_pages_cached) == (0, 0, 0)
