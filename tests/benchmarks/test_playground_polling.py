"""The playground polling benchmark: the load runs with no page and with pages polling /state, alternated."""

from __future__ import annotations

import json

from benchmarks import playground_polling


def test_the_pages_interval_is_read_from_the_page():
    assert playground_polling.page_interval_s() == 1.0


def test_no_page_and_polling_pages_run_side_by_side(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"instruction": f"Question {i}?", "output": "A longer answer, " * 8})
                              for i in range(4)) + "\n")
    out = tmp_path / "polling.json"
    assert playground_polling.main(["--dataset", str(rows), "--num-prompts", "4", "--concurrency", "2",
                                    "--repeats", "2", "--pages", "3", "--interval-ms", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["target"] for r in result["runs"]] == ["no page", "3 pages polling", "3 pages polling", "no page"]
    for run in result["runs"]:
        assert run["summary"]["completed"] == 4 and run["summary"]["failed"] == 0
    figures = result["report"]["3 pages polling"]
    assert figures["polls"] > 0 and len(figures["paired_throughput_ratios"]) == 2
    assert result["poll_interval_s"] == 0.02
