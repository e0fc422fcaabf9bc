"""benchmarks.prefix_caching: a short run on the simulated device reports both engines and the paired ratios."""

from __future__ import annotations

import json

import pytest

from benchmarks import prefix_caching
from benchmarks.workload_files import ALPACA_EVAL

pytestmark = pytest.mark.skipif(not ALPACA_EVAL.is_file(), reason=f"workload data not found at {ALPACA_EVAL}")


def test_a_short_simulated_run_reports_hits_only_with_caching(tmp_path):
    out = tmp_path / "prefix.json"
    code = prefix_caching.main(["--simulate-device", "h200", "--system-tokens", "300", "--num-prompts", "12",
                                "--concurrency", "4", "--conversations", "3", "--turns", "3", "--max-tokens", "8",
                                "--repeats", "2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["setup"]["device"].startswith("SIMULATED h200")
    assert {(r["workload"], r["engine"]) for r in result["runs"]} == {
        (w, e) for w in ("system-prompt", "multi-turn") for e in ("caching-on", "caching-off")}
    for workload, report in result["report"].items():
        assert report["caching-off_median"]["prefix_cache_hit_rate"] == 0
        # system-prompt: most of each prompt is shared; multi-turn: all but the first turn's prompt
        assert report["caching-on_median"]["prefix_cache_hit_rate"] > 0.3, workload
        assert len(report["paired"]["ttft_p50_off_over_on"]) == 2


def test_each_turn_extends_the_previous_conversation():
    from scalellm_jax.tokenizer import MistralTokenizer

    tokenizer = MistralTokenizer()
    chat = prefix_caching.Chat(tokenizer, max_tokens=16)
    first = chat.first("Hi")
    answer = tokenizer.encode("Hello there", add_bos=False)
    second = chat.next(first, answer, "Bye")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello there"},
                                              {"role": "user", "content": "Bye"}])
    assert second == expected and second[: len(first)] == first


@pytest.mark.parametrize("argv, flag", [(["--workloads", "chat"], "--workloads"), (["--turns", "0"], "--turns"),
                                        (["--simulate-device", "tpu"], "--simulate-device")])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        prefix_caching.main(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
