"""The GPU suite runs end to end on CPU with its small preset (every section, real server and HF baseline)."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_suite


def test_step_bytes_counts_the_experts_a_batch_can_reach():
    from scalellm_jax import preset

    config = preset("mixtral-8x7b")
    one, many = gpu_suite.step_bytes(config, 1, 0, 2, 2), gpu_suite.step_bytes(config, 256, 0, 2, 2)
    assert one["experts_hit_per_layer"] == pytest.approx(2.0)
    assert many["experts_hit_per_layer"] == pytest.approx(8.0)
    assert 88e9 < many["weights"] < 96e9  # Mixtral-8x7B: ~46.7B parameters in bf16
    assert gpu_suite.step_bytes(config, 64, 512, 2, 2)["kv"] == 64 * 512 * 32 * 2 * 8 * 128 * 2


@pytest.mark.slow
def test_small_suite_runs_every_section(tmp_path):
    if not gpu_suite.DATA.is_file():
        pytest.skip(f"workload data not found: {gpu_suite.DATA}")
    out = tmp_path / "suite.json"
    code = gpu_suite.main(["--preset", "small", "--skip", "kernels", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, {k: v.get("error") for k, v in result.items() if isinstance(v, dict)}
    assert result["decode"]["compilations_after_warmup"] == 0
    assert [r["batch"] for r in result["decode"]["rows"]] == [1, 4]
    summary = result["summary"]
    assert summary["serving_output_tokens_per_s"] > 0 and summary["hf_output_tokens_per_s"] > 0
    assert summary["http_vs_in_process_tokens_per_s"] > 0 and "http_overhead_target_met" in summary
    assert result["serving"]["in_process"]["runs"][0]["target"] == "in-process"
    assert out.with_suffix(".md").read_text().startswith("# GPU suite")


def test_summary_keeps_the_server_numbers_when_the_in_process_baseline_failed():
    run = {"load": 64, "summary": {"output_tokens_per_s": 900.0, "ttft_ms": {"p50": 40.0}, "tpot_ms": {"p50": 20.0},
                                   "e2e_ms": {"p50": 900.0}}}
    results = {"config": {"concurrency": 64}, "hf": {"tokens_per_s": 90.0},
               "serving": {"client": {"runs": [run]}, "in_process_error": "Command ... returned exit status 1."}}
    summary = gpu_suite.summary(results)
    assert summary["serving_output_tokens_per_s"] == 900.0 and summary["serving_vs_hf"] == pytest.approx(10.0)
    assert summary["http_overhead_error"].startswith("Command") and "http_overhead_target_met" not in summary
