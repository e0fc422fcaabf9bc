"""The scheduler simulator on a modelled device (``--device``), its workloads and its SLO analysis."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from benchmarks.simulator import scheduler_sim as sim
from benchmarks.simulator.device import DEVICE_GEOMETRY, device_steps
from benchmarks.simulator.replay import build_policy, simulate
from benchmarks.simulator.workload import (
    FixedLengths,
    HeavyTailedLengths,
    build_sim_requests,
    kendall_tau,
    load_prompt_rows,
    make_stream,
    noisy_predictions,
)
from device_models import StepWork
from scalellm_jax.engine.policies import AliseConfig
from scalellm_jax.engine.request import Request, SamplingParams
from scalellm_jax.engine.scheduler import ScheduledRequest, SchedulerOutput, SwapOp
from scalellm_jax.workloads import WorkloadRow

GIB = 2**30


@pytest.fixture
def prompts(tmp_path):
    """A ShareGPT-like file: prompts only, of varied lengths."""
    path = tmp_path / "prompts.json"
    words = "tell me about the history of the printing press and its effects".split()
    path.write_text(json.dumps([{"id": str(i), "prompt": " ".join(words * (1 + i % 7))} for i in range(60)]))
    return path


def _run(argv, tmp_path):
    out = tmp_path / "result.json"
    code = sim.main([*argv, "--out", str(out), "--plot", str(tmp_path / "plot.png")])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def test_device_steps_are_the_cost_models_step_and_swap_times():
    steps = device_steps("h200", "mixtral-8x7b")
    def request(rid, outputs):
        r = Request(request_id=rid, prompt_token_ids=[5] * 40, sampling_params=SamplingParams(max_tokens=8),
                    arrival_time=0.0)
        for _ in range(outputs):
            r.append_token(7, None)
        return r

    decoding = [request(f"d{i}", 1) for i in range(3)]
    decode = SchedulerOutput([ScheduledRequest(r, 1, 40) for r in decoding], [], 3)
    three = StepWork.of_rows([(1, 41)] * 3, padded_tokens=4)  # 3 rows run in the 4-row decode bucket
    assert steps.step_s(decode) == pytest.approx(steps.cost.step_s(three))
    mixed = SchedulerOutput([ScheduledRequest(request("p", 0), 40, 0), ScheduledRequest(decoding[0], 1, 40)], [], 41,
                            swap_out=[SwapOp("b", (1, 2, 3), 48)])
    work = StepWork.of_rows([(40, 40), (1, 41)], num_sampled=2, padded_tokens=48)  # the 48-token bucket
    expected = steps.cost.step_s(work) + steps.cost.swap_s(3 * steps.swap_page_bytes)
    assert steps.step_s(mixed) == pytest.approx(expected)
    assert steps.decode_buckets[-1] == DEVICE_GEOMETRY.max_num_seqs == 256


def test_kv_pool_follows_the_memory_plan_and_kv_gib():
    from scalellm_jax.config import EngineConfig, ModelConfig
    from scalellm_jax.engine.memory import plan_memory

    bf16, int8 = device_steps("a100-40gb", "opt-13b"), device_steps("a100-40gb", "opt-13b", kv_cache_dtype="int8")
    g = DEVICE_GEOMETRY
    shape = bf16.cost.shape
    plan = plan_memory(ModelConfig(**dataclasses.asdict(shape)),
                       EngineConfig(max_num_seqs=g.max_num_seqs, max_num_batched_tokens=g.max_num_batched_tokens,
                                    max_model_len=g.max_model_len),
                       dtype="bfloat16", budget_bytes=int(0.9 * 40960 * 2**20), max_pages_per_seq=g.max_pages_per_seq)
    assert bf16.num_pages == plan.num_pages and bf16.memory["page_bytes"] == plan.page_bytes
    assert 1.8 * bf16.num_pages < int8.num_pages < 2 * bf16.num_pages + 2  # int8 pages plus their scales
    assert bf16.num_host_pages == 4 * GIB // plan.page_bytes  # the engine's default 4 GiB of swap
    small = device_steps("h200", "mixtral-8x7b", kv_gib=8)
    assert small.num_pages == 8 * GIB // small.memory["page_bytes"]
    with pytest.raises(ValueError, match="--kv-gib"):
        device_steps("a100-40gb", "opt-13b", kv_gib=30)  # more than the plan leaves
    with pytest.raises(ValueError, match="--model mixtral-8x22b"):
        device_steps("h200", "mixtral-8x22b")  # does not fit one H200


def test_requests_do_not_carry_their_true_length_and_end_exactly_at_it():
    rows = [WorkloadRow("a", (5,) * 10, 3), WorkloadRow("b", (5,) * 20, 40), WorkloadRow("c", (5,) * 1000, 5000)]
    stream = make_stream(len(rows), 6, 0.0, seed=0)
    requests, true = build_sim_requests(stream, rows, 10.0, max_model_len=1024)
    for r in requests:
        assert r.sampling_params.max_tokens == 1024 - r.num_prompt_tokens and not r.sampling_params.ignore_eos
        assert true[r.request_id] == min(rows[[len(x.prompt_ids) for x in rows].index(r.num_prompt_tokens)].output_len,
                                         r.sampling_params.max_tokens)
    times = device_steps("h200", "mixtral-8x7b", geometry=sim.Geometry(16, 4, 64, 1024), num_pages=200)
    policy, costs = build_policy("alise", FixedLengths({r.request_id: 10.0 for r in requests}), true,
                                 AliseConfig(), times.decode_buckets)
    result = simulate(requests, policy, costs, times, sim.KVBudget(200, 50), true)
    by_id = {r.request_id: r for r in requests}
    assert all(by_id[rid].num_output_tokens == n for rid, n in true.items())
    assert sorted(result.output_len.tolist()) == sorted(true.values())
    assert {r.status.name for r in requests} <= {"FINISHED_STOPPED", "FINISHED_LENGTH"}


def test_heavy_tailed_lengths_are_deterministic_for_a_seed(prompts):
    from scalellm_jax.tokenizer import MistralTokenizer

    lengths = HeavyTailedLengths()
    a, b, c = lengths.draw(5000, 1), lengths.draw(5000, 1), lengths.draw(5000, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 300 < a.mean() < 380 and np.percentile(a, 99) > 5 * np.median(a)  # mean ~338, a long tail
    tokenizer = MistralTokenizer()
    rows1 = load_prompt_rows(prompts, tokenizer, lengths, seed=3)
    rows2 = load_prompt_rows(prompts, tokenizer, lengths, seed=3)
    assert rows1 == rows2 and len(rows1) == 60 and len({r.prompt_ids for r in rows1}) == 7


def test_noisy_predictions_hit_the_kendall_tau():
    true = HeavyTailedLengths().draw(3000, 0)
    predictions, sigma, tau = noisy_predictions(true, 0.45, seed=0)
    assert sigma > 0 and tau == pytest.approx(kendall_tau(predictions, true)) and abs(tau - 0.45) < 0.03
    again, _, _ = noisy_predictions(true, 0.45, seed=0)
    assert np.array_equal(predictions, again)


def test_device_cli_end_to_end_with_slo_rows(tmp_path, prompts, capsys):
    argv = ["--dataset", str(prompts), "--device", "a100-40gb", "--model", "opt-13b", "--num-requests", "60",
            "--seeds", "1", "--loads", "0.5,1.0,1.5", "--json", "--max-num-seqs", "16", "--max-model-len", "1024",
            "--kv-gib", "2"]
    code, result = _run(argv, tmp_path)
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    slo = {r["policy"]: r for r in rows if r["load"] == "slo"}
    assert set(slo) == set(sim.POLICIES)
    for row in rows:
        assert set(sim.ROW_KEYS) <= set(row)
    assert slo["fcfs"]["rate_at_slo"] in (1.0, None)
    assert result["step_model"]["kind"].startswith("device cost model (modelled device, NOT a GPU run)")
    assert result["step_model"]["cost_model"]["calibrated_from_gpu_run"] is False
    assert result["kv_budget"]["num_pages"] == 2 * GIB // result["step_model"]["memory"]["page_bytes"]
    assert result["workload"]["answer_lengths"] == "synthetic"
    assert result["workload"]["predictions"]["prediction_tau"] == sim.DEFAULT_PREDICTION_TAU
    assert result["git"] and "--device a100-40gb" in result["command"]
    assert set(result["analysis"]["targets"]) in ({*sim.TARGETS["kv_bound"]}, {*sim.TARGETS["not_kv_bound"]})


def test_slo_rates_ratios_and_baseline():
    curves = {"fcfs": ((0.5, 1.0), (1.0, 3.0), (1.5, 9.0)), "alise": ((0.5, 1.0), (1.0, 1.5), (1.5, 3.0))}
    rows = [{"policy": p, "load": x, "mean_normalized_latency_s": v} for p, pts in curves.items() for x, v in pts]
    slo = sim.slo_analysis(rows, capacity_rps=2.0, slo_s=None, slo_factor=2.0,
                           baseline={"fcfs_rate_rps": 1.0, "normalized_latency_slo_s": 2.0})
    assert slo["normalized_latency_slo_s"] == 2.0  # 2 x fcfs at the lowest load
    fcfs, alise = slo["at_slo"]["fcfs"], slo["at_slo"]["alise"]
    assert fcfs["load"] == pytest.approx(0.75) and fcfs["rate_rps"] == pytest.approx(1.5)
    assert alise["load"] == pytest.approx(7 / 6) and alise["rate_at_slo"] == pytest.approx(7 / 6 / 0.75)
    assert alise["rate_vs_baseline_fcfs"] == pytest.approx(7 / 3)  # 2.0 req/s x 7/6 over 1.0 req/s
    table = {r["policy"]: r for r in sim.slo_rows(slo)}
    assert table["alise"]["load"] == "slo" and table["alise"]["rate_rps"] == pytest.approx(7 / 3)
    assert table["fcfs"]["rate_at_slo"] == pytest.approx(1.0)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--device", "tpu9"], "--device"),
    (["--model", "opt-13b"], "--model"),  # only with --device
    (["--kv-gib", "8"], "--kv-gib"),
    (["--device", "h200", "--kv-gib", "-1"], "--kv-gib"),
    (["--device", "h200", "--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
    (["--prediction-tau", "1.5"], "--prediction-tau"),
    (["--policies", "alise"], "--policies"),
    (["--loads", "0.5,x"], "--loads"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        sim.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    if flag == "--device":
        assert "h200" in err and "a100-40gb" in err  # the choices


def test_kv_gib_beyond_the_plan_exits_2(tmp_path, prompts, capsys):
    code, _ = _run(["--dataset", str(prompts), "--device", "a100-40gb", "--model", "opt-13b", "--kv-gib", "64",
                    "--num-requests", "4", "--seeds", "1"], tmp_path)
    assert code == 2 and "--kv-gib 64" in capsys.readouterr().err
