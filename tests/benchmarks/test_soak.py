"""A short soak against a server process on a simulated device: the report says what happened, and the checks hold."""

from __future__ import annotations

import json

import pytest

from benchmarks import soak


def test_a_short_soak_reports_every_count_and_meets_its_targets(tmp_path):
    out = tmp_path / "soak.json"
    code = soak.main(["--model", "mixtral-8x7b", "--server-args", "--simulate-device h200 "
                      "--max-num-seqs 8 --max-num-batched-tokens 256 --max-model-len 4096 --compilation-cache-dir ''",
                      "--requests", "80", "--warmup-requests", "16", "--concurrency", "8", "--overload-factor", "5",
                      "--overload-requests", "120",
                      "--out", str(out)])
    result = json.loads(out.read_text())
    main, overload = result["soak"], result["overload"]
    assert main["sent"] == 80 and overload["sent"] == 120
    assert main["completed"] + main["disconnected_on_purpose"] == 80  # nothing failed, nothing hung
    assert 0 < main["disconnected_on_purpose"] < 80
    assert overload["4xx"].get("429", 0) > 0  # 40 at once, n 1-3, against 8 seats and 24 queued
    assert main["5xx"] == overload["5xx"] == 0 and main["hung"] == overload["hung"] == 0
    assert result["kv_pages_in_use_after"] == 0 and result["still_running_or_waiting_after"] == 0
    assert result["prefix_cache_hits"] > 0  # the shared pages were taken and let go
    assert result["greedy"]["identical"] is None  # random tokens: not a check on a simulated device
    assert result["checks"]["rss_growth_within_limit"] is True
    assert code == 0 and result["targets_met"]


@pytest.mark.parametrize("argv, flag", [(["--requests", "0"], "--requests"),
                                        (["--disconnect-fraction", "1.5"], "--disconnect-fraction")])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        soak.parse_args(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
