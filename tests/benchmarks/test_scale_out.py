"""The scale-out benchmark: layouts run side by side in alternating order, and each is compared with the first
repeat by repeat."""

from __future__ import annotations

import json

import pytest

from benchmarks import scale_out
from benchmarks.load_balancer import haproxy_binary


def _summary(tok_s: float, ttft_p50: float) -> dict:
    return {"output_tokens_per_s": tok_s, "ttft_ms": {"p50": ttft_p50, "p99": 2 * ttft_p50}, "failed": 0,
            "machine_cpu_busy": 0.5, "layout_cpu_cores": 0.2, "client_cpu_cores": 0.1}


def test_compare_pairs_each_repeat_with_the_baseline_layout():
    runs = [{"layout": layout, "concurrency": 64, "repeat": rep, "summary": _summary(tok, ttft)}
            for layout, rep, tok, ttft in [("one-replica", 0, 100, 50), ("two-replicas", 0, 150, 40),
                                           ("two-replicas", 1, 220, 30), ("one-replica", 1, 200, 60)]]
    report = scale_out.compare(runs, ["one-replica", "two-replicas"])["64"]
    assert report["two-replicas"]["throughput_ratio_vs_one-replica"] == [1.5, 1.1]  # per repeat, not of medians
    assert report["two-replicas"]["ttft_p50_ratio_vs_one-replica"] == [0.8, 0.5]
    assert report["one-replica"]["output_tokens_per_s"] == 150
    assert report["two-replicas"]["output_tokens_per_s_per_gpu"] == 185 / 2
    assert "throughput_ratio_vs_one-replica" not in report["one-replica"]


def test_seats_per_gpu_gives_a_multi_gpu_engine_seats_for_each_gpu():
    same = scale_out.parse_args(["--engine", '{"max_num_seqs": 8}'])
    per_gpu = scale_out.parse_args(["--engine", '{"max_num_seqs": 8}', "--seats-per-gpu"])
    two_hosts = scale_out.LAYOUTS["tensor2-two-hosts"].engine_gpus
    assert scale_out.engine_options(same, two_hosts) == {"max_num_seqs": 8}
    assert scale_out.engine_options(per_gpu, two_hosts) == {"max_num_seqs": 16}
    assert scale_out.engine_options(per_gpu, scale_out.LAYOUTS["two-replicas"].engine_gpus) == {"max_num_seqs": 8}


def test_unknown_layouts_are_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        scale_out.parse_args(["--layouts", "one-replica,three-hosts"])
    assert exit_.value.code == 2
    assert "three-hosts" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_every_layout_runs_side_by_side_on_the_simulated_device(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"instruction": f"Question {i}?", "output": "A short answer, in words."})
                              for i in range(4)) + "\n")
    out = tmp_path / "scale_out.json"
    assert scale_out.main(["--dataset", str(rows), "--concurrency", "4", "--num-prompts", "8", "--max-tokens", "4",
                           "--repeats", "2", "--engine", '{"max_num_seqs": 8, "max_num_batched_tokens": 256, '
                           '"max_model_len": 1024}', "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    order = ["one-replica", "two-replicas", "tensor2-two-hosts"]
    assert [r["layout"] for r in result["runs"]] == order + order[::-1]
    for run in result["runs"]:
        assert run["summary"]["completed"] == 8 and run["summary"]["failed"] == 0
        assert run["summary"]["output_tokens"] == 8 * 4  # every answer to its cap (ignore_eos), every layout
        assert run["summary"]["layout_cpu_cores"] >= 0  # /proc counts 10 ms ticks: a short run may read 0
    assert "SIMULATED h200" in result["device"]
    for layout in order[1:]:
        assert len(result["comparison"]["4"][layout]["throughput_ratio_vs_one-replica"]) == 2
    assert result["layouts"]["tensor2-two-hosts"]["gpus"] == 2
