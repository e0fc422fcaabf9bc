"""Rows of prompts and their real answers (JSONL ``instruction``/``output``) for training and measuring the
length predictor, read by ``scalellm_jax.workloads`` (the one reader of these files)."""

from __future__ import annotations

from pathlib import Path

from scalellm_jax.workloads import WorkloadError as DatasetError
from scalellm_jax.workloads import load_rows as load_workload

__all__ = ["DatasetError", "load_rows"]


def load_rows(path: str | Path, tokenizer=None) -> tuple[list[str], list[int]]:
    """Prompts and output lengths (tokens of ``tokenizer``, default Mixtral's; at least 1) from a JSONL file;
    every prompt whole (the predictor reads text, not a context)."""
    if tokenizer is None:
        from scalellm_jax.tokenizer import MistralTokenizer

        tokenizer = MistralTokenizer()
    rows = load_workload(path, tokenizer)
    return [r.text for r in rows], [r.output_len for r in rows]
