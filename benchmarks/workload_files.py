"""Where the shared workload files are: ``../shared/data`` beside the repository (its README.md describes
them; they are read in place, never copied into the repository). ``scalellm_jax.workloads`` reads them."""

from __future__ import annotations

import pathlib

SHARED_DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ALPACA_EVAL = SHARED_DATA / "alpaca_eval_mixtral_8x7b_instruct.jsonl"  # prompts with Mixtral's real answers
SHAREGPT = SHARED_DATA / "sharegpt_first_prompts.json"  # first user turns, no answers
