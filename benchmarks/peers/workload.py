"""What every engine of a peer run gets: one checkpoint folder and one token-id workload file.

The checkpoint is the offline benchmark's random-weight Mixtral (``bench:medium``) as a float32
Hugging Face folder; each engine casts it to the run's dtype when it loads it. Mixtral's tokenizer
(``tokenizer.model.v1`` from mistral-common) is copied into the folder, so vLLM (``tokenizer_mode
mistral``) and ours (which falls back to the same file) tokenize identically. The workload is the
offline benchmark's: AlpacaEval prompts as token ids, each with its real answer's length.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from benchmarks.offline_throughput import load_workload
from benchmarks.random_checkpoint import write_bench_model
from benchmarks.workload_files import ALPACA_EVAL


def tokenizer_file() -> pathlib.Path:
    import mistral_common

    return pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def prepare(folder: pathlib.Path, *, num_prompts: int, max_prompt_len: int, max_tokens: int, seed: int = 0,
            data: pathlib.Path = ALPACA_EVAL, model: str = "medium") -> tuple[pathlib.Path, pathlib.Path, dict]:
    """Write ``folder/model`` and ``folder/workload.json``; return their paths and the workload's summary."""
    from scalellm_jax.tokenizer import MistralTokenizer

    model_dir = write_bench_model(model, folder / "model", seed=seed)
    shutil.copy(tokenizer_file(), model_dir / "tokenizer.model.v1")
    work = load_workload(data, MistralTokenizer(), num_prompts, max_prompt_len, max_tokens, "truncate")
    path = folder / "workload.json"
    path.write_text(json.dumps({"prompts": work.prompts, "lengths": work.lengths}))
    return model_dir, path, work.summary()
