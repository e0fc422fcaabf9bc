"""Rows of prompts and their real answers (JSONL ``instruction``/``output``) for training and measuring the
length predictor."""

from __future__ import annotations

import json
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file, line and field."""


def load_rows(path: str | Path, tokenizer=None) -> tuple[list[str], list[int]]:
    """Prompts and output lengths (tokens of ``tokenizer``, default Mixtral's) from a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    texts, outputs = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object with 'instruction' and 'output'")
            for field in ("instruction", "output"):
                if not isinstance(row.get(field), str):
                    problem = "missing" if field not in row else f"not a string ({type(row[field]).__name__})"
                    raise DatasetError(f"{path}:{number}: field '{field}' is {problem}")
            texts.append(row["instruction"])
            outputs.append(row["output"])
    if not texts:
        raise DatasetError(f"{path}: no rows")
    if tokenizer is None:
        from scalellm_jax.tokenizer import MistralTokenizer

        tokenizer = MistralTokenizer()
    return texts, [len(tokenizer.encode(text, add_bos=False)) for text in outputs]
