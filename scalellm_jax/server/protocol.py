"""OpenAI request and response schemas (pydantic), the subset this server implements.

Requests are validated strictly (no "10" for 10). Tolerant where OpenAI and vLLM are: a field this
server does not implement is accepted at its neutral value (``best_of: 1``, ``tools: null``,
``response_format: {"type": "text"}``: what client libraries send by default) and is a 400 naming it
otherwise; a field nobody here knows is ignored, with one warning per field name in the log (vLLM's
behaviour). The response models document the API in ``/openapi.json``; non-streaming responses are
built through them. Non-OpenAI fields, as in vLLM: ``top_k``, ``priority``, ``ignore_eos``,
``stop_token_ids``, ``prompt_logprobs``, ``repetition_penalty``, ``min_p``, ``min_tokens``,
``include_stop_str_in_output``, ``skip_special_tokens``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from scalellm_jax.engine.request import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY, SEED_LIMIT

MAX_N = 16  # choices per request: each is a full engine request
MAX_STOP = 16

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# OpenAI's logit_bias: token ids as JSON object keys (strings of at most 20 digits: int() stays cheap, and an id
# past the vocabulary is the engine's 400), biases added to those tokens' logits
TOKEN_ID_KEY = r"^[0-9]{1,20}$"
LogitBias = dict[Annotated[str, Field(pattern=TOKEN_ID_KEY)],
                 Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM: every chunk carries the usage so far.")


# Fields this server does not implement, accepted at their neutral values (the values that change nothing);
# any other value is a 400 that names the field. Fields of one endpoint only are checked only there.
NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {
    "spaces_between_special_tokens": (True,),
    "suffix": (None, ""), "best_of": (None, 1),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "add_generation_prompt": (True,), "continue_final_message": (False,),
    "chat_template": (None,), "chat_template_kwargs": (None, {}),
}
# Accepted with any value: they only concern OpenAI's platform (storage, billing, tool calls without tools).
IGNORED = ("store", "metadata", "service_tier", "parallel_tool_calls", "reasoning_effort", "web_search_options",
           "safety_identifier", "prompt_cache_key", "verbosity")


def is_neutral(name: str, value: Any) -> bool:
    """Whether ``value`` is a neutral value of the unimplemented field ``name`` (booleans match only booleans)."""
    for v in NEUTRAL_ONLY[name]:
        if (value is v) if isinstance(v, bool) or isinstance(value, bool) else (value == v):
            return True
    return False


class _TopLevel(_Request):
    """A request body: fields nobody here knows are kept in ``model_extra`` (and logged), not refused."""

    model_config = ConfigDict(strict=True, extra="allow")

    def unknown_fields(self) -> list[str]:
        return [name for name in (self.model_extra or {}) if name not in IGNORED and name not in NEUTRAL_ONLY]

    def unimplemented_field(self) -> tuple[str, str] | None:
        """``(field, message)`` for the first unimplemented field whose value is not neutral, else None."""
        for name, value in (self.model_extra or {}).items():
            if name in NEUTRAL_ONLY and not self._neutral(name, value):
                shown = " or ".join(json.dumps(v) for v in NEUTRAL_ONLY[name])
                return name, (f"{name}: not implemented by this server; only its neutral value ({shown}) is "
                              f"accepted, got {json.dumps(value)[:80]}")
        return None

    def _neutral(self, name: str, value: Any) -> bool:
        return is_neutral(name, value)


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str) and value:
        return value
    what = "must be a string or a list of strings"
    if isinstance(value, str):
        raise PydanticCustomError("stop", "stop strings must not be empty")
    if not isinstance(value, list):
        raise PydanticCustomError("stop", f"{what}, got {type(value).__name__}")
    if len(value) > MAX_STOP:
        raise PydanticCustomError("stop", f"at most {MAX_STOP} stop strings, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise PydanticCustomError("stop", f"{what}; item {i} is not a string ({type(item).__name__})")
        if not item:
            raise PydanticCustomError("stop", f"item {i} is empty; stop strings must not be empty")
    return value


def _check_logit_bias(value: Any) -> Any:
    """One message naming ``logit_bias`` (pydantic's own would name ``logit_bias.<key>``, one per bad entry)."""
    if value is None:
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("logit_bias", "must be an object mapping token ids to biases, got {kind}",
                                  {"kind": type(value).__name__})
    for key, bias in value.items():
        if not isinstance(key, str) or not re.fullmatch(TOKEN_ID_KEY, key):
            shown = json.dumps(key)[:40] if isinstance(key, str) else repr(key)
            raise PydanticCustomError("logit_bias", "keys must be token ids (non-negative integers written as "
                                      "strings, such as \"50256\"), got {key}", {"key": shown})
        # NaN and infinities fail the comparison too
        if not isinstance(bias, int | float) or isinstance(bias, bool) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise PydanticCustomError("logit_bias", "the bias of token {key} must be a number in [-{limit}, {limit}], "
                                      "got {bias}", {"key": key, "limit": f"{MAX_LOGIT_BIAS:g}",
                                                     "bias": json.dumps(bias)[:40]})
    return value


class _SamplingFields(_TopLevel):
    """Fields shared by both endpoints (they become a ``SamplingParams`` per choice)."""

    model: str = Field(description="The served model's name, as listed by GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Output token limit (default: 16 for completions, "
                                                          "the rest of the context for chat).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="Non-OpenAI. 0 or -1: off.")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="Choice i of n uses seed + i.")
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Stop strings (at most {MAX_STOP}); the text ends right before the first one generated.")
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=256)] | None = Field(
        None, description="Non-OpenAI (vLLM). Token ids that end the choice; the token is not in the text.")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = Field(0, ge=-(2**31), lt=2**31, description="Non-OpenAI. Lower runs first under "
                                                                "--scheduling-policy priority.")
    user: str | None = None
    ignore_eos: bool = Field(False, description="Non-OpenAI. Generate max_tokens tokens even past EOS.")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "vLLM: each prompt token's logprob and this many most likely tokens, in the choice's prompt_logprobs."))
    # Logit controls, with vLLM's definitions; null means the neutral value, as OpenAI's nullable fields do.
    presence_penalty: float | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description=(
        "Subtracted from the logit of every token already in the output (positive: new topics)."))
    frequency_penalty: float | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description=(
        "Times a token's count in the output, subtracted from its logit (positive: less repetition)."))
    logit_bias: LogitBias | None = Field(None, description=(
        f"Token id (as a string) → bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] added to its logit; "
        "±100 bans or forces the token. Ids outside the vocabulary are a 400."))
    repetition_penalty: float | None = Field(1.0, gt=0, description=(
        "vLLM: logits of tokens in the prompt or the output are divided by this when positive, multiplied "
        "when negative; 1 is off, > 1 discourages repetition."))
    min_p: float | None = Field(0.0, ge=0, le=1, description=(
        "vLLM: tokens less likely than min_p times the most likely token's probability are dropped; 0 is off."))
    min_tokens: int = Field(0, ge=0, description=(
        "vLLM: neither EOS, stop_token_ids nor stop strings end the choice before this many tokens "
        "(at most max_tokens)."))
    include_stop_str_in_output: bool = Field(False, description=(
        "vLLM: the stop string (or the stop token's text) that ended the choice stays at the end of the text."))
    skip_special_tokens: bool = Field(True, description="vLLM: special tokens (such as EOS) have no text in the "
                                                        "output; false shows them.")

    @field_validator("stop", mode="before")
    @classmethod
    def stop_is_clear(cls, value: Any) -> Any:  # one message saying what is wrong, not one per union member
        return _check_stop(value)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def logit_bias_is_clear(cls, value: Any) -> Any:
        return _check_logit_bias(value)

    def logit_controls(self) -> dict[str, Any]:
        """The logit controls as ``SamplingParams`` fields (null → neutral, logit_bias keys → token ids;
        pairs, not a dict, so that "5" and "05" reach SamplingParams' duplicate check)."""
        return dict(presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                    logit_bias=[(int(token), bias) for token, bias in (self.logit_bias or {}).items()],
                    min_p=self.min_p or 0.0, min_tokens=self.min_tokens,
                    include_stop_str_in_output=self.include_stop_str_in_output,
                    skip_special_tokens=self.skip_special_tokens)


