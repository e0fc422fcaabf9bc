"""``python -m benchmarks.simulator``: the CLI end to end on a tiny synthetic workload (no model, no real dataset)."""

from __future__ import annotations

import json

import pytest

from benchmarks.simulator import scheduler_sim as sim
from benchmarks.simulator.calibration import Geometry, StepTimes

SHORT = "Answer with one word: is item {i} red?"
LONG = "Write a detailed essay about the history of topic {i}."


@pytest.fixture
def skewed_dataset(tmp_path):
    """Half one-word answers, half ~300-token essays: an obvious win for shortest-job-first."""
    path = tmp_path / "skewed.jsonl"
    essay = " ".join(f"sentence {k} of the essay goes on." for k in range(40))
    with path.open("w") as f:
        for i in range(60):
            f.write(json.dumps({"instruction": SHORT.format(i=i), "output": "Yes."}) + "\n")
            f.write(json.dumps({"instruction": LONG.format(i=i), "output": essay}) + "\n")
    return path


@pytest.fixture
def calibration(tmp_path):
    """A synthetic step-time table for a 4-seat engine (step time grows with the batch, like the runner's)."""
    times = StepTimes(
        geometry=Geometry(page_size=16, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1024),
        decode_s={1: 0.010, 2: 0.012, 4: 0.016}, mixed_s={16: 0.020, 32: 0.030, 64: 0.045},
        kv_token_s=1e-7, swap_page_s=1e-5,
        meta={"num_pages": 129, "model_config": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16}},
    )
    path = tmp_path / "calibration.json"
    times.save(path)
    return path


def test_cli_rows_and_alise_beats_fcfs_on_skewed_load(tmp_path, skewed_dataset, calibration, capsys):
    out, png = tmp_path / "result.json", tmp_path / "plot.png"
    argv = ["--dataset", str(skewed_dataset), "--calibration", str(calibration), "--json", "--fast-predictor",
            "--num-requests", "80", "--seeds", "1", "--loads", "0.5,1.0", "--out", str(out), "--plot", str(png)]
    assert sim.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    slo = [r for r in rows if r["load"] == "slo"]
    rows = [r for r in rows if r["load"] != "slo"]
    assert {r["policy"] for r in rows} == set(sim.POLICIES) and {r["load"] for r in rows} == {0.5, 1.0}
    assert [r["policy"] for r in slo] == list(sim.POLICIES)
    for row in slo:
        assert set(sim.ROW_KEYS) | set(sim.SLO_ROW_KEYS) <= set(row)
    for row in rows:
        assert set(row) == set(sim.ROW_KEYS)
        assert row["mean_latency_s"] > 0 and row["p99_latency_s"] >= row["p50_latency_s"] > 0
        assert row["throughput_rps"] > 0 and row["mean_normalized_latency_s"] > 0
    at = {(r["policy"], r["load"]): r for r in rows}
    assert at[("alise", 1.0)]["mean_latency_s"] < 0.9 * at[("fcfs", 1.0)]["mean_latency_s"]
    assert at[("oracle", 1.0)]["mean_latency_s"] < at[("fcfs", 1.0)]["mean_latency_s"]
    result = json.loads(out.read_text())
    assert result["capacity"]["capacity_rps"] > 0 and len(result["rows"]) == len(rows)
    assert result["analysis"]["alise_over_fcfs"]["mean_ratio"] < 1
    assert result["workload"]["predictions"]["kind"] == "trained predictor"
    assert png.is_file() or result["plot"] is None


def test_policy_seats_cap_only_the_named_policy(tmp_path, skewed_dataset, calibration):
    out = tmp_path / "result.json"
    argv = ["--dataset", str(skewed_dataset), "--calibration", str(calibration), "--fast-predictor",
            "--num-requests", "40", "--seeds", "1", "--loads", "0.9", "--policies", "fcfs,alise",
            "--policy-seats", "alise=1", "--out", str(out), "--plot", str(tmp_path / "p.png")]
    assert sim.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {r["policy"]: r for r in result["rows"]}
    assert rows["alise"]["seats"] == 1 and rows["fcfs"]["seats"] == 4 and result["policy_seats"] == {"alise": 1}
    assert rows["alise"]["mean_ttft_s"] > rows["fcfs"]["mean_ttft_s"]  # one seat: requests queue behind each other


@pytest.mark.parametrize("value", ["alise=9", "nosuch=2", "alise=x"])
def test_bad_policy_seats_exit_2_naming_the_flag(tmp_path, skewed_dataset, calibration, capsys, value):
    argv = ["--dataset", str(skewed_dataset), "--calibration", str(calibration), "--fast-predictor",
            "--policy-seats", value, "--out", str(tmp_path / "r.json")]
    try:
        code = sim.main(argv)  # alise=9: more seats than the 4-seat calibration, found after setup
    except SystemExit as exc:  # malformed values: argparse's usage error
        code = exc.code
    assert code == 2 and "--policy-seats" in capsys.readouterr().err


def test_missing_dataset_exits_2(tmp_path, capsys):
    assert sim.main(["--dataset", str(tmp_path / "absent.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: dataset not found")


def test_too_few_pages_for_one_request_exits_2_naming_the_flag(tmp_path, skewed_dataset, calibration, capsys):
    argv = ["--dataset", str(skewed_dataset), "--calibration", str(calibration), "--num-pages", "40"]
    assert sim.main(argv) == 2  # 1024-token context = 64 pages; 40 cannot hold one request
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --num-pages 40 is too small") and "\n" not in err


def test_load_at_slo_interpolates_and_flags_censoring():
    rows = [{"policy": "p", "load": x, "mean_latency_s": m} for x, m in ((0.5, 10.0), (0.6, 20.0), (0.7, 40.0))]
    assert sim.load_at_slo(rows, "p", 30.0) == {"load": pytest.approx(0.65), "censored": None}
    assert sim.load_at_slo(rows, "p", 50.0) == {"load": 0.7, "censored": "above"}
    assert sim.load_at_slo(rows, "p", 5.0) == {"load": None, "censored": "below"}
