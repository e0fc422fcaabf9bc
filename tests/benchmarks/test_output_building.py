"""benchmarks/output_building runs both trees in worker processes and writes a summary per logprobs setting."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import output_building

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_compares_two_trees_and_records_them(tmp_path):
    out = tmp_path / "result.json"
    output_building.main(["--old", str(ROOT), "--new", str(ROOT), "--rounds", "1", "--requests", "3",
                          "--tokens", "12", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["logprobs"] for row in result["summary"]] == [False, True]
    for row in result["summary"]:
        work = row["output_work_ms_per_step"]
        assert work["old_median"] > 0 and work["new_median"] > 0 and len(work["old_over_new_per_round"]) == 1
    assert {run["tree"] for run in result["runs"]} == {"old", "new"}
    assert result["workload"]["requests"] == 3 and result["git"]["commit"]
