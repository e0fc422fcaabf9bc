"""``benchmarks.offline_throughput``: the smoke run end to end, and the missing-data exit code."""

from __future__ import annotations

import json

import pytest

from benchmarks import offline_throughput as bench
from benchmarks.workload_files import ALPACA_EVAL
from tests.torch_reference import require_torch

needs_data = pytest.mark.skipif(
    not ALPACA_EVAL.is_file(), reason=f"workload data absent: {ALPACA_EVAL} (../shared/data)"
)


def test_missing_data_exits_2_with_one_line(tmp_path, capsys):
    assert bench.main(["--smoke", "--data", str(tmp_path / "absent.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: workload data not found") and "\n" not in err


def test_max_model_len_must_fit_prompt_and_output():
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--max-model-len", "100", "--max-prompt-len", "90", "--max-tokens", "20"])
    assert exc.value.code == 2


@pytest.mark.slow
@needs_data
def test_smoke_run_reports_both_throughputs(tmp_path, capsys):
    require_torch()  # the Hugging Face side of the ratio
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outputs_match"] is True
    assert result["ours"]["tokens_per_s"] > 0 and result["hf"]["tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"])
    expected_tokens = result["workload"]["output_tokens"]
    assert result["ours"]["output_tokens"] == result["hf"]["output_tokens"] == expected_tokens
    assert result["hf"]["raw_output_tokens"] >= expected_tokens
    assert result["ours"]["recompilations"] == 0
    assert json.loads(out.read_text())["ratio"] == result["ratio"]