class CompletionRequest(_SamplingFields):
    prompt: NonEmptyStr | TokenIds | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_N)] | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_N)
    ] = Field(description="Text, token ids, or a list of either (one choice group per prompt).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "The sampled tokens' logprobs and, per position, this many most likely tokens (vLLM's limit, 20)."))
    echo: bool = Field(False, description="The prompt comes back before the completion (with logprobs: the "
                                          "prompt tokens' logprobs too, the first null).")

    def _neutral(self, name: str, value: Any) -> bool:
        return is_neutral(name, value) or (name == "best_of" and value == self.n)  # best_of = n: no extra draws

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: a lone text or token-id list is one prompt."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def num_engine_requests(self) -> int:
        return len(self.prompts()) * self.n


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer clients).")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many most "
                                                                         "likely tokens per position.")

    def num_engine_requests(self) -> int:
        return self.n


class TokenizeRequest(_TopLevel):
    """vLLM's ``POST /tokenize``: a prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = Field(True, description="prompt only: start with BOS")
    return_token_strs: bool = False


class DetokenizeRequest(_TopLevel):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1 << 20)]


# ---------------------------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (echo)")
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's: one token's logprob at a prompt position, its rank (1 = most likely; null: beyond those
    computed) and its text."""

    logprob: float
    rank: int | None
    decoded_token: str


class _Envelope(BaseModel):
    """What every response object (and stream chunk) carries besides its choices."""

    id: str
    created: int = Field(description="Unix time")
    model: str


class _Choice(BaseModel):
    index: int = Field(description="Prompt index × n + choice number")
    finish_reason: Literal["stop", "length"] | None = Field(description="null until the choice's last chunk")


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="vLLM: per prompt token (the first null), token id → its logprob")


class CompletionResponse(_Envelope):
    """A completion; streamed, each chunk has this shape too (``finish_reason`` null until the last)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Envelope):
    """One Server-Sent Event of a streamed chat completion (``data: {...}``; the last is ``data: [DONE]``)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "scalellm-jax"
    max_model_len: int
    simulated_device: str | None = None  # set when no model runs: the engine's device is simulated


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
