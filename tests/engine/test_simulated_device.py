"""The real engine on a simulated device: modelled step times, real bookkeeping, replayed answer lengths."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from device_models import DEVICES, StepWork
from scalellm_jax import LLM, SamplingParams
from scalellm_jax.engine.scheduler import ScheduledRequest, SwapOp

ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=1024)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    rows = [{"instruction": "Name three colours.", "output": "Red, green and blue."},
            {"instruction": "Write a haiku about rain.",
             "output": "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"},
            {"instruction": "Say yes.", "output": "Yes."}]
    path = tmp_path_factory.mktemp("workload") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.fixture(scope="module")
def llm(workload):
    return LLM("mixtral-8x7b", simulate_device="h200", simulate_lengths=str(workload[0]), **ENGINE)


def test_workload_prompts_end_at_their_real_answer_length(llm, workload):
    _, rows = workload
    outs = llm.generate([r["instruction"] for r in rows] + ["not in the workload"], SamplingParams(max_tokens=64))
    tok = llm.tokenizer
    for out, row in zip(outs, rows, strict=False):
        assert len(out.token_ids) == len(tok.encode(row["output"], add_bos=False))
        assert out.finish_reason == "stop" and out.token_ids[-1] == llm.model.config.eos_token_id
    assert len(outs[-1].token_ids) == 64 and outs[-1].finish_reason == "length"  # random tokens, never EOS
    assert outs[-1].text  # detokenized like any output


def test_ignore_eos_runs_to_max_tokens(llm, workload):
    _, rows = workload
    out = llm.generate([rows[2]["instruction"]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert len(out.token_ids) == 20 and llm.model.config.eos_token_id not in out.token_ids


def test_kv_pool_comes_from_the_memory_plan_over_the_simulated_memory(llm):
    plan = llm.engine.memory_plan
    assert plan.budget_bytes == int(0.9 * DEVICES["h200"].memory_bytes)
    assert plan.weights_bytes > 85 * 2**30  # Mixtral-8x7B in bfloat16, never allocated
    assert plan.num_pages == llm.engine.kv.num_pages
    int8 = LLM("mixtral-8x7b", simulate_device="h200", kv_cache_dtype="int8", **ENGINE)
    assert int8.engine.memory_plan.num_pages > 1.8 * plan.num_pages
    with pytest.raises(ValueError, match="does not fit"):
        LLM("mixtral-8x22b", simulate_device="a100-40gb", **ENGINE)


def test_steps_take_the_modelled_time_asleep(llm):
    runner = llm.engine.runner
    busy, steps = runner.busy_s, runner.num_steps
    wall, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(["count to a hundred"] * 16, SamplingParams(max_tokens=48))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    modelled = runner.busy_s - busy
    assert sum(len(o.token_ids) for o in outs) == 16 * 48
    assert runner.num_steps - steps >= 48
    assert wall >= modelled  # the host waited for every step
    assert cpu < 0.5 * modelled  # ... asleep: a GPU step costs the host no CPU


def test_dispatch_is_asynchronous_and_steps_queue(llm):
    runner = llm.engine.runner
    step = runner.prepare([], None)
    step.work = StepWork.decode(64, 4096)
    seconds = runner.cost.step_s(step.work)
    start = time.perf_counter()
    runner.execute(step)
    second = runner.execute(step).tokens
    assert time.perf_counter() - start < seconds  # returned before the device finished
    np.asarray(second)
    assert time.perf_counter() - start >= 2 * seconds  # the second waited for the first


def test_a_swap_delays_the_next_step_by_its_transfer_time(llm):
    runner = llm.engine.runner
    step = runner.prepare([], None)
    step.work = StepWork.decode(1, 16)
    np.asarray(runner.execute(step).tokens)  # the device is idle from here
    start = time.perf_counter()
    runner.swap([SwapOp("r", tuple(range(1, 1025)), 1024 * 16)], [])
    np.asarray(runner.execute(step).tokens)
    swap_s = runner.cost.swap_s(1024 * runner.swap_page_bytes("none"))
    assert swap_s > 0.02  # 2 GiB of Mixtral KV over PCIe
    assert time.perf_counter() - start >= swap_s + runner.cost.step_s(step.work)


def test_padding_follows_the_engine_buckets(llm):
    from scalellm_jax.engine.request import Request

    runner = llm.engine.runner
    requests = [Request(f"p{i}", [1, 5, 6], SamplingParams(max_tokens=4), 0.0) for i in range(3)]
    for r in requests:
        r.output_token_ids = [7]
    step = runner.prepare([ScheduledRequest(r, 1, 3) for r in requests], None)
    assert step.decode_only and step.work.num_tokens == 3 and step.work.padded_tokens == 4
    assert step.work.kv_tokens == 3 * 4 and len(step.tokens) == 3


def test_bad_simulation_options_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="h200"):
        LLM("mixtral-8x7b", simulate_device="tpu-v9", **ENGINE)
    with pytest.raises(ValueError, match="only with simulate_device"):
        LLM("tiny", simulate_lengths="rows.jsonl", **ENGINE)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'output' is missing"):
        LLM("mixtral-8x7b", simulate_device="h200", simulate_lengths=str(bad), **ENGINE)
