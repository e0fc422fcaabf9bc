"""The HTTP floor benchmark: the floor server streams what it is asked, and both targets are measured side by side."""

from __future__ import annotations

import json

from benchmarks import http_floor


def test_floor_and_our_server_run_side_by_side(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"instruction": f"Question {i}?", "output": "A short answer, in words."})
                              for i in range(4)) + "\n")
    out = tmp_path / "floor.json"
    assert http_floor.main(["--dataset", str(rows), "--num-prompts", "4", "--concurrency", "2", "--repeats", "2",
                            "--step-ms", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["target"] for r in result["runs"]] == ["ours", "floor", "floor", "ours"]  # alternated
    for run in result["runs"]:
        summary = run["summary"]
        assert summary["completed"] == 4 and summary["failed"] == 0
        assert summary["event_loop_cpu_us_per_token"] >= 0  # /proc counts 10 ms ticks: a run this short may read 0
    tokens = {r["target"]: r["summary"]["output_tokens"] for r in result["runs"]}
    assert tokens["floor"] == tokens["ours"] > 0  # every answer to its full length on both (ignore_eos)
    assert {k: len(v) for k, v in result["event_loop_cpu_us_per_token"].items()} == {"ours": 2, "floor": 2}
