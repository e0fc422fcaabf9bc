"""``benchmarks.engine_flags``: ``serving`` and ``prefix_caching`` parse ``--dtype``, ``--engine`` and
``--simulate-device`` one way."""

from __future__ import annotations

import json

import pytest

from benchmarks import prefix_caching, serving


@pytest.fixture
def parsers(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    return {
        "serving": (lambda argv: serving.parse_args(["--in-process", "--concurrency", "1", *argv]),
                    serving.OVERHEAD_ENGINE, serving.SIMULATED_ENGINE),
        "prefix_caching": (lambda argv: prefix_caching.parse_args(["--dataset", str(rows), *argv]),
                           prefix_caching.CPU_ENGINE, prefix_caching.SIMULATED_ENGINE),
    }


@pytest.mark.parametrize("name", ["serving", "prefix_caching"])
def test_defaults_follow_the_regime(parsers, name):
    parse, cpu, simulated = parsers[name]
    args = parse([])
    assert (args.dtype, args.engine_options, args.simulate_device) == ("float32", cpu, None)
    args = parse(["--simulate-device", "h200"])
    assert (args.dtype, args.engine_options, args.simulate_device) == ("bfloat16", simulated, "h200")
    args = parse(["--simulate-device", "h100", "--dtype", "float32", "--engine", '{"max_num_seqs": 3}'])
    assert (args.dtype, args.engine_options) == ("float32", {"max_num_seqs": 3})
    assert args.engine_options is not cpu and parse([]).engine_options is not cpu  # a copy: the default stays


@pytest.mark.parametrize("name", ["serving", "prefix_caching"])
@pytest.mark.parametrize("argv, message", [(["--simulate-device", "tpu-v9"], "--simulate-device: unknown 'tpu-v9'"),
                                           (["--engine", "{max_num_seqs"], "--engine: not JSON")])
def test_bad_flags_exit_2_naming_the_flag(parsers, capsys, name, argv, message):
    with pytest.raises(SystemExit) as exc:
        parsers[name][0](argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_url_target_cannot_be_simulated(capsys):
    with pytest.raises(SystemExit) as exc:
        serving.parse_args(["--url", "http://127.0.0.1:9", "--concurrency", "1", "--simulate-device", "h200"])
    assert exc.value.code == 2 and "--simulate-device: for --overhead or --in-process" in capsys.readouterr().err
