"""Request workloads read from data files: the one reader of prompt/answer rows for the benchmarks, the
simulated device's answer lengths and the output-length predictor.

Two formats (``../shared/data/README.md`` describes the shared files):

- JSONL of ``{"instruction", "output"}`` (AlpacaEval with Mixtral-8x7B-Instruct's answers): ``read_rows``
  gives the texts, ``load_rows`` the requests: prompt token ids (encoded as a completion prompt is, with
  BOS) and the real answer's length in tokens (without BOS; at least 1, since a request generates at
  least one token).
- a JSON list of ``{"prompt"}`` (ShareGPT first turns, no answers): ``read_prompts``.

A prompt longer than ``max_prompt_len`` tokens is treated as the caller says, never silently
(``too_long``): ``"error"`` (the default) refuses the file, ``"skip"`` leaves the row out (the prompt
stays the text the data has: what a client sending text over HTTP needs), ``"truncate"`` keeps the
first ``max_prompt_len`` token ids and marks the row ``truncated``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

TooLong = Literal["error", "skip", "truncate"]
TOO_LONG_RULES = ("error", "skip", "truncate")


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names the file, and the line and field where one is
    at fault."""


@dataclasses.dataclass(frozen=True)
class TextRow:
    """One JSONL row as written: the prompt and the answer Mixtral gave."""

    instruction: str
    output: str


@dataclasses.dataclass(frozen=True)
class WorkloadRow:
    """One request: its prompt text, its token ids and how many tokens its answer has."""

    text: str
    prompt_ids: tuple[int, ...]
    output_len: int
    truncated: bool = False  # prompt_ids are the first max_prompt_len ids of the text's


def read_rows(path: str | Path) -> list[TextRow]:
    """Every row of a JSONL file of ``instruction``/``output`` strings, checked."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise WorkloadError(f"{path}:{number}: expected a JSON object with 'instruction' and 'output'")
            for field in ("instruction", "output"):
                if not isinstance(row.get(field), str):
                    problem = "missing" if field not in row else f"not a string ({type(row[field]).__name__})"
                    raise WorkloadError(f"{path}:{number}: field '{field}' is {problem}")
            rows.append(TextRow(row["instruction"], row["output"]))
    if not rows:
        raise WorkloadError(f"{path}: no rows")
    return rows


def answer_len(tokenizer, answer: str) -> int:
    """An answer's length in tokens (no BOS), at least 1."""
    return max(1, len(tokenizer.encode(answer, add_bos=False)))


def fit_prompt(ids: list[int], max_prompt_len: int | None, too_long: TooLong,
               where: str) -> tuple[list[int], bool] | None:
    """``ids`` under the ``too_long`` rule: (ids, truncated), or None for a prompt to skip."""
    if too_long not in TOO_LONG_RULES:
        raise ValueError(f"too_long must be one of {', '.join(TOO_LONG_RULES)}, got {too_long!r}")
    if max_prompt_len is None or len(ids) <= max_prompt_len:
        return ids, False
    if too_long == "skip":
        return None
    if too_long == "truncate":
        return ids[:max_prompt_len], True
    raise WorkloadError(f"{where}: the prompt has {len(ids)} tokens, over max_prompt_len {max_prompt_len} "
                        "(choose too_long='skip' or 'truncate')")


def load_rows(path: str | Path, tokenizer, *, max_prompt_len: int | None = None, too_long: TooLong = "error",
              first: int | None = None) -> list[WorkloadRow]:
    """The file's requests in order under the ``too_long`` rule; with ``first``, only the first that many
    usable ones (the rest of the file is not tokenized). Raises ``WorkloadError`` when none is usable."""
    requests = []
    for number, row in enumerate(read_rows(path), 1):
        if first is not None and len(requests) == first:
            break
        fitted = fit_prompt(tokenizer.encode(row.instruction), max_prompt_len, too_long, f"{path}: row {number}")
        if fitted is not None:
            ids, truncated = fitted
            requests.append(WorkloadRow(row.instruction, tuple(ids), answer_len(tokenizer, row.output), truncated))
    if not requests:
        raise WorkloadError(f"{path}: no usable rows (every prompt is over {max_prompt_len} tokens)")
    return requests


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSON list of objects with a string field ``prompt``."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: no such file")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str)
                                                for r in records):
        raise WorkloadError(f"{path}: needs a JSON list of objects with a string field 'prompt'")
    if not records:
        raise WorkloadError(f"{path}: no rows")
    return [r["prompt"] for r in records]
