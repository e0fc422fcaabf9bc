"""``scalellm_jax.workloads``: the one reader of workload rows, its rule for prompts that do not fit, and that
every reader of these files (benchmarks, simulated device, length predictor) goes through it."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

from scalellm_jax.tokenizer import MistralTokenizer
from scalellm_jax.workloads import WorkloadError, WorkloadRow, load_rows, read_prompts, read_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
LONG = " ".join(f"word{i}" for i in range(60))  # far over the 16-token limit below
MAX_PROMPT_LEN = 16


class Words:
    """A tokenizer with one token per word and BOS = 1: lengths the tests can count."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([1] if add_bos else []) + [len(w) + 2 for w in text.split()]


@pytest.fixture
def rows_file(tmp_path):
    rows = [{"instruction": "short one", "output": "a b c"},
            {"instruction": LONG, "output": "x"},
            {"instruction": "short two", "output": ""},
            {"instruction": "short three", "output": "d e", "dataset": "extra fields are ignored"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_rows_in_order_with_answer_lengths(rows_file):
    rows = load_rows(rows_file, Words())
    assert [r.text for r in rows] == ["short one", LONG, "short two", "short three"]
    assert rows[0] == WorkloadRow("short one", (1, 7, 5), 3)  # BOS + 2 words; the answer without BOS
    assert rows[1].prompt_ids == (1, *[len(f"word{i}") + 2 for i in range(60)]) and not rows[1].truncated
    assert [r.output_len for r in rows] == [3, 1, 1, 2]  # an empty answer counts as one token


def test_a_prompt_over_the_limit_is_refused_unless_the_caller_chooses(rows_file):
    with pytest.raises(WorkloadError, match=r"rows\.jsonl: row 2: the prompt has 61 tokens, over max_prompt_len 16"):
        load_rows(rows_file, Words(), max_prompt_len=MAX_PROMPT_LEN)
    with pytest.raises(ValueError, match="too_long must be one of"):
        load_rows(rows_file, Words(), max_prompt_len=MAX_PROMPT_LEN, too_long="cut")


def test_skip_leaves_long_prompts_out_and_truncate_cuts_them(rows_file):
    skipped = load_rows(rows_file, Words(), max_prompt_len=MAX_PROMPT_LEN, too_long="skip")
    assert [r.text for r in skipped] == ["short one", "short two", "short three"]
    assert not any(r.truncated for r in skipped)
    cut = load_rows(rows_file, Words(), max_prompt_len=MAX_PROMPT_LEN, too_long="truncate")
    assert [r.text for r in cut] == ["short one", LONG, "short two", "short three"]
    assert len(cut[1].prompt_ids) == MAX_PROMPT_LEN and cut[1].truncated and cut[1].text == LONG
    assert cut[1].prompt_ids == load_rows(rows_file, Words())[1].prompt_ids[:MAX_PROMPT_LEN]
    assert [r.truncated for r in cut] == [False, True, False, False]


def test_first_counts_usable_rows(rows_file):
    assert [r.text for r in load_rows(rows_file, Words(), max_prompt_len=MAX_PROMPT_LEN, too_long="skip",
                                      first=2)] == ["short one", "short two"]
    assert len(load_rows(rows_file, Words(), first=2)) == 2
    with pytest.raises(WorkloadError, match="no usable rows"):
        load_rows(rows_file, Words(), max_prompt_len=1, too_long="skip")


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "hi", "output": "yo"}', "{not json"], r"bad\.jsonl:2: not valid JSON"),
    ([json.dumps({"instruction": "hi"})], r"bad\.jsonl:1: field 'output' is missing"),
    ([json.dumps({"instruction": 3, "output": "x"})], r"bad\.jsonl:1: field 'instruction' is not a string \(int\)"),
    ([json.dumps(["a", "b"])], r"bad\.jsonl:1: expected a JSON object"),
    ([], r"bad\.jsonl: no rows"),
])
def test_bad_files_name_the_line_and_field(tmp_path, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkloadError, match=message):
        read_rows(bad)
    with pytest.raises(WorkloadError, match=r"absent\.jsonl: no such file"):
        read_rows(tmp_path / "absent.jsonl")


