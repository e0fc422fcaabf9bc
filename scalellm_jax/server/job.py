"""One generation request as the server runs it: the engine requests of its choices and their progress."""

from __future__ import annotations

import dataclasses

from scalellm_jax.engine.async_engine import Prompt
from scalellm_jax.engine.boundary import RequestDelta
from scalellm_jax.engine.outputs import OutputAccumulator
from scalellm_jax.engine.request import SamplingParams
from scalellm_jax.server.metrics import RequestTracker


@dataclasses.dataclass
class Job:
    """A generation request after validation (its prompts tokenized, or to be tokenized by the engine thread)."""

    chat: bool
    request_id: str
    model: str
    created: int
    prompts: list[Prompt]  # token ids, or a callable the engine thread runs for them
    choices: list[tuple[int, SamplingParams]]  # (prompt index, params), in choice-index order
    priority: int
    stream: bool
    include_usage: bool  # a last chunk with the usage
    continuous_usage: bool  # vLLM's continuous_usage_stats: every chunk carries the usage so far
    logprobs: bool
    prompt_field: str  # "prompt" or "messages": what errors about the prompt name
    top_logprobs: int = 0  # most likely alternatives per position, with logprobs
    echo: bool = False  # completions: the prompt comes back first (with its logprobs when logprobs is set)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field: None when not asked
    # Each prompt's text as sent (chat: its messages' contents, one per line); None: sent as token ids.
    # Completions echo it; the engine's length predictor reads it.
    prompt_texts: list[str | None] | None = None


class Choice:
    """Progress of one choice: its output so far, what was already sent, and its latency bookkeeping."""

    __slots__ = ("index", "text_sent", "tokens_sent", "tracker", "output", "_submit_time")

    def __init__(self, index: int, tracker: RequestTracker, submit_time: float):
        self.index = index
        self.text_sent = 0  # characters of text sent (streaming)
        self.tokens_sent = 0  # output tokens whose logprobs were sent (streaming; text may hold some back)
        self.tracker = tracker
        self.output: OutputAccumulator | None = None  # None until the engine's first delta
        self._submit_time = submit_time  # time.monotonic() when its engine request was submitted

    def add(self, delta: RequestDelta) -> None:
        """Fold in the engine's next delta for this choice."""
        if self.output is None:
            self.output = OutputAccumulator(delta.request_id, self._submit_time)
        self.output.add(delta)
