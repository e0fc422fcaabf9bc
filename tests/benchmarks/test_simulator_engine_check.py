"""The scheduler simulator checked against the real engine on a simulated device (``--simulate-device``)."""

from __future__ import annotations

import json

import pytest

from benchmarks.simulator import engine_check as check


@pytest.fixture
def rows(tmp_path):
    """Instruction/output rows with short answers; two share a prompt but not an answer length."""
    path = tmp_path / "rows.jsonl"
    words = "explain how a paged key value cache keeps memory use low under load".split()
    records = [{"instruction": " ".join(words[: 3 + i % 9]) + f" case {i}",
                "output": " ".join(["ok"] * (2 + 5 * i % 23))}
               for i in range(16)]
    records += [{"instruction": "same prompt", "output": "short"},
                {"instruction": "same prompt", "output": " ".join(["longer"] * 30)}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_device_mode_runs_the_real_engine_on_the_simulators_workload(rows, tmp_path):
    out = tmp_path / "check.json"
    code = check.main(["--simulate-device", "h200", "--dataset", str(rows), "--kv-gib", "1", "--num-requests", "18",
                       "--repeats", "1", "--prediction-tau", "0.8", "--train-fraction", "0.1", "--json",
                       "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["simulated_device"].startswith("SIMULATED h200")
    assert "not a GPU run" in result["device_steps"]["modelled"]
    assert result["clock"] == "wall"
    # the engine's KV pool and swap space are the simulator's (device_engine raises otherwise)
    assert result["engine_config"]["num_pages"] == result["device_steps"]["num_pages"]
    assert result["engine_config"]["num_host_pages"] == result["device_steps"]["num_host_pages"]
    for side in ("engine", "sim"):
        by = {r["policy"]: r for r in result[side]["rows"]}
        assert set(by) == {"fcfs", "alise"} and all(r["load"] == 1.0 for r in by.values())
        assert result[side]["capacity"]["capacity_rps"] > 0
        assert set(result[side]["alise_over_fcfs"]) == set(check.RATIO_KEYS)
        assert by["fcfs"]["throughput_rps"] > 0 and by["alise"]["throughput_rps"] > 0
    assert set(result["same_ordering"]) == set(check.RATIO_KEYS)
    assert result["same_mean_latency_ordering"] == result["same_ordering"]["mean_latency_s"]


def test_engine_check_ends_requests_with_one_prompt_at_their_own_lengths(rows):
    args = check.parse_args(["--simulate-device", "h200", "--dataset", str(rows), "--kv-gib", "1",
                             "--num-requests", "18", "--repeats", "1", "--prediction-tau", "0.8",
                             "--train-fraction", "0.1"])
    setup = check.device_setup(args, lambda *a: None)
    same = [r.output_len for r in setup.replay if r.text == "same prompt"]
    assert len(same) == 2 and same[0] != same[1]  # both replayed (the seeded split keeps them)
    engine, _ = check.device_engine(args, setup)
    capacity, engine_rows = check.device_engine_rows(engine, setup, 1.0, lambda *a: None)  # raises on a wrong length
    assert capacity["mean_output_len"] > 0 and len(engine_rows) == 2


@pytest.mark.parametrize("argv, message", [
    (["--kv-gib", "8"], "--kv-gib: only with --simulate-device"),
    (["--simulate-device", "h200", "--max-tokens", "64"], "--max-tokens: CPU only"),
    (["--simulate-device", "h200", "--clock", "cpu"], "--clock: CPU only"),
    (["--simulate-device", "h200", "--model", "opt-13b"], "--model: the engine serves"),
    (["--simulate-device", "tpu"], "--simulate-device: invalid choice"),
    (["--simulate-device", "h200", "--load", "0"], "--load > 0"),
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        check.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_is_exit_2(tmp_path, capsys):
    assert check.main(["--simulate-device", "h200", "--dataset", str(tmp_path / "none.jsonl")]) == 2
    assert "--dataset: not found" in capsys.readouterr().err