def test_prompt_lists(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"id": "a", "prompt": "one"}, {"prompt": "two"}]))
    assert read_prompts(path) == ["one", "two"]
    path.write_text(json.dumps([{"id": "a"}]))
    with pytest.raises(WorkloadError, match="string field 'prompt'"):
        read_prompts(path)


# ---------------------------------------------------------------------------------------------- the callers


def test_every_former_reader_gets_the_loaders_rows(rows_file, tmp_path):
    from benchmarks import offline_throughput, serving, soak
    from benchmarks.simulator.workload import HeavyTailedLengths, load_prompt_rows
    from scalellm_jax.engine.simulated_device import load_workload_lengths
    from scalellm_jax.length_predictor import dataset

    tok = MistralTokenizer()
    limit = MAX_PROMPT_LEN
    whole = load_rows(rows_file, tok)
    skipped = load_rows(rows_file, tok, max_prompt_len=limit, too_long="skip")
    cut = load_rows(rows_file, tok, max_prompt_len=limit, too_long="truncate")
    assert len(skipped) == 3 and len(cut) == 4 and cut[1].truncated  # the file exercises both rules

    # The load client (HTTP text prompts): skips; answers capped at max_tokens; rows again past the file's end.
    work = serving.load_workload(rows_file, 5, 2, limit)
    assert [(w.prompt, tuple(w.prompt_ids)) for w in work] == [(r.text, r.prompt_ids) for r in skipped + skipped[:2]]
    assert [w.max_tokens for w in work] == [min(2, r.output_len) for r in skipped + skipped[:2]]
    # The offline benchmark and the peers' workload: the rule is the caller's argument.
    for rule, expected in (("truncate", cut), ("skip", skipped)):
        offline = offline_throughput.load_workload(rows_file, tok, 3, limit, 2, rule)
        assert offline.prompts == [list(r.prompt_ids) for r in expected[:3]]
        assert offline.lengths == [min(2, r.output_len) for r in expected[:3]]
        assert offline.truncated_prompts == sum(r.truncated for r in expected[:3])
    # The GPU suite hands Hugging Face and the server the same requests: both skip at the same length.
    from benchmarks import gpu_stages

    hf = offline_throughput.load_workload(rows_file, tok, 3, gpu_stages.MAX_PROMPT_LEN, 2, "skip")
    assert hf.prompts == [w.prompt_ids for w in serving.load_workload(rows_file, 3, 2, gpu_stages.MAX_PROMPT_LEN)]
    # The simulated device and the length predictor: every prompt whole.
    assert load_workload_lengths(rows_file, tok) == {r.prompt_ids: r.output_len for r in whole}
    assert dataset.load_rows(rows_file, tok) == ([r.text for r in whole], [r.output_len for r in whole])
    # The soak: prompt texts only, at most MAX_PROMPT_CHARS characters each.
    assert soak.load_prompts(rows_file) == [r.text for r in whole if len(r.text) <= soak.MAX_PROMPT_CHARS]
    # The simulator's prompt lists: truncated as load_rows truncates.
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": r.text} for r in whole]))
    sim = load_prompt_rows(prompts, tok, HeavyTailedLengths(), seed=0, max_prompt_len=limit)
    assert [(r.text, r.prompt_ids, r.truncated) for r in sim] == [(r.text, r.prompt_ids, r.truncated) for r in cut]


def test_bad_rows_reach_the_simulated_device_with_its_option_name(tmp_path):
    from scalellm_jax.engine.simulated_device import load_workload_lengths

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi"}\n')
    with pytest.raises(ValueError, match=r"^simulate_lengths: .*bad\.jsonl:1: field 'output' is missing"):
        load_workload_lengths(bad, Words())


def test_no_other_module_reads_the_rows_fields():
    """A reader of these files names the ``instruction`` field; only ``scalellm_jax/workloads.py`` may."""
    readers = []
    for package in ("benchmarks", "scalellm_jax", "device_models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "scalellm_jax" / "workloads.py":
                continue
            if any(isinstance(node, ast.Constant) and node.value == "instruction"
                   for node in ast.walk(ast.parse(path.read_text()))):
                readers.append(str(path.relative_to(ROOT)))
    assert readers == []
