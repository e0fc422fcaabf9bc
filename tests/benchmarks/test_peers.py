"""The peer benchmark (benchmarks/peers): its figures, its argument errors, and a run of our engine alone."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks.peers.report import agreement, paired_differences, paired_ratios, rotated, spread

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_agreement_counts_prompts_whose_first_tokens_match():
    got = agreement({"ours": [[1, 2, 3], [4, 5, 6]], "vllm": [[1, 2, 9], [4, 5, 6]], "hf": [[1, 2, 3], [7, 5, 6]]}, 2)
    assert got == {"hf/ours": 0.5, "hf/vllm": 0.5, "ours/vllm": 1.0}
    assert agreement({"ours": [[1, 2, 3]], "vllm": [[1, 2, 9]]}, 3) == {"ours/vllm": 0.0}
    with pytest.raises(ValueError, match="answered 1 prompts"):
        agreement({"ours": [[1]], "vllm": [[1], [2]]}, 1)


def test_ratios_pair_engines_within_a_repeat():
    runs = [
        {"engine": "ours", "repeat": 0, "dtype": "float32", "tps": 100.0},
        {"engine": "vllm", "repeat": 0, "dtype": "float32", "tps": 50.0},
        {"engine": "vllm", "repeat": 1, "dtype": "float32", "tps": 200.0},  # a slow repeat for ours...
        {"engine": "ours", "repeat": 1, "dtype": "float32", "tps": 100.0},
        {"engine": "ours", "repeat": 0, "dtype": "bfloat16", "tps": 30.0},
        {"engine": "vllm", "repeat": 0, "dtype": "bfloat16", "tps": None},  # a missing figure pairs with nothing
    ]
    ratios = paired_ratios(runs, "tps", group=("dtype",))
    assert ratios["float32"]["vllm"] == {"median": 1.25, "min": 0.5, "max": 2.0, "values": [2.0, 0.5]}
    assert ratios["bfloat16"] == {}
    diffs = paired_differences(runs, "tps", group=("dtype",))
    assert diffs["float32"]["vllm"]["values"] == [50.0, -100.0]


def test_a_run_without_our_engine_has_no_ratios():
    runs = [{"engine": "vllm", "repeat": r, "dtype": "float32", "tps": 50.0} for r in range(2)]
    assert paired_ratios(runs, "tps", group=("dtype",)) == {"float32": {}}
    assert paired_differences(runs, "tps", group=("dtype",)) == {"float32": {}}


def test_spread_and_rotation():
    assert spread([]) == {"median": None, "min": None, "max": None, "values": []}
    assert spread([3.0, 1.0, 2.0])["median"] == 2.0
    assert [rotated(["ours", "vllm", "hf"], r) for r in range(4)] == [
        ["ours", "vllm", "hf"], ["vllm", "hf", "ours"], ["hf", "ours", "vllm"], ["ours", "vllm", "hf"]]


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "benchmarks.peers", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_missing_peer_environment_names_the_flag(tmp_path):
    done = _run("--engines", "ours,vllm", "--peer-python", str(tmp_path / "nope" / "python"), timeout=120)
    assert done.returncode == 2
    assert "--peer-python" in done.stderr and "make bench-peers" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flag,value", [("--engines", "ours,tgi"), ("--dtypes", "float16"), ("--concurrency", "0")])
def test_bad_lists_are_refused(flag, value):
    done = _run(flag, value, timeout=120)
    assert done.returncode == 2 and flag in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_offline_run_of_our_engine_writes_a_result(tmp_path):
    out = tmp_path / "peers.json"
    done = _run("--engines", "ours", "--modes", "offline", "--model", "tiny", "--dtypes", "float32", "--repeats", "1",
                "--num-prompts", "4", "--max-tokens", "8", "--compilation-cache-dir", str(tmp_path / "cache"),
                "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    (run,) = result["offline"]["runs"]
    assert run["engine"] == "ours" and run["dtype"] == "float32"
    assert run["output_tokens"] == result["workload"]["output_tokens"] and run["tokens_per_s"] > 0
    assert "first_tokens" not in run
    assert result["device"]["kind"] == "cpu" and result["git"]["commit"]
