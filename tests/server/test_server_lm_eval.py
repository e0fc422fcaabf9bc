"""lm-eval's OpenAI-compatible completions model against the server: a loglikelihood and a generate_until task
on local data (no hub), tokenizing through the server's /tokenize (``tokenizer_backend=remote``)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from server_helpers import MODEL, metric

TASKS = pathlib.Path(__file__).parent / "lm_eval_tasks"


@pytest.mark.slow
def test_lm_eval_runs_a_loglikelihood_and_a_generate_until_task(server, tmp_path):
    pytest.importorskip("lm_eval")
    for name in ("local_mc.yaml", "local_gen.yaml"):  # data paths relative to the task files' folder
        text = (TASKS / name).read_text().replace(": mc.jsonl", f": {TASKS / 'mc.jsonl'}")
        (tmp_path / name).write_text(text.replace(": gen.jsonl", f": {TASKS / 'gen.jsonl'}"))
    before = metric(server.url, "scalellm_generation_tokens_total")
    out = tmp_path / "results"
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=remote,num_concurrent=2,"
               "max_retries=1", "--include_path", str(tmp_path), "--tasks", "scalellm_local_mc,scalellm_local_gen",
               "--output_path", str(out)]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PATH": "/usr/bin:/bin"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    [result_file] = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    assert 0 <= results["scalellm_local_mc"]["acc,none"] <= 1  # a random model: any accuracy, but scored
    assert 0 <= results["scalellm_local_gen"]["exact_match,none"] <= 1
    # 9 loglikelihood requests (1 token each) and 2 generations actually ran on the engine
    assert metric(server.url, "scalellm_generation_tokens_total") - before >= 9 + 2
