"""The GPU suite's stages on CPU with the small preset, their deadlines, and the H200 time estimate."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from benchmarks import gpu_estimate, gpu_suite
from benchmarks.deadline import Deadline

needs_data = pytest.mark.skipif(not gpu_suite.DATA.is_file(), reason=f"workload data not found: {gpu_suite.DATA}")


def test_step_bytes_counts_the_experts_a_batch_can_reach():
    from scalellm_jax import preset

    config = preset("mixtral-8x7b")
    one, many = gpu_suite.step_bytes(config, 1, 0, 2, 2), gpu_suite.step_bytes(config, 256, 0, 2, 2)
    assert one["experts_hit_per_layer"] == pytest.approx(2.0)
    assert many["experts_hit_per_layer"] == pytest.approx(8.0)
    assert 88e9 < many["weights"] < 96e9  # Mixtral-8x7B: ~46.7B parameters in bf16
    assert gpu_suite.step_bytes(config, 64, 512, 2, 2)["kv"] == 64 * 512 * 32 * 2 * 8 * 128 * 2


def test_summary_keeps_the_server_numbers_when_the_in_process_baseline_failed():
    run = {"load": 64, "summary": {"output_tokens_per_s": 900.0, "ttft_ms": {"p50": 40.0}, "tpot_ms": {"p50": 20.0},
                                   "e2e_ms": {"p50": 900.0}}}
    results = {"config": {"concurrency": 64}, "hf": {"tokens_per_s": 90.0},
               "serving": {"client": {"runs": [run]}, "in_process_error": "Command ... returned exit status 1."}}
    summary = gpu_suite.summary(results)
    assert summary["serving_output_tokens_per_s"] == 900.0 and summary["serving_vs_hf"] == pytest.approx(10.0)
    assert summary["http_overhead_error"].startswith("Command") and "http_overhead_target_met" not in summary


# ---------------------------------------------------------------------------------------------- estimate


def test_estimate_fits_every_stage_in_its_limit(capsys):
    assert gpu_suite.main(["--estimate"]) == 0
    est = gpu_estimate.estimate(gpu_suite.PRESETS["mixtral-8x7b"])
    assert est["kernels"]["total_s"] <= 240
    assert all(est[stage]["total_s"] <= 300 for stage in ("decode", "serving", "hf"))
    assert all(item["basis"] for stage in gpu_suite.STAGES for item in est[stage]["items"])
    out = capsys.readouterr().out
    assert out.count("fits") == 4 and "OVER" not in out


def _compile_check(tmp_path, rows):
    path = tmp_path / "gpu_compile_check-20990101-000000.json"
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_estimate_exits_nonzero_when_a_stage_would_exceed_its_limit(tmp_path, capsys):
    slow = _compile_check(tmp_path, [
        {"program": "kernel paged_decode", "group": "kernel", "compile_s": 1.0},
        {"program": "mixtral decode step", "group": "engine_full", "compile_s": 400.0},
        {"program": "mixtral mixed step", "group": "engine_full", "compile_s": 400.0},
    ])
    assert gpu_suite.main(["--estimate", "--compile-check", str(slow)]) == 1
    est = gpu_estimate.estimate(gpu_suite.PRESETS["mixtral-8x7b"], slow)
    assert not est["decode"]["fits"] and not est["serving"]["fits"]
    assert est["kernels"]["fits"] and est["hf"]["fits"]  # no 32-layer JAX compile in either
    assert "OVER" in capsys.readouterr().out


def test_compile_times_come_from_the_compile_check(tmp_path):
    f = gpu_estimate.DEVICELESS_FACTOR
    two_layer = _compile_check(tmp_path, [
        {"program": "ragged_prefill bq64", "group": "kernel", "compile_s": 1.5},
        {"program": "paged_decode default", "group": "kernel", "compile_s": 3.0},
        {"program": "decode step", "group": "engine_2layer", "compile_s": 2.0},
        {"program": "mixed step", "group": "engine_2layer", "compile_s": 4.0},
        {"program": "broken", "group": "kernel", "compile_s": None, "error": "lowering failed"},
    ])
    times = gpu_estimate.compile_times(two_layer)
    assert times["kernel_compile_s"][0] == pytest.approx(3.0 * f)
    assert times["decode_compile_s"][0] == pytest.approx(2.0 * 16 * f)  # 2 layers -> 32
    assert times["mixed_compile_s"][0] == pytest.approx(4.0 * 16 * f)
    assert gpu_estimate.compile_times("none") == gpu_estimate.FALLBACK



def test_default_compile_times_take_each_program_at_its_fastest_compile(tmp_path, monkeypatch):
    """A compile check made on a busy host must not inflate the estimate: each of the newest check's programs
    counts at its fastest compile among the checks made with the same jax; other jax versions and programs the
    newest check no longer compiles are left out."""
    f = gpu_estimate.DEVICELESS_FACTOR

    def check(name, jax, rows):
        (tmp_path / f"gpu_compile_check-{name}.json").write_text(json.dumps({"jax": jax, "rows": rows}))

    check("jax0.10.2-20990101-000000", "0.10.2", [{"program": "a", "group": "kernel", "compile_s": 0.5}])
    check("jax0.11.2-20990102-000000", "0.11.2", [
        {"program": "a", "group": "kernel", "compile_s": 2.0},
        {"program": "b", "group": "kernel", "compile_s": 3.0},
        {"program": "dropped", "group": "kernel", "compile_s": 9.0},
        {"program": "decode step", "group": "engine_full", "compile_s": 20.0}])
    check("jax0.11.2-20990103-000000", "0.11.2", [  # the newest, on a busy host
        {"program": "a", "group": "kernel", "compile_s": 7.0},
        {"program": "b", "group": "kernel", "compile_s": 2.5},
        {"program": "decode step", "group": "engine_full", "compile_s": 40.0}])
    monkeypatch.setattr(gpu_estimate, "RESULTS", tmp_path)
    times = gpu_estimate.compile_times()
    assert times["kernel_compile_s"][0] == pytest.approx(2.5 * f)  # max(min(2, 7), min(3, 2.5))
    assert times["decode_compile_s"][0] == pytest.approx(20.0 * f)
    assert "fastest of 2 compile checks with jax 0.11.2" in times["kernel_compile_s"][1]

# ---------------------------------------------------------------------------------------------- deadline


class FirstCallsOnly(Deadline):
    """A deadline that allows the first ``n`` measurements and no more (a budget that runs out mid-stage)."""

    n = 1

    def allows(self, predicted_s: float) -> bool:
        self.n -= 1
        return self.n >= 0


def test_a_deadline_stops_the_decode_stage_early_and_records_what_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "Deadline", FirstCallsOnly)
    out = tmp_path / "decode.json"
    assert gpu_suite.main(["--stage", "decode", "--preset", "small", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stage"] == "decode" and result["status"] == "partial"
    assert [r["batch"] for r in result["decode"]["rows"]] == [4]  # the first planned batch only
    assert [s["what"] for s in result["skipped"]] == ["mixed bucket 32", "decode bucket 1"]
    assert "zero_compile_check" not in result["decode"]
    assert result["git"]["commit"] and result["jax"] and result["device"] and result["command"].endswith(str(out))


def test_the_watchdog_writes_the_json_and_ends_the_stage_at_its_budget(tmp_path):
    out = tmp_path / "decode.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--stage", "decode", "--preset", "small",
                           "--budget-s", "0.01", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=gpu_suite.ROOT)
    assert done.returncode == 3, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["status"] == "stopped by watchdog at the budget" and result["budget_s"] == 0.01
    assert "rows" not in result.get("decode", {})  # nothing was measured in 10 ms, and nothing was lost


def test_serving_stage_buckets_reach_the_server_and_the_baseline_as_the_same_engine_config():
    """Server flags (``server_flags`` → the server's parser) and the in-process ``--engine`` JSON agree."""
    from benchmarks.serving import parse_args, server_flags
    from scalellm_jax import EngineConfig
    from scalellm_jax.server import __main__ as cli

    cfg = gpu_suite.PRESETS["mixtral-8x7b"]
    options = gpu_estimate.serving_engine_options(cfg)
    assert options["decode_buckets"] == [64] and options["token_buckets"] == [256]
    assert gpu_estimate.serving_buckets(cfg) == ((64,), (256,))  # both are the largest: one executable each
    flags = server_flags(options)
    assert flags[flags.index("--decode-buckets") + 1] == "64" and "--swap-space-gb" in flags
    served = EngineConfig(**cli.engine_options(cli.parse_args(["--model", "tiny", *flags])))
    baseline = parse_args(["--in-process", "--concurrency", "4", "--engine", json.dumps(options)])
    assert EngineConfig(**baseline.engine_options) == served
    wider = dataclasses.replace(cfg, serving_seq_buckets=(16, 8), serving_token_buckets=None)
    assert gpu_estimate.serving_buckets(wider) == ((8, 16, 64), (16, 32, 64, 128, 192, 256))
    assert server_flags({"decode_buckets": [8, 16], "max_model_len": None}) == ["--decode-buckets", "8,16"]


# ---------------------------------------------------------------------------------------------- stages


def test_the_kernels_stage_fails_on_a_wrong_kernel_output(tmp_path, monkeypatch):
    """Our kernels replaced by the reference times 1.5: every correctness row and every timed output fails."""
    import pallas_kernels as pk
    from benchmarks import kernels
    from pallas_kernels import reference

    def wrong(real):
        return lambda *args, interpret=False, **kwargs: real(*args, **{k: v for k, v in kwargs.items() if k in (
            "scale", "sliding_window", "k_scales", "v_scales")}) * 1.5

    monkeypatch.setattr(pk, "paged_decode_attention", wrong(reference.paged_decode_attention))
    monkeypatch.setattr(pk, "ragged_prefill_attention", wrong(reference.ragged_prefill_attention))
    monkeypatch.setattr(kernels, "bundled", None)  # jax's kernel in the interpreter is slow; recorded as missing
    out = tmp_path / "kernels.json"
    assert gpu_suite.main(["--stage", "kernels", "--preset", "small", "--out", str(out)]) == 1
    k = json.loads(out.read_text())["kernels"]
    assert k["correctness"] and not any(row["pass"] for row in k["correctness"])
    assert {row["config"] for row in k["correctness"]} == {"default", "splits1", "bq16"}
    assert {(row["kernel"], row["case"]) for row in k["correctness"]} >= {
        ("decode", "int8"), ("decode", "window"), ("prefill", "int8"), ("prefill", "window")}
    assert len(k["failures"]) == len(k["correctness"]) + 4  # + 2 decode and 2 prefill timed configs
    assert "not in jax" in k["decode"][0]["impls"]["jax_bundled"]["error"]


@pytest.mark.slow
def test_small_kernels_stage(tmp_path):
    out = tmp_path / "kernels.json"
    assert gpu_suite.main(["--stage", "kernels", "--preset", "small", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    k = result["kernels"]
    assert result["status"] == "complete" and result["stage_number"] == 1
    assert all(row["pass"] for row in k["correctness"]) and len(k["correctness"]) == 8
    decode = k["decode"][0]["impls"]
    assert set(decode) == {"xla", "ours/default", "ours/splits1", "jax_bundled"}
    assert all(decode[name]["ok"] for name in ("ours/default", "ours/splits1"))
    assert k["ceilings"]["copy_bandwidth_GBps"] > 0 and result["summary"]["kernel_correctness_failed"] == 0
    assert out.with_suffix(".md").read_text().startswith("# GPU suite stage kernels")


@pytest.mark.slow
def test_small_decode_stage(tmp_path):
    out = tmp_path / "decode.json"
    assert gpu_suite.main(["--stage", "decode", "--preset", "small", "--out", str(out)]) == 0
    d = json.loads(out.read_text())["decode"]
    assert [r["batch"] for r in d["rows"]] == [1, 4]
    assert d["zero_compile_check"]["compilations"] == 0 and d["zero_compile_check"]["buckets"] == {
        "decode": [4], "mixed": [32]}
    assert [(c["kind"], c["size"]) for c in d["compiles"]] == [("decode", 4), ("mixed", 32), ("decode", 1)]
    assert d["full_warmup_estimate_s"] > d["warmup_s"] > 0  # 3 of the engine's 5 buckets compiled


@pytest.mark.slow
@needs_data
def test_small_serving_then_hf_stages(tmp_path):
    serving, hf = tmp_path / "serving.json", tmp_path / "hf.json"
    assert gpu_suite.main(["--stage", "serving", "--preset", "small", "--out", str(serving)]) == 0
    s = json.loads(serving.read_text())
    assert s["serving"]["in_process"]["runs"][0]["target"] == "in-process"
    assert "--decode-buckets 4 --token-buckets 32" in s["serving"]["server_command"]
    assert s["serving"]["buckets"] == {"decode": [4], "mixed": [32], "cut": True}
    assert "warmup compiled 2 step and swap shapes" in (tmp_path / "serving.server.log").read_text()
    assert s["summary"]["http_vs_in_process_tokens_per_s"] > 0 and "http_overhead_target_met" in s["summary"]
    pytest.importorskip("torch")  # the HF baseline
    assert gpu_suite.main(["--stage", "hf", "--preset", "small", "--out", str(hf),
                           "--serving-result", str(serving)]) == 0
    h = json.loads(hf.read_text())
    assert h["hf"]["prompts_done"] == 6 and h["compared_with"] == "serving.json"
    assert h["summary"]["serving_vs_hf"] == pytest.approx(
        s["summary"]["serving_output_tokens_per_s"] / h["hf"]["tokens_per_s"])
